"""Every Pallas kernel configuration the model and the engine launch, compiled to cubin for sm_90 and sm_80 on a
CPU-only machine: registers, spills, shared memory and tensor-core instructions per kernel and arch.

`KERNEL_CASES` is the table, one entry per distinct compiled kernel:
  * the W4A8 GEMMs (progressive groups and per-channel) with the default tiles of every M bucket
    (`W4A8BlockSizes.for_shape`) over each model's linear shapes, one entry per distinct tile;
  * the paged decode attention at KV4 / KV8 / KV16 for the decode batches of the e2e benchmark and the engine;
  * the paged prefill ("extend") attention at KV4 / KV8 / KV16 for prompt chunks over cached pages.
Each entry lowers through the real Pallas Triton lowering (tests/cuda_lowering.py); XLA's own Triton (bundled with
the jaxlib CUDA plugin) compiles the IR to PTX and ptxas assembles it. tests/test_kernel_compile.py asserts the
limits over the same table: compiles, no spills, registers < 255, shared memory within the opt-in per-block
limit, int8 dots as int8 tensor-core instructions (`mma…s8` / `wgmma…s8`), float dots as float ones.

A new kernel is one more builder in `KERNEL_CASES`.

Run from the repository root, with the compile tools installed (`pip install --no-deps jax-cuda12-plugin==0.10.2
jax-cuda12-pjrt==0.10.2 nvidia-cuda-nvcc-cu12==12.9.86` next to jax 0.10.2):

    JAX_PLATFORMS=cpu python benchmarks/kernel_compile.py

Writes benchmarks/results/kernel-compile.json and a markdown table beside it (.md), and prints the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from cuda_lowering import (  # noqa: E402
    MAX_REGISTERS,
    TARGETS,
    CompileReport,
    Target,
    TritonKernel,
    compile_to_cubin,
    compile_tools_missing,
    lower_for_cuda,
    ptxas_version,
    triton_kernels,
)

from pallas_kernels.paged_attention import DecodeAttentionBlockSizes, code_width, paged_decode_attention  # noqa: E402
from pallas_kernels.paged_prefill_attention import PrefillAttentionBlockSizes, paged_prefill_attention  # noqa: E402
from pallas_kernels.w4a8_gemm import W4A8BlockSizes, w4a8_gemm_chn, w4a8_gemm_g128  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """What the kernels see of a model: its decoder linears and attention heads."""

    name: str
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    group_size: int  # the g128 recipe's groups (64 where hidden is not a multiple of 128)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(N, K) of each decoder linear."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q": (q, self.hidden),
            "k/v": (kv, self.hidden),
            "o": (self.hidden, q),
            "gate/up": (self.intermediate, self.hidden),
            "down": (self.hidden, self.intermediate),
        }


LLAMA3_8B = ModelShapes("Llama-3-8B", 4096, 14336, 32, 8, 128, group_size=128)
SMOLLM2 = ModelShapes("SmolLM2-135M", 576, 1536, 9, 3, 64, group_size=64)
MODELS = (LLAMA3_8B, SMOLLM2)
# One M per bucket of `W4A8BlockSizes.for_shape`: decode batches up to prefill chunks.
GEMM_MS = (16, 64, 256, 1024, 4096)
PAGE_SIZE = 64  # the engine's and the e2e benchmark's page size
# (model, batch, context): one long row (the most splits), a full decode batch, SmolLM2 as the tests serve it.
DECODE_BATCHES = ((LLAMA3_8B, 1, 8192), (LLAMA3_8B, 64, 2048), (SMOLLM2, 16, 2048))
# (model, rows, chunk tokens, context): prompt chunks continuing cached rows, as the engine schedules them.
PREFILL_CHUNKS = ((LLAMA3_8B, 4, 512, 4096), (SMOLLM2, 2, 256, 2048))


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One compiled kernel: how to lower it, where the model uses it, and the dtype its dots must run in."""

    name: str
    kernel: str
    used_for: str
    fn: Callable = dataclasses.field(compare=False)
    args: tuple = dataclasses.field(compare=False)
    mma_dtype: str  # the operand type of the tensor-core instructions: "s8" or "bf16"
    targets: tuple[Target, ...] = TARGETS  # the archs that launch this configuration

    def lower(self, target: Target):
        return lower_for_cuda(self.fn, *self.args, target=target)


def gemm_cases() -> list[KernelCase]:
    """Both W4A8 GEMMs at every M bucket over every linear of each model, one case per distinct tile (the
    default tiles depend on the arch: a case lists the archs that pick it)."""
    cases: dict[tuple, KernelCase] = {}
    uses: dict[tuple, list[str]] = {}
    targets: dict[tuple, list[Target]] = {}
    for model in MODELS:
        for m in GEMM_MS:
            for linear, (n, k) in model.linears().items():
                for recipe in ("g128", "chn"):
                    group_size = model.group_size if recipe == "g128" else None
                    for target in TARGETS:
                        blocks = W4A8BlockSizes.for_shape(
                            m, n, k, group_size=group_size, compute_capability=float(target.compute_capability)
                        )
                        key = (recipe, group_size, blocks)
                        if key not in cases:
                            cases[key] = _gemm_case(recipe, m, n, k, group_size, blocks)
                        if target not in targets.setdefault(key, []):
                            targets[key].append(target)
                        uses.setdefault(key, []).append(f"{model.name} {linear} M={m}")
    return [
        dataclasses.replace(case, used_for="; ".join(dict.fromkeys(uses[key])), targets=tuple(targets[key]))
        for key, case in cases.items()
    ]


def _gemm_case(recipe, m, n, k, group_size, blocks: W4A8BlockSizes) -> KernelCase:
    tiles = f"bm{blocks.block_m}_bn{blocks.block_n}_bk{blocks.block_k}_w{blocks.num_warps}_s{blocks.num_stages}"
    if recipe == "g128":
        fn = functools.partial(w4a8_gemm_g128, group_size=group_size, block_sizes=blocks)
        groups = (k // group_size, n)
        args = (((m, k), jnp.int8), ((m,), jnp.float32), ((k, n // 2), jnp.uint8), ((n,), jnp.float16),
                (groups, jnp.int8), (groups, jnp.int8))  # fmt: skip
        kernel = f"w4a8_gemm_g{group_size}"
    else:
        fn = functools.partial(w4a8_gemm_chn, block_sizes=blocks)
        args = (((m, k), jnp.int8), ((m,), jnp.float32), ((m,), jnp.int32), ((k, n // 2), jnp.uint8),
                ((n,), jnp.float16), ((n,), jnp.float16))  # fmt: skip
        kernel = "w4a8_gemm_chn"
    return KernelCase(f"{kernel} {tiles}", kernel, "", fn, args, mma_dtype="s8")


def decode_attention_cases() -> list[KernelCase]:
    cases = []
    for model, batch, context in DECODE_BATCHES:
        pages_per_row = context // PAGE_SIZE
        num_pages = batch * pages_per_row
        for bits in (4, 8, 16):
            blocks = DecodeAttentionBlockSizes.for_shape(batch, model.num_kv_heads, pages_per_row, PAGE_SIZE, bits=bits)
            k_pool, v_pool, *scales = _pools(model, num_pages, bits)
            args = (((batch, model.num_heads, model.head_dim), jnp.bfloat16), k_pool, v_pool,
                    ((batch, pages_per_row), jnp.int32), ((batch,), jnp.int32), *scales)  # fmt: skip
            label = (
                f"{model.name} b{batch} ctx{context} p{blocks.pages_per_block}_s{blocks.num_splits}_w{blocks.num_warps}"
            )
            used_for = f"{model.name} decode, batch {batch}, context {context}, bf16 queries"
            cases.append(_attention_case("decode", paged_decode_attention, bits, blocks, label, args, used_for))
    return cases


def _attention_case(phase, entry, bits, blocks, label, args, used_for) -> KernelCase:
    kernel = f"paged_{phase}_attention_kv{bits}"
    fn = functools.partial(entry, bits=bits, block_sizes=blocks)
    return KernelCase(f"{kernel} {label}", kernel, used_for, fn, args, mma_dtype="bf16")


def _pools(model: ModelShapes, num_pages: int, bits: int) -> list:
    """(shape, dtype) of the K and V pools and, below 16 bits, their four scale / zero arrays."""
    pool = ((model.num_kv_heads, num_pages, PAGE_SIZE, code_width(model.head_dim, bits)),
            jnp.uint8 if bits < 16 else jnp.bfloat16)  # fmt: skip
    return [pool, pool] + [((model.num_kv_heads, num_pages, PAGE_SIZE), jnp.float16)] * (4 if bits < 16 else 0)


def prefill_attention_cases() -> list[KernelCase]:
    cases = []
    for model, batch, chunk, context in PREFILL_CHUNKS:
        pages_per_row = context // PAGE_SIZE
        blocks = PrefillAttentionBlockSizes.for_shape(model.num_heads // model.num_kv_heads, PAGE_SIZE, model.head_dim)
        for bits in (4, 8, 16):
            k_pool, v_pool, *scales = _pools(model, batch * pages_per_row, bits)
            rows = ((batch,), jnp.int32)
            args = (((batch, chunk, model.num_heads, model.head_dim), jnp.bfloat16), k_pool, v_pool,
                    ((batch, pages_per_row), jnp.int32), rows, rows, *scales)  # fmt: skip
            label = (
                f"{model.name} {batch}×{chunk} ctx{context} "
                f"q{blocks.query_tokens}_p{blocks.pages_per_block}_w{blocks.num_warps}"
            )
            used_for = f"{model.name} prompt chunks of {chunk} tokens over cached pages, bf16 queries"
            cases.append(_attention_case("prefill", paged_prefill_attention, bits, blocks, label, args, used_for))
    return cases


KERNEL_CASES: tuple[KernelCase, ...] = (*gemm_cases(), *decode_attention_cases(), *prefill_attention_cases())
COMPILED_CONFIGURATIONS = tuple((case, target) for case in KERNEL_CASES for target in case.targets)


@functools.cache
def lowered_kernel(case: KernelCase, target: Target) -> TritonKernel:
    """The case's one Triton kernel, lowered for `target`'s GPU (cached: the tests and the report share it)."""
    [kernel] = triton_kernels(case.lower(target))
    return kernel


@functools.cache
def compiled(case: KernelCase, target: Target) -> CompileReport:
    return compile_to_cubin(lowered_kernel(case, target), target)


def limits_broken(report: CompileReport, case: KernelCase, target: Target) -> list[str]:
    """Every limit the compiled kernel breaks, in words (empty: within all of them)."""
    broken = []
    if report.spill_bytes:
        broken.append(f"spills {report.spill_bytes} bytes")
    if report.registers >= MAX_REGISTERS:
        broken.append(f"{report.registers} registers: no headroom under {MAX_REGISTERS}")
    if report.shared_memory_bytes > target.max_shared_memory:
        broken.append(f"{report.shared_memory_bytes} B shared memory > {target.max_shared_memory} B")
    operands = {instruction_operand(name) for name in report.mma_instructions}
    if operands != {case.mma_dtype}:
        broken.append(f"tensor-core instructions {sorted(report.mma_instructions)}, expected {case.mma_dtype} ones")
    return broken


def instruction_operand(instruction: str) -> str:
    """The A/B operand type of an `mma.sync` / `wgmma.mma_async` instruction (its second-to-last or last part)."""
    parts = instruction.split(".")
    # mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32 / wgmma…m64n32k32.s32.s8.s8 / …f32.bf16.bf16
    return parts[-2] if parts[0] == "mma" else parts[-1]


def report_row(case: KernelCase, report: CompileReport, target: Target) -> dict:
    return {
        "kernel": case.kernel,
        "name": case.name,
        "target": target.name,
        **{key: value for key, value in dataclasses.asdict(report).items() if key != "target"},
        "shared_memory_limit": target.max_shared_memory,
        "limits_broken": limits_broken(report, case, target),
        "used_for": case.used_for,
    }


TABLE_HEADER = (
    "| kernel configuration | arch | registers | spills (B) | shared memory (B) | tensor-core instructions | "
    "within limits |\n|---|---|---:|---:|---:|---|---|"
)


def format_row(row: dict) -> str:
    mma = ", ".join(f"{count}× `{name}`" for name, count in row["mma_instructions"].items())
    verdict = "yes" if not row["limits_broken"] else "**NO**: " + "; ".join(row["limits_broken"])
    spills = row["spill_store_bytes"] + row["spill_load_bytes"]
    return (
        f"| {row['name']} | {row['ptx_target']} | {row['registers']} | {spills} | {row['shared_memory_bytes']} | "
        f"{mma} | {verdict} |"
    )


def main() -> None:
    missing = compile_tools_missing()
    if missing:
        raise SystemExit(f"cannot compile for CUDA here: {missing}")
    load = os.getloadavg()
    print(TABLE_HEADER, flush=True)
    rows = []
    for case, target in COMPILED_CONFIGURATIONS:
        rows.append(report_row(case, compiled(case, target), target))
        print(format_row(rows[-1]), flush=True)
    result = {
        "jax_version": jax.__version__,
        "compiler": "XLA's Triton (jax-cuda12-plugin) → PTX, " + ptxas_version(),
        "load_average_at_start": load,
        "all_within_limits": not any(row["limits_broken"] for row in rows),
        "rows": rows,
    }
    out_dir = REPO_ROOT / "benchmarks" / "results"
    (out_dir / "kernel-compile.json").write_text(json.dumps(result, indent=1) + "\n")
    title = (
        f"# Kernel compile figures (no GPU: jax {jax.__version__}, {result['compiler']})\n\n"
        "Registers per thread and spills from `ptxas -v`, shared memory per block from Triton; limits: no spill, "
        f"< {MAX_REGISTERS} registers, shared memory ≤ the opt-in per-block limit "
        f"({', '.join(f'{t.max_shared_memory} B on {t.name}' for t in TARGETS)}), int8 dots on int8 tensor cores."
    )
    table = "\n".join([TABLE_HEADER, *map(format_row, rows)])
    (out_dir / "kernel-compile.md").write_text(f"{title}\n\n{table}\n")
    print(f"\n{len(rows)} compiled; all within limits: {result['all_within_limits']}")


if __name__ == "__main__":
    main()
