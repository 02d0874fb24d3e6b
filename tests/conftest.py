"""Shared fixtures: tiny random transformers models saved to disk, and the embedded SmolLM2."""

from __future__ import annotations

import os

# Tests compare float32 numerics against torch: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Four CPU devices for the tensor- and data-parallel tests (everything else runs on the first one).
CPU_DEVICES = 4
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={CPU_DEVICES}"
# The suite checks what programs compute, not how fast, and most of its time is XLA compiling small programs:
# without XLA's backend (LLVM) optimizations, files timed back to back on two cores took 0.73-0.80x as long
# (test_generate 52.5 -> 38.4 s, test_engine 164.5 -> 132.3 s), every test passing.
# Set here so that the subprocesses of the CLI and benchmark tests inherit it; `JAX_DISABLE_MOST_OPTIMIZATIONS=0`
# runs the suite optimized. Modules marked `xla_optimized` run optimized anyway (see `xla_optimizations`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import gc  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from seeding import seed_of  # noqa: E402
from parity_report import print_parity_table  # noqa: E402
from suite_guard import OUTCOMES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GPL_TEXT = REPO.parent / "shared" / "data" / "gpl-3.0.txt"


@pytest.fixture(scope="session")
def gpl_text() -> str:
    if not GPL_TEXT.is_file():
        pytest.fail(f"the shared test text is missing: {GPL_TEXT}")
    return GPL_TEXT.read_text()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "xla_optimized: the module runs with XLA's optimizations (it spends its time computing, not compiling; "
        "and so that the optimized programs users run are checked end to end too)",
    )


@pytest.fixture(scope="module", autouse=True)
def xla_optimizations(request):
    """XLA's backend optimizations back on for a module marked `xla_optimized`, for its duration."""
    if request.node.get_closest_marker("xla_optimized") is None:
        yield
        return
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Frees each module's compiled programs when it ends. XLA's CPU runtime maps memory for every kernel it
    compiles and a process may hold only `vm.max_map_count` mappings (65 530 by default): an xdist worker that
    kept every module's programs reached it (tests/test_engine.py alone adds ~27 000), its next compilation failed
    with "Failed to materialize symbols", and throwing that error crashed the worker in the C++ unwinder."""
    yield
    jax.clear_caches()
    gc.collect()


# The longest files, longest first (each one's summed test time in a full two-worker run, --junitxml): started
# first, so that with --dist loadfile the two workers end together instead of one running a long file alone at the
# end (xdist hands out files in collection order as workers free up). A file missing here only runs later.
LONGEST_FILES = (
    "test_smollm2_qoq.py",  # 202 s: quantizes the 30-layer SmolLM2
    "test_engine.py",  # 144 s
    "test_qoq.py",  # 135 s
    "test_tensor_parallel.py",  # 86 s
    "test_kv_calibration.py",  # 83 s
    "test_smollm2.py",  # 82 s
    "test_http_server.py",  # 68 s
    "test_model_parity.py",  # 67 s
    "test_families.py",  # 56 s
    "test_gpu_check.py",  # 55 s: six subprocesses
    "test_e2e_benchmark.py",  # 43 s
    "test_http_fuzz.py",  # 39 s
    "test_http_features.py",  # 39 s
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order is kept


@pytest.fixture
def rng(request) -> np.random.Generator:
    """The test's own generator, seeded by its id: the same inputs on every run, whatever ran before it."""
    return np.random.default_rng(seed_of(request.node.nodeid))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Records each test's outcome for `suite_guard`: its call's, or its setup's when that did not pass."""
    report = yield
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        item.config.stash.setdefault(OUTCOMES, {})[item.nodeid] = report.outcome
    return report


def pytest_terminal_summary(terminalreporter, config):
    """After the run: the per-family logit errors against transformers (tests/test_families.py)."""
    print_parity_table(terminalreporter)
