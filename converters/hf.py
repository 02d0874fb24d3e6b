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
from qoq_jax.params import Params, ParamPath, assemble_params

Transform = Callable[[np.ndarray], np.ndarray]


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _same(w: np.ndarray) -> np.ndarray:
    return w


_LAYER = r"model\.layers\.(\d+)\."
# (regex over the HF name, dotted model path with {0}/{1} for the groups, transform)
HF_NAME_TABLE: list[tuple[str, str, Transform]] = [
    (r"model\.embed_tokens\.weight", "embed_tokens", _same),
    (r"model\.norm\.weight", "norm.weight", _same),
    (r"lm_head\.weight", "lm_head.kernel", _transpose),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", "layers.{0}.{1}.weight", _same),
    (_LAYER + r"self_attn\.([qkvo]_proj)\.weight", "layers.{0}.self_attn.{1}.kernel", _transpose),
    (_LAYER + r"self_attn\.([qkvo]_proj)\.bias", "layers.{0}.self_attn.{1}.bias", _same),
    (_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", "layers.{0}.mlp.{1}.kernel", _transpose),
    (_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.bias", "layers.{0}.mlp.{1}.bias", _same),
]
# Buffers some exports carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def map_hf_name(name: str) -> tuple[ParamPath, Transform] | None:
    """The model path and transform for an HF tensor name, or None if the name is not a model weight."""
    for pattern, template, transform in HF_NAME_TABLE:
        match = re.fullmatch(pattern, name)
        if match:
            parts = template.format(*match.groups()).split(".")
            return tuple(int(part) if part.isdigit() else part for part in parts), transform
    return None


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
        mapped = map_hf_name(name)
        if mapped is None:
            unknown.append(name)
            continue
        path, transform = mapped
        tensors[path] = transform(read())
    if unknown:
        raise CheckpointError(f"{directory}: tensors the model does not have: {', '.join(unknown[:10])}")
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
