"""Import a GGUF file with the `gguf` package: metadata → config, tensors dequantized to float, tokenizer.

llama.cpp's converter interleaves the rows of q_proj/k_proj of llama-architecture models (rotary pairs
(i, i + D/2) become adjacent rows); `unpermute_qk_rows` undoes that so the weights match transformers'.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from qoq_jax.config import ModelConfig
from qoq_jax.errors import CheckpointError, ConfigError, UnsupportedModelError
from qoq_jax.params import Params, ParamPath, assemble_params

SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GGUF_NAMES = {
    "attn_norm": ("input_layernorm", "weight"),
    "ffn_norm": ("post_attention_layernorm", "weight"),
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
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
    tensor_names = {t.name for t in reader.tensors}
    try:
        config = ModelConfig.from_hf(gguf_to_hf_config(metadata, tensor_names, source=str(file)))
    except ConfigError as err:
        raise ConfigError(f"{file}: the GGUF metadata, read as a transformers config: {err}") from None
    architecture = metadata["general.architecture"]

    tensors: dict[ParamPath, np.ndarray] = {}
    unknown = []
    for tensor in tqdm(reader.tensors, desc=f"dequantizing {file.name}", unit="tensor", leave=False):
        mapped = _map_gguf_name(tensor.name)
        if mapped is None:
            unknown.append(tensor.name)
            continue
        path, is_kernel = mapped
        try:
            w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError as err:
            raise UnsupportedModelError(
                f"{file}: tensor {tensor.name} uses an unsupported type {tensor.tensor_type.name}"
            ) from err
        if architecture == "llama" and len(path) > 2 and path[-2] in ("q_proj", "k_proj"):
            w = unpermute_qk_rows(w, config.num_heads if path[-2] == "q_proj" else config.num_kv_heads)
        tensors[path] = np.ascontiguousarray(w.T) if is_kernel else w
    if unknown:
        raise CheckpointError(f"{file}: tensors the model does not have: {', '.join(unknown[:10])}")
    tokenizer = gguf_tokenizer(metadata)
    return assemble_params(config, tensors, dtype=dtype, tokenizer=tokenizer, source=str(file), mesh=mesh)


def gguf_to_hf_config(metadata: dict, tensor_names: set[str], *, source: str) -> dict:
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
        return metadata.get(f"{arch}.{key}", default)

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    rope_parameters = {"rope_theta": get("rope.freq_base", 10000.0), "rope_type": "default"}
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        rope_parameters.update(rope_type=scaling, factor=get("rope.scaling.factor", 1.0))
    vocab = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    return {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length") or (hidden // heads if hidden and heads else None),
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }


def _map_gguf_name(name: str) -> tuple[ParamPath, bool] | None:
    """(model path, whether it is a linear kernel stored [out, in]) for a GGUF tensor name."""
    if name == "token_embd.weight":
        return ("embed_tokens",), False
    if name == "output_norm.weight":
        return ("norm", "weight"), False
    if name == "output.weight":
        return ("lm_head", "kernel"), True
    match = _BLOCK.fullmatch(name)
    if not match or match.group(2) not in _GGUF_NAMES:
        return None
    layer, kind, leaf = int(match.group(1)), match.group(2), match.group(3)
    target = _GGUF_NAMES[kind]
    if target[-1] == "weight":  # a norm
        return ("layers", layer, *target), False
    return ("layers", layer, *target, "kernel" if leaf == "weight" else "bias"), leaf == "weight"


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
