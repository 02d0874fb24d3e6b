"""Import a GGUF file with the `gguf` package: metadata → config, tensors dequantized to float, tokenizer.

llama.cpp's converter (convert_hf_to_gguf.py) changes some tensors on the way in, and this undoes each:

* llama: the rows of q_proj/k_proj are interleaved per head (rotary pairs (i, i + D/2) become adjacent rows);
  `unpermute_qk_rows` restores transformers' order. Qwen, Gemma and Phi-3 use NeoX rope and are not permuted.
* gemma2/gemma3: every norm weight is stored as 1 + w; the model keeps w (its norms scale by 1 + w).
* phi3: q/k/v stay fused (attn_qkv) and so do gate/up (ffn_up, gate first), split here; LongRoPE's factors are
  the tensors rope_factors_short/long, read into the config.

What llama.cpp leaves implicit it hard-codes per architecture, and so does `gguf_to_hf_config`: Gemma 2 alternates
local and global layers, Gemma 3 has one global layer in six with local rope base 10 000, and both scale attention
by head_dim^−½ except their 27B models (hidden / heads).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from converters.hf import split_fused_rows
from qoq_jax.config import ModelConfig
from qoq_jax.errors import CheckpointError, ConfigError, UnsupportedModelError
from qoq_jax.params import Params, ParamPath, assemble_params

SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_NORM_OFFSET_ARCHITECTURES = ("gemma2", "gemma3")
# llama.cpp's layer counts of the Gemma 27B models, which scale attention by (hidden / heads)^−½.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

_NORMS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "attention_output_norm",
    "post_ffw_norm": "mlp_output_norm",
}
_LINEARS = {
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
_ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def unpermute_qk_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's per-head row permutation of q/k weights (and biases)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def import_gguf(file: str | Path, *, dtype=None, mesh: Mesh | None = None) -> Params:
    import gguf

    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as err:
        raise CheckpointError(f"{file}: cannot be read as GGUF (truncated or corrupt?): {err}") from err
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}

    def dequantized(tensor) -> np.ndarray:
        try:
            return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError as err:
            raise UnsupportedModelError(
                f"{file}: tensor {tensor.name} uses an unsupported type {tensor.tensor_type.name}"
            ) from err

    by_name = {t.name: t for t in reader.tensors}
    rope_factors = {name: dequantized(by_name[name]) for name in _ROPE_FACTORS if name in by_name}
    try:
        config = ModelConfig.from_hf(gguf_to_hf_config(metadata, set(by_name), rope_factors, source=str(file)))
    except ConfigError as err:
        raise ConfigError(f"{file}: the GGUF metadata, read as a transformers config: {err}") from None
    architecture = metadata["general.architecture"]

    tensors: dict[ParamPath, np.ndarray] = {}
    unknown = []
    for tensor in tqdm(reader.tensors, desc=f"dequantizing {file.name}", unit="tensor", leave=False):
        if tensor.name in _ROPE_FACTORS:
            continue
        mapped = _map_gguf_name(tensor.name, architecture)
        if mapped is None:
            unknown.append(tensor.name)
            continue
        paths, kind = mapped
        w = dequantized(tensor)
        try:
            arrays = _convert(w, kind, paths, config, architecture)
        except CheckpointError as err:
            raise CheckpointError(f"{file}: tensor {tensor.name} {err}") from err
        tensors.update(zip(paths, arrays, strict=True))
    if unknown:
        raise CheckpointError(f"{file}: tensors the model does not have: {', '.join(unknown[:10])}")
    tokenizer = gguf_tokenizer(metadata) if "tokenizer.ggml.tokens" in metadata else None
    return assemble_params(config, tensors, dtype=dtype, tokenizer=tokenizer, source=str(file), mesh=mesh)


def gguf_to_hf_config(
    metadata: dict, tensor_names: set[str], rope_factors: dict[str, np.ndarray], *, source: str
) -> dict:
    """GGUF metadata as a transformers-style config dict, so one parser validates both."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(f"{source}: per-frequency rope factors (rope_freqs) in GGUF are not supported")

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}")
        return default if value is None else value

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    layers = get("block_count")
    head_dim = get("attention.key_length") or (hidden // heads if hidden and heads else None)
    context = get("context_length", 2048)
    rope_parameters = {"rope_theta": get("rope.freq_base", 10000.0), "rope_type": "default"}
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        rope_parameters.update(rope_type=scaling, factor=get("rope.scaling.factor", 1.0))
    rotary_dims = get("rope.dimension_count")
    if rotary_dims is not None:
        rope_parameters["partial_rotary_factor"] = rotary_dims / head_dim
    if rope_factors:
        if len(rope_factors) != 2:
            raise CheckpointError(f"{source}: LongRoPE needs both {' and '.join(_ROPE_FACTORS)}")
        rope_parameters.update(
            rope_type="longrope",
            short_factor=rope_factors["rope_factors_short.weight"].tolist(),
            long_factor=rope_factors["rope_factors_long.weight"].tolist(),
            original_max_position_embeddings=get("rope.scaling.original_context_length", context),
        )
        if get("rope.scaling.attn_factor") is not None:
            rope_parameters["attention_factor"] = get("rope.scaling.attn_factor")
    vocab = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    hf = {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": context,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if arch in ("gemma2", "gemma3"):
        hf.update(_gemma_hf_config(arch, get, hidden, heads, head_dim, layers, rope_parameters))
    elif get("attention.sliding_window"):  # Phi-3 (0 on Phi-4-mini: none)
        hf["sliding_window"] = get("attention.sliding_window")
    return hf


def _gemma_hf_config(arch, get, hidden, heads, head_dim, layers, rope_parameters) -> dict:
    window = get("attention.sliding_window")
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):  # newer llama.cpp files list each layer
        sliding = [bool(flag) for flag in pattern]
    else:
        period = pattern or (2 if arch == "gemma2" else 6)
        sliding = [i % period < period - 1 for i in range(layers)]
    config = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": hidden // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim,
        "attn_logit_softcapping": get("attn_logit_softcapping"),
        "final_logit_softcapping": get("final_logit_softcapping"),
        "sliding_window": window,
        "layer_types": ["sliding_attention" if flag else "full_attention" for flag in sliding] if window else None,
    }
    if arch == "gemma3":
        local = {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", 10000.0)}
        config["rope_parameters"] = {"full_attention": rope_parameters, "sliding_attention": local}
    return config


def _map_gguf_name(name: str, architecture: str) -> tuple[tuple[ParamPath, ...], str] | None:
    """(model paths, how to convert) for a GGUF tensor name; kinds: norm, qk_norm, kernel, bias, and the fused
    kernels of Phi-3."""
    if name == "token_embd.weight":
        return (("embed_tokens",),), "embedding"
    if name == "output_norm.weight":
        return (("norm", "weight"),), "norm"
    if name == "output.weight":
        return (("lm_head", "kernel"),), "kernel"
    match = _BLOCK.fullmatch(name)
    if not match:
        return None
    layer, kind, leaf = int(match.group(1)), match.group(2), match.group(3)
    prefix = ("layers", layer)
    if kind in _NORMS and leaf == "weight":
        return ((*prefix, _NORMS[kind], "weight"),), "norm"
    if kind in ("attn_q_norm", "attn_k_norm") and leaf == "weight":
        return ((*prefix, "self_attn", kind.removeprefix("attn_"), "weight"),), kind
    if kind == "attn_qkv" and leaf == "weight":
        return tuple((*prefix, "self_attn", proj, "kernel") for proj in ("q_proj", "k_proj", "v_proj")), "fused_qkv"
    if kind == "ffn_up" and leaf == "weight" and architecture == "phi3":
        return tuple((*prefix, "mlp", proj, "kernel") for proj in ("gate_proj", "up_proj")), "fused_gate_up"
    if kind in _LINEARS:
        return ((*prefix, *_LINEARS[kind], "kernel" if leaf == "weight" else "bias"),), (
            "kernel" if leaf == "weight" else "bias"
        )
    return None


def _convert(w: np.ndarray, kind: str, paths, config: ModelConfig, architecture: str) -> tuple[np.ndarray, ...]:
    """A dequantized GGUF tensor ([out, in] for matrices) → the model's arrays for `paths`."""
    if kind in ("norm", "attn_q_norm", "attn_k_norm"):
        if architecture in _NORM_OFFSET_ARCHITECTURES:
            w = w - config.norm_weight_offset
        if kind != "norm":  # one weight per head in the model
            heads = config.num_heads if kind == "attn_q_norm" else config.num_kv_heads
            w = np.ascontiguousarray(np.broadcast_to(w, (heads, *w.shape)))
        return (w,)
    if kind == "fused_qkv":
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return split_fused_rows(w, (q, kv, kv))
    if kind == "fused_gate_up":
        return split_fused_rows(w, (config.intermediate_size,) * 2)
    if architecture == "llama" and kind in ("kernel", "bias") and paths[0][-2] in ("q_proj", "k_proj"):
        w = unpermute_qk_rows(w, config.num_heads if paths[0][-2] == "q_proj" else config.num_kv_heads)
    return (np.ascontiguousarray(w.T),) if kind == "kernel" else (w,)


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # fields of types the reader cannot decode are not needed
        return None


_TRANSFORMERS_GGUF_MODULE = "transformers.integrations.gguf.gguf_tokenizer_mapping"
"""Not public API: transformers may move it in any release. `tests/test_import.py` checks it is where we read it,
and the bound on transformers in pyproject.toml is no wider than the releases CI has run."""


def gguf_tokenizer(metadata: dict):
    """The file's tokenizer and chat template, built by transformers' GGUF tokenizer converter from the metadata
    already read: `AutoTokenizer.from_pretrained(gguf_file=...)` would parse the file again and needs torch."""
    import importlib

    import transformers
    from transformers import PreTrainedTokenizerFast

    try:
        converter = importlib.import_module(_TRANSFORMERS_GGUF_MODULE)
        renames_by_group, convert = converter.GGUF_TOKENIZER_MAPPING, converter.convert_gguf_tokenizer
    except (ImportError, AttributeError) as err:
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} has no GGUF tokenizer converter at {_TRANSFORMERS_GGUF_MODULE} "
            f"({err}); install the transformers version pyproject.toml allows"
        ) from err

    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in renames_by_group.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies
        tokenizer_config.setdefault("add_bos_token", True)
    for special in ("bos", "eos", "unk", "pad"):
        token_id = tokenizer_dict.get(f"{special}_token_id")
        tokenizer_config[f"{special}_token"] = None if token_id is None else tokenizer_dict["tokens"][token_id]
    backend, extra = convert(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
