"""Decode-attention speed: QoQ's KV4 / KV8 paged Pallas kernel against bf16 baselines on Llama-3-8B heads.

Every system attends one bf16 query token per sequence (32 query heads, 8 KV heads, head_dim 128) over a cache
of `context` tokens per sequence, every sequence full (lengths = context):
  qoq_kv4         `paged_decode_attention(bits=4)`: packed uint4 codes + fp16 scale/zero per token-head.
  qoq_kv8         `paged_decode_attention(bits=8)`: uint8 codes + fp16 scale/zero per token-head.
  bf16_paged      jax's own Pallas GPU kernel, `jax.experimental.pallas.ops.gpu.paged_attention`, on bf16 pages.
                  It does not scale the logits, so q is multiplied by head_dim^-0.5 first; it gets the same split
                  count and tokens per step as the qoq kernel (`DecodeAttentionBlockSizes.for_shape`, cut to what
                  it accepts: splits dividing the pages per sequence) and its own default warps and stages.
  xla_dense_bf16  `jax.nn.dot_product_attention(implementation="xla")` over a dense [B, S, Hkv, D] bf16 cache.
Paged systems use QServe's page size of 64 tokens; the pool holds exactly batch·context/64 pages and the block
tables are a random permutation of them, so no sequence's pages are contiguous.

Timing: as in gemm.py, each system is jitted over `copies` independent input sets (together larger than the GPU's
L2, at least two where they fit, and at most ~24 GB in all) run back to back in one dispatch; after a warm-up,
the median over `--repeats` dispatches of (wall time / copies), with block_until_ready, is reported. GB/s counts
the bytes a call must move: the KV cache of the context tokens (codes and scales/zeros, K and V), q, block tables,
lengths and the output. The same run measures the HBM bandwidth (`hbm_gb_per_s`: a 2 GiB float32 x + 1, bytes read +
written / time), and each row's `fraction_of_hbm` is its GB/s over that; qoq rows get `speedup_vs_bf16_paged`
(bf16_paged time / their time at the same batch and context) where both ran their Pallas kernels, never on CPU,
where the jnp reference against an interpreted kernel would be a meaningless ratio (the column is left out).
The summary checks the issue's goal: KV4 at least 1.8× faster than bf16_paged and at least 70% of the measured
HBM bandwidth at every context ≥ 2048.

On a GPU every qoq row is first checked against `paged_decode_attention_reference` and the result is recorded
in the row (`max_abs_err`, its `tolerance`, `matches_reference`). On CPU (or with --smoke) only tiny shapes
(8 query heads, 2 KV heads, head_dim 64, 16-token pages) run: the qoq systems run their jnp references (impl
"reference"), bf16_paged runs jax's kernel in interpret mode (impl "interpret"), and no number says anything
about GPU speed.

Run from the repository root:

    python benchmarks/attention.py            # GPU: batch ∈ {1, 16, 64, 256} × context ∈ {512, 2048, 8192}
    python benchmarks/attention.py --smoke    # tiny shapes, a few repeats (the default on CPU)
    python benchmarks/attention.py --check    # GPU: qoq_kv4 / qoq_kv8 at every shape against the reference

Writes benchmarks/results/attention-<device>.json and a markdown table beside it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import math
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged_attention

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemm import ROTATION_BYTES, device_description, median_us, streamed_bytes  # noqa: E402

from pallas_kernels.paged_attention import (  # noqa: E402
    DecodeAttentionBlockSizes,
    code_width,
    paged_decode_attention,
    paged_decode_attention_reference,
)


@dataclasses.dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int


SYSTEMS = ("qoq_kv4", "qoq_kv8", "bf16_paged", "xla_dense_bf16")
QOQ_BITS = {"qoq_kv4": 4, "qoq_kv8": 8}
LLAMA3_8B_HEADS = Heads(num_heads=32, num_kv_heads=8, head_dim=128, page_size=64)
BATCHES = (1, 16, 64, 256)
CONTEXTS = (512, 2048, 8192)
SMOKE_HEADS = Heads(num_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
SMOKE_BATCHES = (1, 4)
SMOKE_CONTEXTS = (64, 128)
MAX_INPUT_BYTES = 24 * 10**9  # all copies of one system's inputs together, well inside an 80 GB GPU
HBM_PROBE_BYTES = 2 * 2**30  # the array of the bandwidth probe (CPU: 256 MiB)
REFERENCE_CHUNK_TOKENS = 16 * 8192  # the reference gathers float32 K and V: at most this many tokens at a time
GOAL_MIN_CONTEXT, GOAL_SPEEDUP, GOAL_FRACTION_OF_HBM = 2048, 1.8, 0.7
GOAL = (
    f"KV4 (qoq_kv4) ≥ {GOAL_SPEEDUP}× faster than bf16_paged and ≥ {GOAL_FRACTION_OF_HBM:.0%} of the measured HBM "
    f"bandwidth at context ≥ {GOAL_MIN_CONTEXT}"
)

Operands = dict[str, jax.Array]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 16 64 256 (smoke: 1 4)")
    parser.add_argument("--context", type=int, nargs="+", default=None, help="default: 512 2048 8192 (smoke: 64 128)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 5 repeats; the default without a GPU")
    parser.add_argument("--check", action="store_true", help="GPU only: qoq kernels against the reference, every shape")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.on_gpu = jax.default_backend() == "gpu"
    if args.check and not args.on_gpu:
        parser.error("--check compiles the real kernels and needs a GPU")
    args.smoke = args.smoke or not args.on_gpu
    if args.smoke:
        args.repeats = min(args.repeats, 5)
    args.heads = SMOKE_HEADS if args.smoke else LLAMA3_8B_HEADS
    args.batch = args.batch or list(SMOKE_BATCHES if args.smoke else BATCHES)
    args.context = args.context or list(SMOKE_CONTEXTS if args.smoke else CONTEXTS)
    bad = [c for c in args.context if c % args.heads.page_size]
    if bad:
        parser.error(f"contexts must be multiples of the page size {args.heads.page_size}; got {bad}")
    return args


# --- inputs -------------------------------------------------------------------------------------------------


def make_operands(system: str, batch: int, context: int, heads: Heads, key: jax.Array) -> Operands:
    """Random inputs of one system, keyword-named as its function takes them. Any byte is a valid KV4 or KV8 code
    byte; a token-head's values span a range of 1..4 around an offset (x̂ = code·scale − zero)."""
    keys = iter(jax.random.split(key, 8))
    hkv, d, page = heads.num_kv_heads, heads.head_dim, heads.page_size
    pages_per_sequence = context // page
    num_pages = batch * pages_per_sequence
    # Large q (logits of std ~3) so the softmax is peaked and the output is far from the mean value.
    q = (4 * jax.random.normal(next(keys), (batch, heads.num_heads, d), jnp.float32)).astype(jnp.bfloat16)
    lengths = jnp.full((batch,), context, jnp.int32)
    if system == "xla_dense_bf16":
        k, v = (jax.random.uniform(next(keys), (batch, context, hkv, d), jnp.bfloat16, -2, 2) for _ in range(2))
        return dict(q=q, k=k, v=v, lengths=lengths)
    block_tables = jax.random.permutation(next(keys), num_pages).astype(jnp.int32).reshape(batch, pages_per_sequence)
    if system == "bf16_paged":
        k_pages, v_pages = (
            jax.random.uniform(next(keys), (hkv, num_pages, page, d), jnp.bfloat16, -2, 2) for _ in range(2)
        )
        return dict(q=q, k_pages=k_pages, v_pages=v_pages, block_tables=block_tables, lengths=lengths)
    bits = QOQ_BITS[system]
    operands = dict(q=q, block_tables=block_tables, lengths=lengths)
    for name in ("k", "v"):
        operands[f"{name}_codes"] = jax.random.bits(next(keys), (hkv, num_pages, page, code_width(d, bits)), jnp.uint8)
        value_range = jax.random.uniform(next(keys), (hkv, num_pages, page), jnp.float32, 1, 4)
        operands[f"{name}_scale"] = (value_range / (2**bits - 1)).astype(jnp.float16)
        operands[f"{name}_zero"] = (value_range * jax.random.uniform(next(keys), value_range.shape)).astype(jnp.float16)
    return operands


def moved_bytes(operands: Operands) -> int:
    """Bytes one call must read (KV cache, scales/zeros, q, tables, lengths) and write (the bf16 output)."""
    return streamed_bytes(operands) + operands["q"].nbytes


def num_copies(num_bytes: int, on_gpu: bool) -> int:
    """Enough copies to rotate through several L2s, at least two where they fit, all within MAX_INPUT_BYTES."""
    if not on_gpu:
        return 2
    return max(1, min(16, max(2, math.ceil(ROTATION_BYTES / num_bytes)), MAX_INPUT_BYTES // num_bytes))


# --- systems ------------------------------------------------------------------------------------------------


def jax_paged_blocks(batch: int, num_kv_heads: int, pages_per_sequence: int, page_size: int) -> tuple[int, int]:
    """(k_splits, pages_per_compute_block) for jax's kernel: the qoq kernel's schedule, cut to what it accepts
    (the pages per sequence divide into the splits, and each split's pages into whole steps)."""
    blocks = DecodeAttentionBlockSizes.for_shape(batch, num_kv_heads, pages_per_sequence, page_size)
    k_splits, per_block = blocks.num_splits, blocks.pages_per_block
    while k_splits > 1 and pages_per_sequence % k_splits:
        k_splits //= 2
    while (pages_per_sequence // k_splits) % min(pages_per_sequence // k_splits, per_block):
        per_block //= 2
    return k_splits, per_block


def bf16_paged(q, k_pages, v_pages, block_tables, lengths, *, interpret: bool = False):
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    k_splits, per_block = jax_paged_blocks(q.shape[0], num_kv_heads, block_tables.shape[1], page_size)
    q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)  # jax's kernel leaves the logits unscaled
    return jax_paged_attention.paged_attention(
        q, k_pages, v_pages, block_tables, lengths, block_h=16, pages_per_compute_block=per_block,
        k_splits=k_splits, interpret=interpret,
    )  # fmt: skip


def xla_dense_bf16(q, k, v, lengths):
    out = jax.nn.dot_product_attention(q[:, None], k, v, key_value_seq_lengths=lengths, implementation="xla")
    return out[:, 0]


def system_fn(system: str, impl: str) -> Callable[..., jax.Array]:
    """The function timed for a system in one impl: "pallas" (GPU), "interpret" or "reference" (qoq only)."""
    if system in QOQ_BITS:
        bits = QOQ_BITS[system]
        if impl == "reference":
            return functools.partial(paged_decode_attention_reference, bits=bits)
        return functools.partial(paged_decode_attention, bits=bits, interpret=impl == "interpret")
    if system == "bf16_paged":
        return functools.partial(bf16_paged, interpret=impl == "interpret")
    return xla_dense_bf16


def system_impl(system: str, on_gpu: bool) -> str:
    if system == "xla_dense_bf16":
        return "xla"
    if on_gpu:
        return "pallas"
    return "reference" if system in QOQ_BITS else "interpret"  # jax's kernel interprets fast at smoke shapes


# --- measuring ----------------------------------------------------------------------------------------------


def compare_with_reference(system: str, operands: Operands, impl: str = "pallas") -> dict:
    """A qoq kernel against its jnp reference on one input. Both see the same codes; the kernel rounds the
    weights p·scale_v and its output to bf16, so it may differ by two bf16 roundings (2^-8 relative) of the
    largest value and of the output: tolerance = 2^-8·(max |v̂| + max |out|)."""
    bits = QOQ_BITS[system]
    actual = system_fn(system, impl)(**operands).astype(jnp.float32)
    batch, context = operands["block_tables"].shape[0], operands["block_tables"].shape[1] * operands["k_codes"].shape[2]
    chunk = max(1, REFERENCE_CHUNK_TOKENS // context)
    reference = jax.jit(system_fn(system, "reference"))
    per_batch = ("q", "block_tables", "lengths")
    expected = jnp.concatenate(
        [
            reference(**{name: a[start : start + chunk] if name in per_batch else a for name, a in operands.items()})
            for start in range(0, batch, chunk)
        ]
    ).astype(jnp.float32)
    max_value = jnp.max(
        operands["v_scale"].astype(jnp.float32) * (2**bits - 1) + operands["v_zero"].astype(jnp.float32)
    )
    tolerance = float(2**-8 * (max_value + jnp.max(jnp.abs(expected))))
    max_abs_err = float(jnp.max(jnp.abs(actual - expected)))
    return {"max_abs_err": max_abs_err, "tolerance": tolerance, "matches_reference": max_abs_err <= tolerance}


def measure_hbm_gb_per_s(num_bytes: int, repeats: int) -> float:
    """A float32 x + 1 over `num_bytes`: bytes read + written / median time (float32: a CPU adds bf16 slowly)."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    micros = median_us(lambda x: x + 1, [dict(x=x)], repeats)
    return 2 * x.nbytes / (micros * 1e-6) / 1e9


def benchmark(args: argparse.Namespace, hbm_gb_per_s: float) -> list[dict]:
    rows = []
    key = jax.random.key(time.time_ns() % 2**31)
    for context in args.context:
        for batch in args.batch:
            for system in args.systems:
                impl = system_impl(system, args.on_gpu)
                key, first_key = jax.random.split(key)
                copies = [make_operands(system, batch, context, args.heads, first_key)]
                num_bytes = moved_bytes(copies[0])
                count = num_copies(num_bytes, args.on_gpu)
                key, *copy_keys = jax.random.split(key, count)
                copies += [make_operands(system, batch, context, args.heads, copy_key) for copy_key in copy_keys]
                row = dict(system=system, impl=impl, batch=batch, context=context, copies=count, bytes=num_bytes)
                if impl == "pallas" and system in QOQ_BITS:
                    row |= compare_with_reference(system, copies[0])
                row["median_us"] = round(median_us(system_fn(system, impl), copies, args.repeats), 2)
                row["gb_per_s"] = float(f"{num_bytes / (row['median_us'] * 1e-6) / 1e9:.4g}")
                row["fraction_of_hbm"] = round(row["gb_per_s"] / hbm_gb_per_s, 4)
                del copies
                rows.append(row)
                print(format_row(row, args.on_gpu), flush=True)
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """`speedup_vs_bf16_paged` of every qoq row with a bf16_paged row at its batch and context, both Pallas
    kernels: a reference or an interpreted kernel says nothing about a kernel's speed."""
    kernels = [r for r in rows if r["impl"] == "pallas"]
    baseline = {(r["batch"], r["context"]): r["median_us"] for r in kernels if r["system"] == "bf16_paged"}
    for row in kernels:
        if row["system"] in QOQ_BITS and (row["batch"], row["context"]) in baseline:
            row["speedup_vs_bf16_paged"] = round(baseline[row["batch"], row["context"]] / row["median_us"], 3)


def goal_summary(rows: list[dict]) -> dict:
    """The issue's goal over the Pallas KV4 rows at context ≥ GOAL_MIN_CONTEXT (none in a smoke run)."""
    shapes = []
    for row in rows:
        if row["system"] == "qoq_kv4" and row["impl"] == "pallas" and row["context"] >= GOAL_MIN_CONTEXT:
            speedup = row.get("speedup_vs_bf16_paged")
            met = speedup is not None and speedup >= GOAL_SPEEDUP and row["fraction_of_hbm"] >= GOAL_FRACTION_OF_HBM
            shapes.append(
                dict(batch=row["batch"], context=row["context"], speedup_vs_bf16_paged=speedup,
                     fraction_of_hbm=row["fraction_of_hbm"], met=met)
            )  # fmt: skip
    return {"goal": GOAL, "met": all(s["met"] for s in shapes) if shapes else None, "shapes": shapes}


def check_kernels(heads: Heads, batches, contexts) -> bool:
    """GPU: both qoq kernels with their default blocks at every shape against the reference; one line each."""
    key = jax.random.key(time.time_ns() % 2**31)
    all_match = True
    print(
        "| system | batch | context | pages/step | splits | max abs err | tolerance | matches reference |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|"
    )
    for context in contexts:
        for batch in batches:
            for system in QOQ_BITS:
                key, operands_key = jax.random.split(key)
                result = compare_with_reference(system, make_operands(system, batch, context, heads, operands_key))
                blocks = DecodeAttentionBlockSizes.for_shape(
                    batch, heads.num_kv_heads, context // heads.page_size, heads.page_size
                )
                all_match &= result["matches_reference"]
                print(
                    f"| {system} | {batch} | {context} | {blocks.pages_per_block} | {blocks.num_splits} | "
                    f"{result['max_abs_err']:.3g} | {result['tolerance']:.3g} | {result['matches_reference']} |",
                    flush=True,
                )
    return all_match


# --- reporting ----------------------------------------------------------------------------------------------

def table_header(on_gpu: bool) -> str:
    """The speedup column only where the kernels run (see `add_speedups`)."""
    speedup, align = (" speedup vs bf16_paged |", "---:|") if on_gpu else ("", "")
    return (
        f"| system | impl | batch | context | median µs | GB/s (KV + q + out) | fraction of HBM |{speedup} "
        f"max abs err (tolerance) |\n|---|---|---:|---:|---:|---:|---:|{align}---|"
    )


def format_row(row: dict, on_gpu: bool) -> str:
    speedup = f" {row['speedup_vs_bf16_paged']:.2f}× |" if "speedup_vs_bf16_paged" in row else " – |"
    check = "–"
    if "max_abs_err" in row:
        check = f"{row['max_abs_err']:.3g} ({row['tolerance']:.3g})" + ("" if row["matches_reference"] else " **NO**")
    return (
        f"| {row['system']} | {row['impl']} | {row['batch']} | {row['context']} | {row['median_us']:.1f} | "
        f"{row['gb_per_s']:.4g} | {row['fraction_of_hbm']:.1%} |{speedup if on_gpu else ''} {check} |"
    )


def format_goal(goal: dict) -> str:
    if goal["met"] is None:
        return f"Goal: {goal['goal']} — not measured (no Pallas KV4 row at context ≥ {GOAL_MIN_CONTEXT})."
    lines = [f"Goal: {goal['goal']} — **{'met' if goal['met'] else 'NOT met'}**.", ""]
    lines += ["| batch | context | speedup vs bf16_paged | fraction of HBM | met |", "|---:|---:|---:|---:|---|"]
    for s in goal["shapes"]:
        speedup = "–" if s["speedup_vs_bf16_paged"] is None else f"{s['speedup_vs_bf16_paged']:.2f}×"
        met = "yes" if s["met"] else "no"
        lines.append(f"| {s['batch']} | {s['context']} | {speedup} | {s['fraction_of_hbm']:.1%} | {met} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.check:
        sys.exit(0 if check_kernels(args.heads, args.batch, args.context) else 1)
    load_average = os.getloadavg()
    slug, device = device_description()
    probe_bytes = HBM_PROBE_BYTES if args.on_gpu else HBM_PROBE_BYTES // 8
    hbm_gb_per_s = float(f"{measure_hbm_gb_per_s(probe_bytes, args.repeats):.4g}")
    print(f"memory bandwidth (float32 x + 1 over {probe_bytes / 2**30:.3g} GiB): {hbm_gb_per_s:.4g} GB/s", flush=True)
    print(table_header(args.on_gpu), flush=True)
    rows = benchmark(args, hbm_gb_per_s)
    goal = goal_summary(rows)
    result = {
        "device": device,
        "load_average_at_start": load_average,
        "jax_version": jax.__version__,
        "smoke": args.smoke,
        "repeats": args.repeats,
        "heads": dataclasses.asdict(args.heads),
        "hbm_gb_per_s": hbm_gb_per_s,
        "hbm_probe_bytes": probe_bytes,
        "goal": goal,
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"attention-{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
    h = args.heads
    title = (
        f"Decode attention speed on {device}, jax {jax.__version__}, median of {args.repeats} dispatches; "
        f"{h.num_heads} query heads, {h.num_kv_heads} KV heads, head_dim {h.head_dim}, {h.page_size}-token pages; "
        f"memory bandwidth (float32 x + 1) {hbm_gb_per_s:.4g} GB/s"
    )
    if args.smoke:
        title += (
            " — SMOKE RUN on tiny shapes: qoq rows are the jnp references (impl 'reference') and bf16_paged runs in"
            " interpret mode, not the Pallas kernels, and no number here says anything about GPU speed"
        )
    table = "\n".join([table_header(args.on_gpu), *(format_row(row, args.on_gpu) for row in rows)])
    text = f"{title}\n\n{table}\n\n{format_goal(goal)}\n"
    (args.out_dir / f"attention-{slug}.md").write_text(text)
    print(f"\n{text}", end="")


if __name__ == "__main__":
    main()
