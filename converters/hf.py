"""Import a Hugging Face model directory: config.json + safetensors (single or sharded) or PyTorch .bin.

Tensor names map to model paths through one regex table; every file is checked before any weight is read,
and `assemble_params` rejects the whole model on any missing, unexpected or misshapen tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from qoq_jax.config import ModelConfig
from qoq_jax.errors import CheckpointError, ConfigError
from qoq_jax.params import Params, ParamPath, assemble_params, expected_shapes

Transform = Callable[[np.ndarray, ModelConfig], tuple[np.ndarray, ...]]
"""An HF tensor → the arrays of its target paths (one, or the parts of a fused tensor)."""


def _transpose(w: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, ...]:
    return (np.ascontiguousarray(w.T),)


def _same(w: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, ...]:
    return (w,)


def _per_query_head(w: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, ...]:
    """transformers' one q_norm weight [head_dim], copied to every query head (the model keeps one per head)."""
    return (np.ascontiguousarray(np.broadcast_to(w, (config.num_heads, *w.shape))),)


def _per_kv_head(w: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, ...]:
    return (np.ascontiguousarray(np.broadcast_to(w, (config.num_kv_heads, *w.shape))),)


def split_fused_rows(w: np.ndarray, sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """A fused [sum(sizes), in] weight (Phi-3's qkv_proj, gate_up_proj) cut into its parts, each transposed to
    [in, out]; a fused tensor of the wrong height is refused with the sizes it should have."""
    if w.ndim != 2 or w.shape[0] != sum(sizes):
        raise CheckpointError(
            f"has shape {tuple(w.shape)}; the config needs {sum(sizes)} rows (parts of {' + '.join(map(str, sizes))})"
        )
    return tuple(np.ascontiguousarray(part.T) for part in np.split(w, np.cumsum(sizes)[:-1], axis=0))


def _split_qkv(w: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, ...]:
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return split_fused_rows(w, (q, kv, kv))


def _split_gate_up(w: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, ...]:
    return split_fused_rows(w, (config.intermediate_size,) * 2)


_LAYER = r"model\.layers\.(\d+)\."
# (regex over the HF name, dotted model path(s) with {0}/{1} for the groups, transform)
HF_NAME_TABLE: list[tuple[str, tuple[str, ...], Transform]] = [
    (r"model\.embed_tokens\.weight", ("embed_tokens",), _same),
    (r"model\.norm\.weight", ("norm.weight",), _same),
    (r"lm_head\.weight", ("lm_head.kernel",), _transpose),
    (_LAYER + r"(\w+_layernorm)\.weight", ("layers.{0}.{1}.weight",), _same),
    (_LAYER + r"self_attn\.q_norm\.weight", ("layers.{0}.self_attn.q_norm.weight",), _per_query_head),
    (_LAYER + r"self_attn\.k_norm\.weight", ("layers.{0}.self_attn.k_norm.weight",), _per_kv_head),
    (_LAYER + r"self_attn\.([qkvo]_proj)\.weight", ("layers.{0}.self_attn.{1}.kernel",), _transpose),
    (_LAYER + r"self_attn\.([qkvo]_proj)\.bias", ("layers.{0}.self_attn.{1}.bias",), _same),
    (_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", ("layers.{0}.mlp.{1}.kernel",), _transpose),
    (_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.bias", ("layers.{0}.mlp.{1}.bias",), _same),
    (
        _LAYER + r"self_attn\.qkv_proj\.weight",
        tuple(f"layers.{{0}}.self_attn.{name}.kernel" for name in ("q_proj", "k_proj", "v_proj")),
        _split_qkv,
    ),
    (
        _LAYER + r"mlp\.gate_up_proj\.weight",
        ("layers.{0}.mlp.gate_proj.kernel", "layers.{0}.mlp.up_proj.kernel"),
        _split_gate_up,
    ),
]
# Gemma's norm names → ours, which name norms by role (its post_attention_layernorm normalizes the attention's
# output; its pre_feedforward_layernorm is what Llama calls post_attention_layernorm).
_POST_NORM_NAMES = {
    "post_attention_layernorm": "attention_output_norm",
    "pre_feedforward_layernorm": "post_attention_layernorm",
    "post_feedforward_layernorm": "mlp_output_norm",
}
_MODEL_NORM_NAMES = {ours: theirs for theirs, ours in _POST_NORM_NAMES.items()}
# Families whose checkpoints store fused projections, and which of our linears each fused tensor fills.
_FUSED = {
    "Phi3ForCausalLM": {
        **dict.fromkeys(("q_proj", "k_proj", "v_proj"), "qkv_proj"),
        **dict.fromkeys(("gate_proj", "up_proj"), "gate_up_proj"),
    }
}
# Buffers some exports carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def map_hf_name(name: str, config: ModelConfig) -> tuple[tuple[ParamPath, ...], Transform] | None:
    """The model paths and transform for an HF tensor name, or None if the name is not a model weight."""
    for pattern, templates, transform in HF_NAME_TABLE:
        match = re.fullmatch(pattern, name)
        if match:
            groups = match.groups()
            if config.post_norms and len(groups) > 1:
                groups = (groups[0], _POST_NORM_NAMES.get(groups[1], groups[1]), *groups[2:])
            paths = tuple(_path(template.format(*groups)) for template in templates)
            return paths, transform
    return None


def hf_tensor_name(path: ParamPath, config: ModelConfig) -> str:
    """The transformers name of the tensor that fills a model path (the fused one in a family that fuses), so an
    incomplete checkpoint is described in its own names."""
    if path[0] != "layers":
        return {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight"}.get(path[0], "lm_head.weight")
    layer, *rest = path[1:]
    if config.post_norms:
        rest[0] = _MODEL_NORM_NAMES.get(rest[0], rest[0])
    if len(rest) == 3:  # block.linear.leaf
        rest[1] = _FUSED.get(config.architecture, {}).get(rest[1], rest[1])
    rest[-1] = "weight" if rest[-1] == "kernel" else rest[-1]
    return ".".join(["model.layers", str(layer), *rest])


def _path(dotted: str) -> ParamPath:
    return tuple(int(part) if part.isdigit() else part for part in dotted.split("."))


def import_hf_directory(directory: str | Path, *, dtype=None, mesh: Mesh | None = None) -> Params:
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: no config.json, so this is not a Hugging Face model directory")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{config_file}: expected a JSON object, got {type(hf_config).__name__}")
    try:
        config = ModelConfig.from_hf(hf_config)
    except ConfigError as err:
        raise ConfigError(f"{config_file}: {err}") from None
    files = _weight_files(directory)
    tensors: dict[ParamPath, np.ndarray] = {}
    unknown = []
    for name, read in tqdm(_iter_tensors(files), desc=f"loading {directory.name}", unit="tensor", leave=False):
        if _IGNORED.fullmatch(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        mapped = map_hf_name(name, config)
        if mapped is None:
            unknown.append(name)
            continue
        paths, transform = mapped
        try:
            arrays = transform(read(), config)
        except CheckpointError as err:
            raise CheckpointError(f"{directory}: tensor {name} {err}") from err
        tensors.update(zip(paths, arrays, strict=True))
    if unknown:
        raise CheckpointError(f"{directory}: tensors the model does not have: {', '.join(unknown[:10])}")
    missing = sorted({hf_tensor_name(path, config) for path in expected_shapes(config) if path not in tensors})
    if missing:
        listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise CheckpointError(f"{directory}: {config.architecture} needs tensors the checkpoint lacks: {listed}")
    tokenizer = load_tokenizer(directory)
    return assemble_params(config, tensors, dtype=dtype, tokenizer=tokenizer, source=str(directory), mesh=mesh)


def load_tokenizer(directory: Path):
    """The directory's transformers tokenizer, or None when it ships none (token-id prompts only)."""
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _weight_files(directory: Path) -> list[Path]:
    """The weight files to read, all checked to exist: safetensors first, then PyTorch .bin."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            try:
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
            missing = [name for name in shard_names if not (directory / name).is_file()]
            if missing:
                raise CheckpointError(f"{directory}: shards listed in {index_name} are missing: {', '.join(missing)}")
            return [directory / name for name in shard_names]
        if (directory / single_name).is_file():
            return [directory / single_name]
    loose = sorted(directory.glob("*.safetensors"))
    if loose:
        return loose
    raise CheckpointError(
        f"{directory}: no weights found (model.safetensors, shards with an index, or pytorch_model.bin)"
    )


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(name, reader) pairs over all files; readers load lazily so only one tensor is in flight at a time."""
    for file in files:
        if file.suffix == ".safetensors":
            yield from _iter_safetensors(file)
        else:
            yield from _iter_torch_bin(file)


def _iter_safetensors(file: Path):
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="flax")  # bfloat16 survives (numpy via ml_dtypes), no fp32 copy
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{file}: cannot be read as safetensors (truncated or corrupt?): {err}") from err
    with handle as f:
        for name in f.keys():
            yield name, _guarded(file, lambda name=name: np.asarray(f.get_tensor(name)))


def _iter_torch_bin(file: Path):
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(f"{file}: reading PyTorch .bin weights needs torch (pip install torch)") from err
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file}: cannot be read as a PyTorch checkpoint: {err}") from err
    for name, tensor in state.items():
        yield name, lambda tensor=tensor: tensor.detach().to(torch.float32).numpy()


def _guarded(file: Path, read: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    def guarded_read():
        try:
            return read()
        except Exception as err:
            raise CheckpointError(f"{file}: a tensor cannot be read (truncated file?): {err}") from err

    return guarded_read
