"""CUDA without a GPU: lower Pallas Triton kernels for CUDA on a CPU-only machine, read back the Triton IR they
embed, and compile that IR to cubin with XLA's own Triton and ptxas.

* `lower_for_cuda` runs the real Pallas GPU lowering. jax 0.10.2 lowers without a device (and assumes sm_90);
  jax ≥ 0.11 needs an abstract GPU to lower for, so the lowering runs inside an abstract mesh whose device is the
  target's GPU (`Target.device_kind`). Either way the Triton IR comes out embedded, as MLIR bytecode, in one
  `__gpu$xla.gpu.triton` custom call per kernel (`triton_kernels`).
* `compile_to_cubin` hands that bytecode to the Triton compiler bundled with the jaxlib CUDA plugin (the one XLA
  compiles the kernel with on a GPU: `jax._src.lib.triton.compile`, registered when the `jax-cuda12-pjrt`
  plugin initializes, which it does without a GPU under JAX_PLATFORMS=cpu), which returns PTX and the shared
  memory the kernel needs; `ptxas -v` from `nvidia-cuda-nvcc-cu12` assembles the PTX and reports registers and
  spills. jaxlib 0.10.2's plugin has that entry; 0.11.2's does not (`compile_tools_missing` says why it skips).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib
import pytest

JAXLIB_VERSION = tuple(int(part) for part in jaxlib.__version__.split(".")[:3])
# For tests that call `.lower(lowering_platforms=("cuda",))` themselves: without a GPU that works up to jaxlib
# 0.10.2; later ones need the abstract GPU that `lower_for_cuda` sets up.
lowering_test = pytest.mark.skipif(
    JAXLIB_VERSION > (0, 10, 2), reason=f"jaxlib {jaxlib.__version__} lowers for CUDA only for an abstract GPU"
)
# Pinned by .ci/run's compile leg; `compile_tools_missing` names them.
COMPILE_TOOLS = ("jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2", "nvidia-cuda-nvcc-cu12==12.9.86")
MAX_REGISTERS = 255  # per thread, CUDA's architectural limit: a kernel at the limit has no headroom left


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU to compile for: its arch, a device of that arch (for jax ≥ 0.11's abstract lowering) and its opt-in
    shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)."""

    name: str
    compute_capability: str
    device_kind: str
    num_cores: int
    max_shared_memory: int


SM_90 = Target("sm_90", "9.0", "NVIDIA H200", 132, 232_448)
SM_80 = Target("sm_80", "8.0", "NVIDIA A100-SXM4-80GB", 108, 166_912)
TARGETS = (SM_90, SM_80)


def lower_for_cuda(fn, *shapes_and_dtypes, target: Target = SM_90):
    """`jax.jit(fn)` lowered for CUDA from (shape, dtype) pairs, for `target`'s GPU."""
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes_and_dtypes]
    if JAXLIB_VERSION <= (0, 10, 2):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    from jax._src.mesh import AbstractDevice, AbstractMesh

    device = AbstractDevice(device_kind=target.device_kind, num_cores=target.num_cores, platform="gpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):  # trace inside too
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One `__gpu$xla.gpu.triton` custom call: the kernel's name, its Triton IR and the launch parameters that
    the Triton compiler takes."""

    name: str
    bytecode: bytes
    num_warps: int
    num_stages: int

    @functools.cached_property
    def text(self) -> str:
        """The Triton IR as text (MLIR bytecode parsed with jaxlib's Triton dialect)."""
        from jax._src.interpreters import mlir
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect as tt_dialect

        context = mlir.JaxIrContext()
        context.append_dialect_registry(mlir.upstream_dialects)
        tt_dialect.register_dialect(context)
        context.load_all_available_dialects()
        with context:
            return str(ir.Module.parse(self.bytecode))


def triton_kernels(lowered) -> list[TritonKernel]:
    """Every Triton kernel the lowered program launches, in program order."""
    from jax._src.lib.mlir import ir

    def custom_calls(op):
        if op.name == "stablehlo.custom_call":
            yield op
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    yield from custom_calls(inner.operation)

    def integer(config, key):
        return ir.IntegerAttr(config[key]).value

    kernels = []
    for call in custom_calls(lowered.compiler_ir("stablehlo").operation):
        if ir.StringAttr(call.attributes["call_target_name"]).value != "__gpu$xla.gpu.triton":
            continue
        config = call.attributes["mhlo.backend_config"]
        kernels.append(
            TritonKernel(
                name=ir.StringAttr(config["name"]).value,
                bytecode=ir.StringAttr(config["ir"]).value_bytes,
                num_warps=integer(config, "num_warps"),
                num_stages=integer(config, "num_stages"),
            )
        )
    return kernels


def triton_module_text(lowered) -> str:
    """The Triton IR of a program that launches exactly one Triton kernel."""
    [kernel] = triton_kernels(lowered)
    return kernel.text


# --- compiling to cubin -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What the GPU would get: ptxas's resource figures and the tensor-core instructions in the PTX."""

    target: str
    ptx_target: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_frame_bytes: int
    shared_memory_bytes: int
    mma_instructions: dict[str, int]

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


def compile_tools_missing() -> str | None:
    """Why `compile_to_cubin` cannot run here (None when it can)."""
    from jax._src.lib import triton

    if not hasattr(triton, "compile"):
        return f"jaxlib {jaxlib.__version__} has no Triton compile entry (0.10.2's CUDA plugin has one)"
    jax.devices()  # plugins register their Triton compiler when the backends initialize
    if not triton.has_compilation_handler("cuda"):
        return (
            f"no Triton compiler for CUDA: `pip install --no-deps {' '.join(COMPILE_TOOLS)}` and run with "
            "JAX_PLATFORMS=cpu (.ci/run's compile leg does)"
        )
    if _ptxas() is None:
        return f"no ptxas: `pip install --no-deps {COMPILE_TOOLS[-1]}`"
    return None


@functools.cache
def _ptxas() -> str | None:
    try:
        from nvidia import cuda_nvcc
    except ImportError:
        return shutil.which("ptxas")
    path = Path(next(iter(cuda_nvcc.__path__))) / "bin" / "ptxas"
    return str(path) if path.is_file() else shutil.which("ptxas")


def ptxas_version() -> str:
    output = subprocess.run([_ptxas(), "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release [\d.]+, V[\d.]+", output).group(0)


_MMA = re.compile(r"\b((?:wgmma\.mma_async|mma)\.sync\.aligned\.[\w.]+)")
_PTXAS_FIGURES = {
    "stack_frame_bytes": r"(\d+) bytes stack frame",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
    "registers": r"Used (\d+) registers",
}


def compile_to_cubin(kernel: TritonKernel, target: Target) -> CompileReport:
    """The kernel compiled by XLA's Triton for `target`, then assembled by ptxas (PTX for sm_90 comes out as
    sm_90a, which wgmma needs)."""
    from jax._src.lib import triton

    result = triton.compile(
        "cuda",
        kernel.bytecode,
        target.compute_capability,
        num_warps=kernel.num_warps,
        num_ctas=1,
        num_stages=kernel.num_stages,
    )
    ptx_target = re.search(r"^\.target\s+(\w+)", result.asm, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as scratch:
        ptx = Path(scratch) / f"{kernel.name}.ptx"
        ptx.write_text(result.asm)
        assembled = subprocess.run(
            [_ptxas(), "-v", f"-arch={ptx_target}", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
            capture_output=True,
            text=True,
        )
    if assembled.returncode:
        raise RuntimeError(f"ptxas failed on {kernel.name} for {target.name}:\n{assembled.stderr}")
    figures = {name: int(re.search(pattern, assembled.stderr).group(1)) for name, pattern in _PTXAS_FIGURES.items()}
    mma: dict[str, int] = {}
    for instruction in _MMA.findall(result.asm):
        mma[instruction] = mma.get(instruction, 0) + 1
    return CompileReport(
        target=target.name,
        ptx_target=ptx_target,
        shared_memory_bytes=result.smem_bytes,
        mma_instructions=dict(sorted(mma.items())),
        **figures,
    )
