"""Shared fixtures: tiny random transformers models saved to disk, and the embedded SmolLM2."""

from __future__ import annotations

import os

# Tests compare float32 numerics against torch: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Four CPU devices for the tensor- and data-parallel tests (everything else runs on the first one).
CPU_DEVICES = 4
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={CPU_DEVICES}"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GPL_TEXT = REPO.parent / "shared" / "data" / "gpl-3.0.txt"


@pytest.fixture(scope="session")
def gpl_text() -> str:
    if not GPL_TEXT.is_file():
        pytest.fail(f"the shared test text is missing: {GPL_TEXT}")
    return GPL_TEXT.read_text()


_PARITY_TABLE = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_PARITY_TABLE] = {}


@pytest.fixture(scope="session")
def parity_table(request) -> dict:
    """{family: {measurement: logit relative error}}, printed by `pytest_terminal_summary` after the run."""
    return request.config.stash[_PARITY_TABLE]


def pytest_terminal_summary(terminalreporter, config):
    table = config.stash.get(_PARITY_TABLE, {})
    if not table:
        return
    columns = list(dict.fromkeys(column for row in table.values() for column in row))
    terminalreporter.write_sep("=", "logit relative error vs transformers (max |Δ| / max |logit|)")
    terminalreporter.write_line(" | ".join([f"{'family':<20}", *(f"{c:>14}" for c in columns)]))
    for family, row in table.items():
        cells = (f"{row[c]:>14.2e}" if c in row else f"{'-':>14}" for c in columns)
        terminalreporter.write_line(" | ".join([f"{family:<20}", *cells]))
