"""GEMM speed: QoQ's W4A8 Pallas kernels against XLA baselines on Llama-3-8B projection shapes.

Systems, each an [M, K] × [K, N] product with an fp16/bf16 [M, N] result:
  xla_bf16    XLA bf16 dot.
  xla_w8a8    int8 × int8 → int32 dot_general, per-token × per-channel scales in a fused float32 epilogue.
  xla_w4a16   int4 weight codes converted to bf16 inside the dot's fusion, per-channel scale after.
  qoq_g128    `w4a8_gemm_g128` (progressive groups of 128), the Pallas Triton kernel.
  qoq_chn     `w4a8_gemm_chn` (per-channel), the Pallas Triton kernel.
The int8 systems take activations that are already quantized (the model does that in jnp, fused by XLA).

Timing: each system is jitted over `copies` sets of inputs (together larger than the GPU's L2, so no call finds
its weights in cache) and runs them back to back in one dispatch; after a warm-up, the median over `--repeats`
dispatches of (wall time / copies), with block_until_ready, is reported. TB/s counts weight + activation bytes;
TOPS counts 2·M·N·K. On a GPU every qoq shape is first checked against its jnp reference and the result is
recorded in the row. On CPU (or with --smoke) only tiny shapes run, and the qoq systems run through their jnp
references (interpret mode is far too slow to time): those rows say impl "reference" and measure nothing about
the kernels.

Run from the repository root:

    python benchmarks/gemm.py             # GPU: Llama-3-8B shapes × M ∈ {1, 16, 64, 256, 1024, 4096}
    python benchmarks/gemm.py --smoke     # tiny shapes, a few repeats (the default on CPU)
    python benchmarks/gemm.py --check     # GPU: compile both kernels at every M bucket, compare with the references
                                          # (CPU: the same check in interpret mode at the smoke shapes)

Writes benchmarks/results/gemm-<device>.json and a markdown table beside it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pallas_kernels.w4a8_gemm import (  # noqa: E402
    W4A8BlockSizes,
    w4a8_gemm_chn,
    w4a8_gemm_chn_reference,
    w4a8_gemm_g128,
    w4a8_gemm_g128_reference,
)

SYSTEMS = ("xla_bf16", "xla_w8a8", "xla_w4a16", "qoq_g128", "qoq_chn")
LLAMA3_8B_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # (N, K): qkv, o, gate_up, down
M_VALUES = (1, 16, 64, 256, 1024, 4096)
SMOKE_SHAPES = ((256, 128), (128, 256))
SMOKE_M_VALUES = (1, 16, 64)
GROUP_SIZE = 128
ROTATION_BYTES = 256 * 2**20  # per system and shape, the inputs cycled through: several times an H100's 50 MB L2

Operands = dict[str, jax.Array]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--m", type=int, nargs="+", default=None, help="default: 1 16 64 256 1024 4096")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 5 repeats; the default without a GPU")
    parser.add_argument("--check", action="store_true", help="kernels against references, every M bucket")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.on_gpu = jax.default_backend() == "gpu"
    args.smoke = args.smoke or not args.on_gpu
    if args.smoke:
        args.repeats = min(args.repeats, 5)
    args.shapes = SMOKE_SHAPES if args.smoke else LLAMA3_8B_SHAPES
    args.m = args.m or list(SMOKE_M_VALUES if args.smoke else M_VALUES)
    return args


# --- inputs -------------------------------------------------------------------------------------------------


def make_operands(system: str, m: int, n: int, k: int, key: jax.Array) -> Operands:
    """Random inputs of one system; any byte is a valid pair of packed uint4 codes."""
    keys = iter(jax.random.split(key, 8))

    def uniform(shape, low, high, dtype):
        return jax.random.uniform(next(keys), shape, jnp.float32, low, high).astype(dtype)

    def integers(shape, low, high, dtype):
        return jax.random.randint(next(keys), shape, low, high, jnp.int32).astype(dtype)

    if system == "xla_bf16":
        return dict(x=uniform((m, k), -1, 1, jnp.bfloat16), w=uniform((k, n), -0.05, 0.05, jnp.bfloat16))
    if system == "xla_w4a16":
        return dict(
            x=uniform((m, k), -1, 1, jnp.bfloat16),
            w_s4=integers((k, n), -8, 8, jnp.int4),
            scale=uniform((n,), 1e-3, 2e-2, jnp.bfloat16),
        )
    x_i8, x_scale = integers((m, k), -127, 128, jnp.int8), uniform((m,), 1e-3, 5e-2, jnp.float32)
    if system == "xla_w8a8":
        w_i8, scale = integers((k, n), -127, 128, jnp.int8), uniform((n,), 1e-3, 2e-2, jnp.float16)
        return dict(x_i8=x_i8, x_scale=x_scale, w_i8=w_i8, scale=scale)
    packed = integers((k, n // 2), 0, 256, jnp.uint8)
    if system == "qoq_g128":
        s1 = uniform((n,), 1e-3, 2e-2, jnp.float16)
        s2 = integers((k // GROUP_SIZE, n), 1, 8, jnp.int8)
        zero = (integers((k // GROUP_SIZE, n), 0, 16, jnp.int32) * s2).astype(jnp.int8)
        return dict(x_i8=x_i8, x_scale=x_scale, packed=packed, s1=s1, s2=s2, zero=zero)
    x_sum = jnp.sum(x_i8.astype(jnp.int32), axis=1)
    scale = uniform((n,), 1e-3, 2e-2, jnp.float32)
    zero = scale * uniform((n,), 0, 15, jnp.float32)
    return dict(x_i8=x_i8, x_scale=x_scale, x_sum=x_sum, packed=packed, scale=scale.astype(jnp.float16),
                zero=zero.astype(jnp.float16))


def streamed_bytes(operands: Operands) -> int:
    """The bytes of one call's inputs (weights, activations, scales): what it must read at least."""
    return sum(a.size // 2 if a.dtype == jnp.int4 else a.nbytes for a in operands.values())


# --- systems ------------------------------------------------------------------------------------------------


def xla_bf16(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def xla_w8a8(x_i8, x_scale, w_i8, scale):
    acc = jax.lax.dot_general(x_i8, w_i8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale[:, None] * scale.astype(jnp.float32)[None, :]).astype(jnp.float16)


def xla_w4a16(x, w_s4, scale):
    return (jnp.dot(x, w_s4.astype(jnp.bfloat16), preferred_element_type=jnp.float32) * scale).astype(jnp.bfloat16)


def system_fn(system: str, impl: str) -> Callable[..., jax.Array]:
    """The function timed for a system; impl "reference" swaps a qoq kernel for its jnp reference, "interpret"
    runs it in Pallas interpret mode."""
    kernels = {
        ("qoq_g128", "pallas"): functools.partial(w4a8_gemm_g128, group_size=GROUP_SIZE),
        ("qoq_g128", "interpret"): functools.partial(w4a8_gemm_g128, group_size=GROUP_SIZE, interpret=True),
        ("qoq_g128", "reference"): functools.partial(w4a8_gemm_g128_reference, group_size=GROUP_SIZE),
        ("qoq_chn", "pallas"): w4a8_gemm_chn,
        ("qoq_chn", "interpret"): functools.partial(w4a8_gemm_chn, interpret=True),
        ("qoq_chn", "reference"): w4a8_gemm_chn_reference,
    }
    return kernels.get((system, impl)) or {"xla_bf16": xla_bf16, "xla_w8a8": xla_w8a8, "xla_w4a16": xla_w4a16}[system]


# --- measuring ----------------------------------------------------------------------------------------------


def compare_with_reference(system: str, operands: Operands, impl: str = "pallas") -> dict:
    """Kernel against reference on one input: equal up to one fp16 rounding (float32 noise where terms cancel)."""
    actual = system_fn(system, impl)(**operands).astype(jnp.float32)
    expected = jax.jit(system_fn(system, "reference"))(**operands).astype(jnp.float32)
    excess = jnp.abs(actual - expected) - (
        jnp.finfo(jnp.float16).eps * jnp.abs(expected) + 1e-5 * jnp.max(jnp.abs(expected))
    )
    return {"matches_reference": bool(jnp.all(excess <= 0)), "max_abs_diff": float(jnp.max(jnp.abs(actual - expected)))}


def median_us(fn: Callable[..., jax.Array], copies: list[Operands], repeats: int) -> float:
    """Median over `repeats` dispatches of one jitted call that runs fn on every copy, per copy, in µs."""
    run_all = jax.jit(lambda copies: [fn(**operands) for operands in copies])
    jax.block_until_ready(run_all(copies))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run_all(copies))
        times.append((time.perf_counter() - start) / len(copies))
    return statistics.median(times) * 1e6


def benchmark(args: argparse.Namespace) -> list[dict]:
    rows = []
    key = jax.random.key(time.time_ns() % 2**31)
    for n, k in args.shapes:
        for m in args.m:
            for system in args.systems:
                impl = "xla" if system.startswith("xla") else ("pallas" if args.on_gpu else "reference")
                key, first_key = jax.random.split(key)
                copies = [make_operands(system, m, n, k, first_key)]
                num_bytes = streamed_bytes(copies[0])
                num_copies = min(16, max(2, math.ceil(ROTATION_BYTES / num_bytes))) if args.on_gpu else 2
                key, *copy_keys = jax.random.split(key, num_copies)
                copies += [make_operands(system, m, n, k, copy_key) for copy_key in copy_keys]
                row = dict(system=system, impl=impl, M=m, N=n, K=k)
                if impl == "pallas":
                    row |= compare_with_reference(system, copies[0])
                row["median_us"] = round(median_us(system_fn(system, impl), copies, args.repeats), 2)
                seconds = row["median_us"] * 1e-6
                row["TB_per_s"] = float(f"{num_bytes / seconds / 1e12:.4g}")
                row["TOPS"] = float(f"{2 * m * n * k / seconds / 1e12:.4g}")
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def check_kernels(shapes, m_values, impl: str) -> bool:
    """Each kernel with the default tiles of every M bucket against its reference; prints one line each."""
    key = jax.random.key(time.time_ns() % 2**31)
    all_match = True
    print("| system | M | N | K | tiles | matches reference | max abs diff |\n|---|---:|---:|---:|---|---|---:|")
    for n, k in shapes:
        for m in m_values:
            for system in ("qoq_g128", "qoq_chn"):
                key, operands_key = jax.random.split(key)
                result = compare_with_reference(system, make_operands(system, m, n, k, operands_key), impl)
                group_size = GROUP_SIZE if system == "qoq_g128" else None
                t = W4A8BlockSizes.for_shape(m, n, k, group_size=group_size)
                tiles = f"{t.block_m}×{t.block_n}×{t.block_k}, {t.num_warps} warps, {t.num_stages} stages"
                all_match &= result["matches_reference"]
                print(f"| {system} | {m} | {n} | {k} | {tiles} | {result['matches_reference']} | "
                      f"{result['max_abs_diff']:.3g} |", flush=True)
    return all_match


# --- reporting ----------------------------------------------------------------------------------------------

TABLE_HEADER = (
    "| system | impl | M | N | K | median µs | TB/s (weights + activations) | TOPS | matches reference |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---|"
)


def format_row(row: dict) -> str:
    check = {True: "yes", False: "**NO**"}.get(row.get("matches_reference"), "–")
    return (
        f"| {row['system']} | {row['impl']} | {row['M']} | {row['N']} | {row['K']} | {row['median_us']:.1f} | "
        f"{row['TB_per_s']:.3g} | {row['TOPS']:.3g} | {check} |"
    )


def device_description() -> tuple[str, str]:
    """(file-name slug, words) for the first device: "cpu" and the processor's model on CPU, else the GPU's kind."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-"), device.device_kind
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return "cpu", f"cpu: {models[0] if models else platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    args = parse_args()
    if args.check:
        sys.exit(0 if check_kernels(args.shapes, args.m, "pallas" if args.on_gpu else "interpret") else 1)
    slug, device = device_description()
    print(TABLE_HEADER, flush=True)
    rows = benchmark(args)
    result = {"device": device, "jax_version": jax.__version__, "smoke": args.smoke, "repeats": args.repeats,
              "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"gemm-{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
    title = f"GEMM speed on {device}, jax {jax.__version__}, median of {args.repeats} dispatches"
    if args.smoke:
        title += (" — SMOKE RUN on tiny shapes: qoq rows are the jnp references (impl 'reference'), not the Pallas"
                  " kernels, and no number here says anything about GPU speed")
    table = "\n".join([TABLE_HEADER, *map(format_row, rows)])
    (args.out_dir / f"gemm-{slug}.md").write_text(f"{title}\n\n{table}\n")


if __name__ == "__main__":
    main()
