"""Self-describing model checkpoints: an Orbax item of the arrays plus `qoq.json`, written atomically.

On disk::

    <ckpt>/qoq.json     format_version, model_config, dtype, quant, recipe, tensors manifest, tokenizer
    <ckpt>/state/       Orbax StandardCheckpointer item: a flat {dotted tensor name: array} dict
    <ckpt>/tokenizer/   the HF tokenizer (`save_pretrained`), when the model has one

The arrays are stored under dotted names (`layers.0.self_attn.q_proj.kernel.packed`) rather than as the NNX
state tree, so the files do not depend on NNX's pytree internals; loading rebuilds the structure from the
abstract model that `model_config` + `quant` describe and restores every array with its exact dtype (Orbax
casts silently to whatever dtype it is asked for).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from qoq_jax.config import ModelConfig
from qoq_jax.errors import CheckpointError
from qoq_jax.model import CausalLM
from qoq_jax.params import Params, resolve_dtype
from qoq_jax.quant import KERNEL_CHOICES, QuantFormat
from qoq_jax.sharding import TensorParallel
from qoq_jax.tensor_names import named_leaves

FORMAT_VERSION = 1
METADATA_FILE = "qoq.json"
STATE_DIR = "state"
TOKENIZER_DIR = "tokenizer"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A directory with a `qoq.json` (whether it is intact is `load_checkpoint`'s question)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILE).is_file()


def save_checkpoint(
    params: Params,
    directory: str | os.PathLike,
    *,
    recipe: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes `params` (and the quantization `recipe` that produced them, stored verbatim) to `directory`.

    Everything is built in a sibling `<name>.tmp-*` directory and renamed into place, so readers see either
    no checkpoint or a complete one; on failure the temporary directory is removed and the target untouched.
    overwrite=True replaces an existing checkpoint (never an unrelated non-empty directory)."""
    target = Path(directory).absolute()
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target}: already exists (pass overwrite=True to replace it)")
    if target.exists() and not (is_checkpoint(target) or (target.is_dir() and not any(target.iterdir()))):
        raise CheckpointError(f"{target}: exists and is not a qoq checkpoint; refusing to replace it")
    tensors = named_leaves(params.state)
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_config": params.config.to_dict(),
        "dtype": params.dtype.name,
        "quant": None if params.quant is None else _quant_dict(params.quant),
        "recipe": None if recipe is None else dict(recipe),
        "tensors": {name: {"shape": list(a.shape), "dtype": a.dtype.name} for name, a in tensors.items()},
        "tokenizer": None if params.tokenizer is None else TOKENIZER_DIR,
    }
    text = json.dumps(metadata, indent=2)  # before any write: a recipe JSON cannot hold fails here
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{secrets.token_hex(6)}")
    staging.mkdir()  # the umask's permissions, where tempfile.mkdtemp would make the checkpoint owner-only
    try:
        import orbax.checkpoint as ocp  # imported on use: it adds seconds to `import qoq_jax`

        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / STATE_DIR, tensors)
            checkpointer.wait_until_finished()
        if params.tokenizer is not None:
            params.tokenizer.save_pretrained(staging / TOKENIZER_DIR)
        (staging / METADATA_FILE).write_text(text)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's `qoq.json` (config, dtype, quant format, recipe, manifest), format version checked."""
    path = Path(directory)
    file = path / METADATA_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not file.is_file():
        raise CheckpointError(f"{path}: missing {METADATA_FILE} (not a checkpoint, or a partial copy of one)")
    try:
        metadata = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: cannot be parsed: {err}") from err
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(metadata).__name__}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {version!r} is not supported (this reader: {FORMAT_VERSION})")
    missing = [key for key in ("model_config", "dtype", "quant", "tensors", "tokenizer") if key not in metadata]
    if missing:
        raise CheckpointError(f"{file}: missing field(s) {', '.join(missing)}")
    return metadata


def load_checkpoint(
    directory: str | os.PathLike, *, kernel: str = "auto", dtype=None, mesh: Mesh | None = None
) -> Params:
    """Loads a checkpoint written by `save_checkpoint`, or raises `CheckpointError` naming what is wrong.

    kernel: how quantized matmuls run ("auto", "pallas", "reference"); it is not stored in the checkpoint.
    dtype: None or the checkpoint's own dtype. A different one is refused rather than cast: the stored
    weights (and any calibration behind them) are in that dtype, and fp16 scales must never follow a cast.
    mesh: split the model over this mesh's "tensor" axis (`qoq_jax.make_mesh`); each device reads only its
    shards of the arrays from the files."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}; got {kernel!r}")
    path = Path(directory).absolute()
    metadata = read_metadata(path)
    config, model_dtype, quant = _model_description(path, metadata, kernel)
    if dtype is not None and resolve_dtype(dtype) != model_dtype:
        raise CheckpointError(
            f"{path}: the checkpoint stores {model_dtype.name} weights and is not re-cast; "
            f"load it with dtype=None instead of {resolve_dtype(dtype).name}"
        )
    try:
        abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=model_dtype, rngs=nnx.Rngs(0), quant=quant))
    except ValueError as err:
        raise CheckpointError(f"{path / METADATA_FILE}: model_config and quant describe no model: {err}") from err
    graphdef, abstract_state = nnx.split(abstract)
    parallel = None if mesh is None else TensorParallel.create(mesh, config, quant)
    leaves = named_leaves(abstract_state)
    if parallel is None:  # one device, whatever sharding the arrays were saved from
        shardings = dict.fromkeys(leaves, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    else:
        shardings = named_leaves(parallel.shardings(abstract_state))
    expected = {
        name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings[name]) for name, leaf in leaves.items()
    }
    _check_tensors(path / METADATA_FILE, "the tensors manifest", _manifest(path, metadata["tensors"]), expected)
    arrays = _restore(path / STATE_DIR, expected)
    treedef = jax.tree_util.tree_structure(abstract_state)
    state = jax.tree_util.tree_unflatten(treedef, [arrays[name] for name in expected])
    tokenizer = _load_tokenizer(path, metadata["tokenizer"])
    return Params(state=state, graphdef=graphdef, config=config, tokenizer=tokenizer, quant=quant, parallel=parallel)


def _quant_dict(quant: QuantFormat) -> dict[str, Any]:
    """The stored fields: `kernel` is how this machine runs the matmul, not part of the format. The KV options
    are written only when set, so a checkpoint without them reads as before (and older readers see no change)."""
    stored = {"weights": quant.weights, "kv_bits": quant.kv_bits, "group_size": quant.group_size}
    if quant.layer_kv_bits is not None:
        stored["layer_kv_bits"] = list(quant.layer_kv_bits)
    if quant.kv_clip is not None:
        stored["kv_clip"] = [list(pair) for pair in quant.kv_clip]
    if quant.kv_range_search:
        stored["kv_range_search"] = True
    if quant.qk_transform:
        stored["qk_transform"] = True
    return stored


def _model_description(path: Path, metadata: Mapping[str, Any], kernel: str):
    file = path / METADATA_FILE
    try:
        config = ModelConfig.from_dict(metadata["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: model_config is invalid: {err}") from err
    if not isinstance(metadata["dtype"], str):  # resolve_dtype(None) would pick the platform default
        raise CheckpointError(f"{file}: dtype must be a dtype name, got {metadata['dtype']!r}")
    try:
        model_dtype = resolve_dtype(metadata["dtype"])
    except ValueError as err:
        raise CheckpointError(f"{file}: dtype is invalid: {err}") from err
    quant = metadata["quant"]
    if quant is not None:
        try:
            quant = QuantFormat(**quant, kernel=kernel)
            quant.check_layers(config.num_layers)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{file}: quant is invalid: {err}") from err
    return config, model_dtype, quant


def _manifest(path: Path, tensors: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        return {name: (tuple(entry["shape"]), str(entry["dtype"])) for name, entry in tensors.items()}
    except (AttributeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path / METADATA_FILE}: tensors must map names to {{'shape': [...], 'dtype': ...}} ({err!r})"
        ) from err


def _check_tensors(where: Path, what: str, found: Mapping[str, tuple], expected: Mapping[str, Any]) -> None:
    """Every difference between `found` {name: (shape, dtype name)} and the model, reported at once."""
    problems = [
        f"missing tensor {name} {s.dtype.name}{list(s.shape)}" for name, s in expected.items() if name not in found
    ]
    problems += [f"unexpected tensor {name}" for name in found if name not in expected]
    for name, (shape, dtype) in found.items():
        if name not in expected:
            continue
        want = expected[name]
        if shape != tuple(want.shape):
            problems.append(f"tensor {name} has shape {list(shape)}, the model needs {list(want.shape)}")
        if dtype != want.dtype.name:
            problems.append(f"tensor {name} has dtype {dtype}, the model needs {want.dtype.name}")
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{where}: {what} does not match the model in model_config + quant:\n  {listed}")


def _restore(state_dir: Path, expected: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restores with the exact abstract tree after checking Orbax's own record of what the files hold, so an
    array whose stored dtype differs is refused instead of silently cast."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            stored = checkpointer.metadata(state_dir).item_metadata.tree
            _check_tensors(
                state_dir, "the stored arrays", {k: (tuple(m.shape), m.dtype.name) for k, m in stored.items()}, expected
            )
            return checkpointer.restore(state_dir, dict(expected))
    except CheckpointError:
        raise
    except Exception as err:  # Orbax and tensorstore raise ValueError, FileNotFoundError and bare Exception
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{state_dir}: the arrays cannot be read (missing or corrupt files): {reason}") from err


def _load_tokenizer(path: Path, folder: str | None):
    if folder is None:
        return None
    if not isinstance(folder, str) or Path(folder).name != folder or folder in ("", ".", ".."):
        raise CheckpointError(f"{path / METADATA_FILE}: tokenizer must name a folder inside the checkpoint")
    from transformers import AutoTokenizer  # imported on use, as transformers is slow to import

    try:
        return AutoTokenizer.from_pretrained(path / folder)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / folder}: the tokenizer cannot be loaded: {err}") from err


def _move_into_place(staging: Path, target: Path) -> None:
    """Renames `staging` to `target`; an existing target is moved aside first and restored if that fails."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f"{target.name}.old-{secrets.token_hex(6)}")
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the new checkpoint is in place; a leftover copy is only disk space
