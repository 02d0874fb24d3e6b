"""Every kernel configuration the model and the engine launch (the table in benchmarks/kernel_compile.py),
lowered for CUDA and compiled to cubin for sm_90 and sm_80 on this CPU-only machine by XLA's own Triton and
ptxas: it compiles, spills nothing, leaves register headroom, fits the opt-in shared memory per block, and runs
its dots on tensor cores of the right type (int8 for the GEMMs, bf16 for attention).

The lowering half runs on every jax CI covers (on 0.11 through an abstract GPU of each arch). The compile half
needs the CUDA compile tools (`tests/cuda_lowering.py`: jax-cuda12-plugin/pjrt 0.10.2 and ptxas), which
.ci/run's compile leg installs; elsewhere it skips with the reason.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from cuda_lowering import compile_tools_missing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_compile  # noqa: E402

CONFIGURATIONS = [
    pytest.param(case, target, id=f"{case.name}-{target.name}".replace(" ", "-"))
    for case, target in kernel_compile.COMPILED_CONFIGURATIONS
]


@pytest.fixture(scope="module")
def compile_tools():
    missing = compile_tools_missing()
    if missing:
        pytest.skip(missing)


@pytest.mark.parametrize("case, target", CONFIGURATIONS)
def test_lowers_to_one_triton_kernel(case, target):
    """The lowering for the target's GPU yields the named kernel with its dots in the case's dtype."""
    kernel = kernel_compile.lowered_kernel(case, target)
    assert kernel.name.startswith(case.kernel)
    dots = re.findall(r"tt\.dot .*: tensor<\w+x(\w+)> \* tensor<\w+x(\w+)>", kernel.text)
    operand = {"s8": "i8", "bf16": "bf16"}[case.mma_dtype]
    assert dots and all(dot == (operand, operand) for dot in dots), dots


@pytest.mark.parametrize("case, target", CONFIGURATIONS)
def test_compiles_within_limits(compile_tools, case, target):
    report = kernel_compile.compiled(case, target)
    assert report.ptx_target.startswith(target.name)
    assert not kernel_compile.limits_broken(report, case, target), (case.used_for, report)


def test_table_covers_every_kernel_and_arch():
    """Both GEMM recipes at every M bucket and both attentions at each KV width, on both archs."""
    kernels = {(case.kernel, target.name) for case, target in kernel_compile.COMPILED_CONFIGURATIONS}
    expected = {"w4a8_gemm_g128", "w4a8_gemm_g64", "w4a8_gemm_chn"} | {
        f"paged_{phase}_attention_kv{bits}" for phase in ("decode", "prefill") for bits in (4, 8, 16)
    }
    assert {kernel for kernel, _ in kernels} == expected
    assert all((kernel, arch) in kernels for kernel in expected for arch in ("sm_90", "sm_80"))
    gemm_ms = {use.rsplit("M=", 1)[1] for case in kernel_compile.KERNEL_CASES for use in case.used_for.split("; ")
               if "M=" in use}  # fmt: skip
    assert gemm_ms == {str(m) for m in kernel_compile.GEMM_MS}


def test_instruction_operand_reads_both_mma_forms():
    assert kernel_compile.instruction_operand("mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32") == "s8"
    assert kernel_compile.instruction_operand("wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8") == "s8"
    assert kernel_compile.instruction_operand("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "bf16"
