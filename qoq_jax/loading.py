"""`qoq_jax.load`: the one entry from a model source to `Params`.

qoq-jax checkpoints (`qoq_jax.checkpoint`) are read here directly. Importing HF directories and GGUF files is
the converters' job, and `qoq_jax` must not depend on them; they register themselves under the
`qoq_jax.importers` entry-point group and are found at call time.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from qoq_jax.checkpoint import is_checkpoint, load_checkpoint
from qoq_jax.errors import UnsupportedModelError
from jax.sharding import Mesh

from qoq_jax.params import Params

IMPORTER_GROUP = "qoq_jax.importers"


def load(source: str | os.PathLike, *, dtype=None, kernel: str = "auto", mesh: Mesh | None = None) -> Params:
    """Loads a qoq-jax checkpoint directory, "smollm2" (the embedded SmolLM2-135M GGUF), an HF model directory
    or a .gguf file.

    dtype: "float32" / "bfloat16" / "float16"; None means float32 on CPU and bfloat16 on accelerators for
    imports, and the stored dtype for a checkpoint (which refuses any other: see `load_checkpoint`).
    kernel: how a checkpoint's quantized matmuls run ("auto", "pallas", "reference"); imported models are float.
    mesh: split the model over this mesh's "tensor" axis (tensor parallelism, `qoq_jax.make_mesh`). A checkpoint
    is restored straight into its shardings; an import is read on the host and each device receives only its shards.
    """
    if is_checkpoint(source):
        return load_checkpoint(source, dtype=dtype, kernel=kernel, mesh=mesh)
    importers = sorted(entry_points(group=IMPORTER_GROUP), key=lambda ep: ep.name)
    if not importers:
        raise UnsupportedModelError(
            f"no model importer is installed (entry-point group {IMPORTER_GROUP!r}); "
            "install the qoq-jax distribution, which provides the converters package"
        )
    return importers[0].load()(source, dtype=dtype, mesh=mesh)
