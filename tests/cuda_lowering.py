"""Checking the Pallas GPU (Triton) lowering on a CPU-only machine: `lower_for_cuda` runs the real lowering and
`triton_module_text` reads back the Triton IR it produced.

jaxlib 0.10.2 embeds the Triton IR in a `__gpu$xla.gpu.triton` custom call; later versions compile it while
lowering (a `triton_kernel_call_ffi` call), which needs a GPU, so `lowering_test` skips there and the GPU tests
exercise the kernels instead.
"""

from __future__ import annotations

import jax
import jaxlib
import pytest

JAXLIB_EMBEDS_TRITON_IR = tuple(int(part) for part in jaxlib.__version__.split(".")[:3]) <= (0, 10, 2)
lowering_test = pytest.mark.skipif(not JAXLIB_EMBEDS_TRITON_IR, reason=f"jaxlib {jaxlib.__version__} > 0.10.2")


def lower_for_cuda(fn, *shapes_and_dtypes):
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes_and_dtypes]
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def triton_module_text(lowered) -> str:
    """The Triton IR inside the one `__gpu$xla.gpu.triton` custom call (jaxlib 0.10.2 keeps it as MLIR bytecode)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    def custom_calls(op):
        if op.name == "stablehlo.custom_call":
            yield op
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    yield from custom_calls(inner.operation)

    calls = custom_calls(lowered.compiler_ir("stablehlo").operation)
    [call] = [c for c in calls if "triton" in ir.StringAttr(c.attributes["call_target_name"]).value]
    bytecode = ir.StringAttr(call.attributes["mhlo.backend_config"]["ir"]).value_bytes
    context = mlir.JaxIrContext()
    context.append_dialect_registry(mlir.upstream_dialects)
    tt_dialect.register_dialect(context)
    context.load_all_available_dialects()
    with context:
        return str(ir.Module.parse(bytecode))
