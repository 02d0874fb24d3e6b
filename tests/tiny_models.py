"""Tiny random transformers models of each supported family, built with transformers' own config classes; and the
embedded SmolLM2, loaded once for the test modules that use it."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.15,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_QUANTIZABLE = {**_COMMON, "hidden_size": 128, "intermediate_size": 256}


def _phi4_mini_like(common: dict, *, original: int, short_factor: list, long_factor: list) -> Phi3Config:
    """Phi-4-mini's rope on a tiny model: 3/4 of each head rotates, LongRoPE past `original` positions, tied
    embeddings."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    return Phi3Config(
        **common,
        tie_word_embeddings=True,
        original_max_position_embeddings=original,
        rope_parameters={**rope, "short_factor": short_factor, "long_factor": long_factor},
    )


TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "llama_tied": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "llama31_rope": lambda: LlamaConfig(
        **_COMMON,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_linear_rope": lambda: LlamaConfig(**_COMMON, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama_head_dim_24_mqa_bias": lambda: LlamaConfig(
        **{**_COMMON, "num_key_value_heads": 1}, head_dim=24, attention_bias=True, mlp_bias=True
    ),
    # Windows shorter than the test sequences, so the sliding-window masks matter.
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=16),
    "qwen2_bias_tied": lambda: Qwen2Config(**{**_COMMON, "num_key_value_heads": 4}, tie_word_embeddings=True),
    # head_dim 32 with hidden 64: q is twice as wide as the residual stream.
    "qwen3": lambda: Qwen3Config(
        **_COMMON, head_dim=32, use_sliding_window=True, sliding_window=16, max_window_layers=1
    ),
    "gemma2": lambda: Gemma2Config(
        **_COMMON, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        sliding_window=16,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **_COMMON,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    ),
    "phi3": lambda: Phi3Config(**_COMMON, sliding_window=24),
    # Phi-4-mini's shape of rope: 3/4 of each head rotates, LongRoPE past 32 positions, tied embeddings.
    "phi4_mini_longrope": lambda: _phi4_mini_like(
        {**_COMMON, "max_position_embeddings": 128},
        original=32,
        short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
        long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
    ),
    # Every linear a multiple of 64, as the W4A8 formats need; hidden 192 = 12·16 has a non-power-of-two Hadamard.
    "llama_quantizable": lambda: LlamaConfig(
        **{**_COMMON, "hidden_size": 192, "intermediate_size": 384, "num_attention_heads": 6}
    ),
    "qwen2_quantizable_tied": lambda: Qwen2Config(
        **{**_COMMON, "hidden_size": 128, "intermediate_size": 256}, tie_word_embeddings=True
    ),
    # The other families in qwen2_quantizable_tied's linear shapes (so their GPTQ programs are compiled once).
    "qwen3_quantizable": lambda: Qwen3Config(**_QUANTIZABLE, head_dim=32),
    "gemma2_quantizable": lambda: Gemma2Config(
        **_QUANTIZABLE, head_dim=32, query_pre_attn_scalar=48, attn_logit_softcapping=4.0, final_logit_softcapping=8.0
    ),
    "gemma3_quantizable": lambda: Gemma3TextConfig(
        **_QUANTIZABLE, head_dim=32, query_pre_attn_scalar=48, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi4_mini_quantizable": lambda: _phi4_mini_like(
        _QUANTIZABLE,
        original=64,
        short_factor=[1.0 + 0.1 * i for i in range(12)],
        long_factor=[1.0 + 0.5 * i for i in range(12)],
    ),
}


def build_hf_model(name: str, seed: int = 0, **changes):
    """The tiny model `name`, with config fields changed by `changes` (e.g. num_hidden_layers)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[name]()
    if changes:
        config = type(config)(**{**config.to_dict(), **changes})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        if name.startswith("qwen2"):  # Qwen2 initialises biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
        if name.startswith(("qwen3", "gemma", "phi")):  # norms initialise to their identity; make them matter
            for parameter_name, parameter in model.named_parameters():
                if parameter_name.endswith("norm.weight"):
                    parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def save_hf_model(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.cache
def tiny_tokenizer(text: str, vocab_size: int = 300):
    """A byte-level BPE trained on `text`, with <unk>=0, <s>=1, </s>=2 and a chat template; trained once per text
    and shared, so a test that changes it must restore it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


@functools.cache
def sharp_tiny_llama(*, seed: int = 11, tokenizer=None):
    """The tiny Llama as qoq_jax `Params` with weights ×6: logits sharper than the 0.02 init, so greedy choices
    are far from ties and two correct implementations pick the same tokens.

    Made once per seed and tokenizer and shared by the modules that ask for it (read-only): tokenizers are static
    jit data, compared by identity, so with the one object the programs compiled for it in one module serve the
    others."""
    import qoq_jax

    params = qoq_jax.init_params(qoq_jax.ModelConfig.from_hf(TINY_CONFIGS["llama"]().to_dict()), seed=seed)
    state = jax.tree_util.tree_map(lambda x: x * 6, params.state)
    return dataclasses.replace(params, state=state, tokenizer=tokenizer)


@functools.cache
def smollm2_float32():
    """The embedded SmolLM2-135M as float32 `Params`, imported from its GGUF once per session and shared by the
    SmolLM2 test modules (read-only: nothing may modify it)."""
    import qoq_jax

    return qoq_jax.load("smollm2", dtype="float32")


def save_gguf(model, path: Path, architecture: str) -> Path:
    """The transformers model as llama.cpp's convert_hf_to_gguf.py writes it, in float32: tensor names from gguf's
    own name map, Gemma's norms stored as 1 + w, llama's q/k rows permuted per head, Phi-3's fused tensors kept
    fused and its LongRoPE factors as tensors, and the metadata keys it writes (what it does not write, e.g.
    Gemma's layer pattern, the reader must know)."""
    import gguf
    import numpy as np

    config = model.config
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    arch = {name: value for value, name in gguf.MODEL_ARCH_NAMES.items()}[architecture]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if architecture == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if architecture in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if architecture == "phi3":
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_sliding_window(config.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            original = rope["original_max_position_embeddings"]
            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_orig_ctx_len(original)
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
            writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if architecture.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(data.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
