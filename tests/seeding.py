"""Per-test random inputs: each test draws from its own generator, seeded by its id."""

from __future__ import annotations

import os
import zlib

import numpy as np


def seed_of(test_id: str) -> int:
    return zlib.crc32(test_id.encode())


def seeded_rng() -> tuple[np.random.Generator, int]:
    """The running test's own generator, seeded by its id: the same inputs on every run whatever ran before; the
    seed is returned for the failure message."""
    seed = seed_of(os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0])
    return np.random.default_rng(seed), seed
