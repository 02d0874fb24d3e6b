"""benchmarks/gpu_check.py --dry-run: the prepared device check runs end to end on CPU at tiny shapes, every
step passes, and its files are the ones a GPU run commits (device named, per-step status, each benchmark's JSON).
One run shared by the tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    return out, gpu_check.main(["--dry-run", "--out", str(out)])


def test_every_step_passes(dry_run):
    _, result = dry_run
    failures = {r["step"]: r.get("output_tail", r.get("skipped")) for r in result["steps"] if not r["ok"]}
    assert not failures
    assert result["all_ok"] and result["dry_run"]
    assert [r["step"] for r in result["steps"]] == [step.name for step in gpu_check.STEPS]


def test_writes_each_benchmark_json_with_the_device(dry_run):
    out, result = dry_run
    written = json.loads((out / "gpu-check-cpu.json").read_text())
    assert written["device"] == result["device"] and written["device"].startswith("cpu")
    for prefix in ("gemm", "attention", "e2e"):
        [path] = out.glob(f"{prefix}-cpu*.json")
        assert json.loads(path.read_text())["device"] == result["device"]
    tests = next(r for r in result["steps"] if r["step"] == "kernel tests")
    assert tests["summary"][0].startswith("3 tests: 0 failed, 0 errors, 0 skipped")


def test_summary_judges_no_goal_on_cpu_rows(dry_run):
    _, result = dry_run
    gemm = next(r for r in result["steps"] if r["step"] == "gemm timings")
    assert "goals not judged" in gemm["summary"][0] and len(gemm["summary"]) == 1
    text = gpu_check.format_summary(result)
    assert "DRY RUN" in text and "all ok" in text and text.count("NOT YET") == len(gpu_check.PENDING)


def test_gpu_steps_fit_the_ten_minute_call():
    assert sum(step.budget_s for step in gpu_check.STEPS) <= gpu_check.DEFAULT_BUDGET_S <= 600 - 30


def test_a_gpu_run_checks_the_optimized_programs_and_a_dry_run_what_the_suite_compiles():
    suite = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    on_gpu = gpu_check.step_environment(suite, "/tmp/cache", on_gpu=True)
    dry_run = gpu_check.step_environment(suite, "/tmp/cache", on_gpu=False)
    assert on_gpu["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "0" and dry_run["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"
    for env in (on_gpu, dry_run):
        assert env["JAX_COMPILATION_CACHE_DIR"] == "/tmp/cache" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in env
