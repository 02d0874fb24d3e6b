"""The one prepared device check: everything a short GPU lease should run, in one call of at most 10 minutes.

On a bare GPU machine with the repository copied over (nothing to install: jax, flax, torch, pytest and
hypothesis are there), `STEPS` run one after another, each in its own process:
  kernel tests       the GPU pytest classes: both W4A8 GEMMs, the decode and the prefill-over-pages attention
                     against their references (TestW4A8GemmOnGpu at Llama-3-8B shapes, every M bucket's tiles);
  gemm check         `gemm.py --check`: both kernels at every M bucket and Llama-3-8B shape against the reference;
  gemm timings       `gemm.py` at M = 1, 16, 1024, 4096 with 10 repeats (the goal's M's);
  decode attention   `attention.py` at batch 1/64/256 × context 2048/8192, every qoq row checked first;
  e2e compiled loop  `e2e_throughput.py` for Llama-3-8B, QoQ g128 without and with the default recipe's KV4 stages
                     (their decode cost) and W16A16, one timed run each;
  e2e engine         the same model and budget served by the engine (`engine/e2e-<device>.json`), last, in
                     whatever time the steps before it left.
Each step gets its share of `--budget-s` (570 s by default) plus whatever the steps before it left unused; a step
that runs out is stopped and reported, and the next one starts. The persistent compilation cache is shared by
the steps. Every JSON lands in `--out` (gemm-/attention-/e2e-<device>.json and their tables, and
gpu-check-<device>.json with each step's status, wall time, output tail and the goals judged), and a one-screen
summary is printed last.

`--dry-run` runs the same steps on this CPU at tiny shapes (interpret-mode kernel tests and check, the smoke
modes of the benchmarks) in seconds; CI runs it (tests/test_gpu_check.py), so the script cannot rot.

Run from the repository root:

    python benchmarks/gpu_check.py --out benchmarks/results     # on the GPU; then commit benchmarks/results/*
    python benchmarks/gpu_check.py --dry-run --out /tmp/check   # anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_TAIL_CHARS = 3000
DEFAULT_BUDGET_S = 570  # leaves the 10-minute call half a minute for start-up and the summary (Σ step budgets)
ENGINE_DIR = "engine"  # the engine's e2e JSON beside the compiled loop's, which has the same name
DRY_RUN_BUDGET_S = 600  # a safety net on a loaded CPU; the dry run takes about a minute of CPU time

# Not built yet: each becomes one more entry of STEPS when it lands.
PENDING = ("prefill-over-pages kernel (issue 17): a benchmark timing it (its GPU test class runs in kernel tests)",)


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the check: its arguments on the GPU and in the dry run ("{out}": the --out folder, "{junit}":
    a scratch JUnit file), its share of the budget on the GPU, and what it reads back for the summary."""

    name: str
    gpu: tuple[str, ...]
    dry_run: tuple[str, ...]
    budget_s: int
    summarize: Callable[[Path, str, str], list[str]] | None = None


def _pytest(*selection: str) -> tuple[str, ...]:
    return ("-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "{junit}", *selection)


def summarize_tests(out: Path, junit: str, slug: str) -> list[str]:
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None
              or case.find("error") is not None]  # fmt: skip
    line = (
        f"{suite.get('tests')} tests: {suite.get('failures')} failed, {suite.get('errors')} errors, "
        f"{suite.get('skipped')} skipped"
    )
    return [line] + [f"  FAILED {name}" for name in failed[:8]]


def _rows(out: Path, prefix: str, slug: str) -> tuple[dict, list[dict]]:
    """The newest `<prefix>-<device>*.json` in `out` (its rows): what the step just wrote."""
    path = max(out.glob(f"{prefix}-{slug}*.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(path.read_text())
    return result, result["rows"]


def summarize_gemm(out: Path, junit: str, slug: str) -> list[str]:
    """The GEMM goal: g128 ≥ 2.5× XLA bf16 at M ≤ 16 and ≥ 0.85× XLA W8A8 at M ≥ 1024 (worst shape shown)."""
    result, rows = _rows(out, "gemm", slug)
    median = {(r["system"], r["M"], r["N"], r["K"]): r["median_us"] for r in rows if r["impl"] in ("pallas", "xla")}
    lines = [f"{len(rows)} rows on {result['device']}" + ("" if "qoq_g128" in {s for s, *_ in median} else
             " (no Pallas kernel rows: goals not judged)")]  # fmt: skip
    for baseline, goal, select in (("xla_bf16", 2.5, lambda m: m <= 16), ("xla_w8a8", 0.85, lambda m: m >= 1024)):
        ratios = [
            (median[(baseline, m, n, k)] / us, m, n, k)
            for (system, m, n, k), us in median.items()
            if system == "qoq_g128" and select(m) and (baseline, m, n, k) in median
        ]
        if ratios:
            worst = min(ratios)
            verdict = "met" if worst[0] >= goal else "NOT met"
            lines.append(f"qoq_g128 vs {baseline}: worst {worst[0]:.2f}× at M={worst[1]} N={worst[2]} K={worst[3]} "
                         f"(goal ≥ {goal}×: {verdict})")  # fmt: skip
    mismatched = [r for r in rows if r.get("matches_reference") is False]
    lines += [f"  MISMATCH {r['system']} M={r['M']} N={r['N']} K={r['K']}" for r in mismatched]
    return lines


def summarize_attention(out: Path, junit: str, slug: str) -> list[str]:
    result, rows = _rows(out, "attention", slug)
    goal = result["goal"]
    verdict = {None: "not measured", True: "met", False: "NOT met"}[goal["met"]]
    lines = [f"{len(rows)} rows; HBM {result['hbm_gb_per_s']:.4g} GB/s; goal {verdict}: {goal['goal']}"]
    lines += [f"  batch {s['batch']} ctx {s['context']}: {s['speedup_vs_bf16_paged']}× bf16_paged, "
              f"{s['fraction_of_hbm']:.0%} of HBM" for s in goal["shapes"]]  # fmt: skip
    lines += [f"  MISMATCH {r['system']} batch {r['batch']} ctx {r['context']}" for r in rows
              if r.get("matches_reference") is False]  # fmt: skip
    return lines


def summarize_engine(out: Path, junit: str, slug: str) -> list[str]:
    return summarize_e2e(out / ENGINE_DIR, junit, slug)


def summarize_e2e(out: Path, junit: str, slug: str) -> list[str]:
    result, rows = _rows(out, "e2e", slug)
    lines = [f"{r['model']} {r['system']}: batch {r['batch']}, {r['tokens_per_s'] or 0:.0f} tokens/s" for r in rows]
    goal = result.get("goal") or {}
    if "vs_w16a16" in goal:
        ratio = goal["vs_w16a16"]
        lines.append(f"qoq g128 / W16A16: {ratio['ratio']:.2f}× (goal ≥ {ratio['goal']}×: "
                     f"{'met' if ratio['met'] else 'NOT met'})")  # fmt: skip
    return lines


GPU_TEST_CLASSES = (
    "tests/test_w4a8_gemm.py::TestW4A8Gemm",
    "tests/test_w4a8_gemm.py::TestW4A8GemmOnGpu",
    "tests/test_paged_attention.py::TestPagedDecodeAttention",
    "tests/test_paged_prefill_attention.py::TestPagedPrefillAttention",
)
STEPS = (
    Step(
        "kernel tests",
        gpu=_pytest(*GPU_TEST_CLASSES),
        dry_run=_pytest(
            "tests/test_w4a8_gemm.py::TestW4A8GemmInterpret::test_chn_accumulator_is_exact[1-128-64]",
            "tests/test_paged_attention.py::TestPagedDecodeAttentionInterpret::test_splits_and_empty_rows[1]",
            "tests/test_paged_prefill_attention.py::TestPagedPrefillAttentionInterpret::"
            "test_bfloat16_queries_with_default_blocks",
        ),
        budget_s=100,
        summarize=summarize_tests,
    ),
    Step("gemm check", gpu=("benchmarks/gemm.py", "--check"), dry_run=("benchmarks/gemm.py", "--check", "--m", "16"),
         budget_s=65),  # fmt: skip
    Step(
        "gemm timings",
        gpu=("benchmarks/gemm.py", "--m", "1", "16", "1024", "4096", "--repeats", "10", "--out-dir", "{out}"),
        dry_run=("benchmarks/gemm.py", "--smoke", "--systems", "xla_bf16", "qoq_g128", "--m", "16", "--repeats", "1",
                 "--out-dir", "{out}"),  # fmt: skip
        budget_s=110,
        summarize=summarize_gemm,
    ),
    Step(
        "decode attention",
        gpu=("benchmarks/attention.py", "--batch", "1", "64", "256", "--context", "2048", "8192", "--repeats", "10",
             "--out-dir", "{out}"),  # fmt: skip
        dry_run=("benchmarks/attention.py", "--smoke", "--systems", "qoq_kv4", "bf16_paged", "--batch", "1",
                 "--context", "64", "--repeats", "1", "--out-dir", "{out}"),  # fmt: skip
        budget_s=85,
        summarize=summarize_attention,
    ),
    Step(
        "e2e compiled loop",
        gpu=("benchmarks/e2e_throughput.py", "--systems", "qoq_w4a8kv4_g128", "qoq_w4a8kv4_g128_kv_stages",
             "w16a16kv16", "--repeats", "1", "--no-latency", "--out-dir", "{out}"),  # fmt: skip
        dry_run=("benchmarks/e2e_throughput.py", "--smoke", "--systems", "qoq_w4a8kv4_g128", "--no-latency",
                 "--out-dir", "{out}"),  # fmt: skip
        budget_s=170,
        summarize=summarize_e2e,
    ),
    Step(  # last: what the budget has left after the kernels' steps
        "e2e engine",
        gpu=("benchmarks/e2e_throughput.py", "--systems", "qoq_w4a8kv4_g128_engine", "--repeats", "1", "--no-latency",
             "--out-dir", "{out}/" + ENGINE_DIR),  # fmt: skip
        dry_run=("benchmarks/e2e_throughput.py", "--smoke", "--systems", "qoq_w4a8kv4_g128_engine", "--no-latency",
                 "--out-dir", "{out}/" + ENGINE_DIR),  # fmt: skip
        budget_s=40,
        summarize=summarize_engine,
    ),
)


def run_step(step: Step, argv: tuple[str, ...], timeout_s: float, env: dict, out: Path, scratch: Path,
             slug: str) -> dict:  # fmt: skip
    junit = str(scratch / f"{step.name.replace(' ', '-')}.xml")
    command = [sys.executable, *(arg.format(out=out, junit=junit) for arg in argv)]
    started = time.perf_counter()
    record = {"step": step.name, "command": " ".join(command[1:]), "timeout_s": round(timeout_s)}
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        record |= {"exit_code": done.returncode, "timed_out": False}
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:
        record |= {"exit_code": None, "timed_out": True}
        output = "".join(part.decode() if isinstance(part, bytes) else part or "" for part in
                         (stopped.stdout, stopped.stderr))  # fmt: skip
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["ok"] = record["exit_code"] == 0
    record["output_tail"] = output[-OUTPUT_TAIL_CHARS:]
    if step.summarize is not None and (record["ok"] or Path(junit).is_file()):
        try:
            record["summary"] = step.summarize(out, junit, slug)
        except (OSError, ValueError, KeyError) as unreadable:
            record["summary"] = [f"results unreadable: {unreadable!r}"]
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for every JSON and table")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny shapes")
    parser.add_argument("--budget-s", type=float, default=None, help=f"all steps together (GPU: {DEFAULT_BUDGET_S})")
    return parser.parse_args(argv)


def step_environment(environ, scratch: str, *, on_gpu: bool) -> dict:
    """The steps' environment: one compilation cache for all of them; on a GPU, XLA's optimizations on for the
    kernel tests too (tests/conftest.py turns them off by default, for the CPU suite's compile time), so that they
    check the programs the benchmarks time."""
    env = {key: value for key, value in environ.items() if key != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    env |= {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": scratch,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
    if on_gpu:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    return env


def main(argv=None) -> dict:
    args = parse_args(argv)
    # This process only names the device: it must not take the GPU memory the steps need.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax
    from gemm import device_description

    slug, device = device_description()
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.dry_run:
        raise SystemExit("no GPU here: run with --dry-run (tiny shapes on CPU), or on the GPU machine")
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S)
    deadline = time.perf_counter() + budget
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        env = step_environment(os.environ, scratch, on_gpu=on_gpu)
        for index, step in enumerate(STEPS):
            later = sum(s.budget_s for s in STEPS[index + 1 :]) * budget / sum(s.budget_s for s in STEPS)
            timeout_s = deadline - time.perf_counter() - later
            if timeout_s <= 0:
                records.append({"step": step.name, "ok": False, "skipped": "no time left in the budget"})
                continue
            print(f"[gpu_check] {step.name} (≤ {timeout_s:.0f} s)", flush=True)
            argv = step.dry_run if args.dry_run else step.gpu
            records.append(run_step(step, argv, timeout_s, env, args.out, Path(scratch), slug))
    result = {
        "device": device,
        "jax_version": jax.__version__,
        "dry_run": args.dry_run,
        "started": started_at,
        "budget_s": budget,
        "wall_s": round(sum(r.get("wall_s", 0) for r in records), 1),
        "all_ok": all(r["ok"] for r in records),
        "not_yet_built": list(PENDING),
        "steps": records,
    }
    (args.out / f"gpu-check-{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_summary(result), flush=True)
    return result


def format_summary(result: dict) -> str:
    title = f"gpu_check on {result['device']} (jax {result['jax_version']}{', DRY RUN' if result['dry_run'] else ''})"
    lines = ["", title, "=" * len(title)]
    for record in result["steps"]:
        if "skipped" in record:
            lines.append(f"SKIP  {record['step']}: {record['skipped']}")
            continue
        status = "ok  " if record["ok"] else ("TIME" if record["timed_out"] else "FAIL")
        lines.append(f"{status}  {record['step']} ({record['wall_s']} s): {record['command']}")
        lines += [f"        {line}" for line in record.get("summary", [])]
        if not record["ok"]:
            lines += [f"        | {line}" for line in record["output_tail"].splitlines()[-6:]]
    lines += [f"NOT YET  {item}" for item in result["not_yet_built"]]
    lines.append(f"{'all ok' if result['all_ok'] else 'SOMETHING FAILED'} in {result['wall_s']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
