"""Shared fixtures: tiny random transformers models saved to disk, and the embedded SmolLM2."""

from __future__ import annotations

import os

# Tests compare float32 numerics against torch: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Four CPU devices for the tensor- and data-parallel tests (everything else runs on the first one).
CPU_DEVICES = 4
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={CPU_DEVICES}"

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
    "test_engine.py",  # 172 s
    "test_smollm2_qoq.py",  # 169 s: quantizes the 30-layer SmolLM2
    "test_qoq.py",  # 139 s
    "test_tensor_parallel.py",  # 108 s
    "test_kv_calibration.py",  # 92 s
    "test_http_server.py",  # 79 s
    "test_model_parity.py",  # 79 s
    "test_smollm2.py",  # 77 s
    "test_families.py",  # 68 s
    "test_gpu_check.py",  # 62 s: seven subprocesses
    "test_e2e_benchmark.py",  # 62 s
    "test_http_features.py",  # 49 s
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
