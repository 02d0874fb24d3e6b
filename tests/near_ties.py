"""Greedy outputs compared where quantized models allow: two correct paths (one-shot and chunked prefill, say)
compute the same float sums in another order, and a quantized code that the rounding difference moves across its
boundary can decide a near-tie either way. So token lists must be equal up to the first step where they part,
and there `forward`'s logits on the expected tokens must hold a near-tie."""

from __future__ import annotations

import numpy as np

import qoq_jax

NEAR_TIE = 2e-2  # of the logits' magnitude


def assert_equal_up_to_a_near_tie(params, prompt: list[int], got: list[int], want: list[int], name: str) -> None:
    if got == want:
        return
    step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert step < min(len(got), len(want)), f"{name}: {len(got)} tokens, expected {len(want)}"
    logits = np.asarray(qoq_jax.forward(params, np.asarray([prompt + want[:step]], np.int32))[0, -1])
    gap = (logits[want[step]] - logits[got[step]]) / np.max(np.abs(logits))
    assert gap <= NEAR_TIE, f"{name} parts from generate at step {step} by {gap:.3g} of the logits"
