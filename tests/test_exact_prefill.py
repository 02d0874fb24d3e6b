"""KV-exact prefill: every attention reads keys and values as the cache holds them, so however a prompt reaches the
cache (at once, in ragged chunks over narrowed block tables, over a prefix already in the pages, recomputed after a
preemption) it gives the logits of one-shot prefill and of `forward`, and `generate` is prefill + decode. Checked
on tiny random W4A8KV4 and W8A8KV8 models (float KV16 chunking: tests/test_kv_cache.py); plus the padding-row
contract an engine relies on.

Tolerance: the paths compute the same float32 sums over the same quantized keys and values in a different order
and with different shapes (a chunk's key count, the matmuls' row counts), so they agree to float32 rounding carried
through two layers, ~1e-7 relative (on this CPU mostly bit for bit): a row agrees when every logit is within 1e-5
of the logits' magnitude. But a quantized code (an int8 activation, a KV code) that such a perturbation moves
across its rounding boundary shifts that row's logits by up to ~5e-3 of their magnitude, which happened to about
one row in 80 here. So every row must agree within 2e-2 and a majority of rows to 1e-5: one or two flipped rows
pass, while the gap this guards against (one-shot prefill attending over unquantized K/V while chunks read the
pages) moved every row, by 0.04–0.09 at KV4 and ~4e-3 at KV8. Greedy tokens are compared up to the first
step whose top two logits are that close (a near-tie a flip may decide either way).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from seeding import seeded_rng
from tiny_models import TINY_CONFIGS

import qoq_jax
from qoq_jax import PagedKVCache, QuantFormat

PAGE_SIZE = 8
BLOCK = 48  # one-shot prompt block
CHUNK = 16  # a chunked step's token block
MAX_LENGTH = 128  # a row's whole block table: 16 pages
STEP_PAGES = 8  # the narrowed tables each chunked step passes: a power of two covering the longest row
FORMATS = {"w4a8kv4": QuantFormat("w4a8-g128", group_size=64, kv_bits=4), "w8a8kv8": QuantFormat("w8a8", kv_bits=8)}


@pytest.fixture(scope="module")
def params(request):
    """The tiny quantizable Llama in the format the test names (indirect parametrization), made once per format."""
    config = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS["llama_quantizable"]().to_dict())
    return qoq_jax.init_params(config, seed=3, quant=FORMATS[request.param])


ROUNDING, FLIP = 1e-5, 2e-2  # of the logits' magnitude: float32 rounding; a quantized code crossing a boundary


def _assert_same_logits(actual, expected, message):
    """Rows [B, vocab] agree: all within FLIP, a majority within ROUNDING (see the module docstring)."""
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected)))
    error = np.max(np.abs(np.asarray(actual) - expected), axis=1) / scale
    assert np.all(error <= FLIP) and np.sum(error <= ROUNDING) > len(error) / 2, f"{message}: errors {error}"


def _assert_greedy_tokens(actual, expected, logits, message):
    """Token lists equal, up to the first step (per row) where the reference logits [steps, B, vocab] hold a
    near-tie (the two best within FLIP) that a flipped code may decide either way."""
    for row, (got, want) in enumerate(zip(actual, expected)):
        for step, (a, b) in enumerate(zip(got, want)):
            if a != b:
                step_logits = logits[step][row]
                gap = (np.max(step_logits) - step_logits[a]) / np.max(np.abs(step_logits))
                assert gap <= FLIP, f"{message}: row {row} step {step}: sampled {a}, greedy is {b} by {gap:.3g}"
                break


def _pool(params, num_pages, tables):
    return PagedKVCache.init(
        params.config,
        num_pages=num_pages,
        page_size=PAGE_SIZE,
        block_tables=tables,
        dtype=params.dtype,
        kv_bits=params.kv_bits,
        kernel=params.kernel,
    )


def _narrowed(tables, sizes, num_pages):
    """The step's tables cut to STEP_PAGES pages (as an engine's runner buckets them by its longest row); rows that
    take no part (size 0) get the out-of-range id `num_pages`, as padding rows do."""
    narrow = np.array(tables[:, :STEP_PAGES])
    narrow[np.asarray(sizes) == 0] = num_pages
    return jnp.asarray(narrow)


def _prompts(rng, vocab):
    """Rows of 21, 16 (two full pages), 9 and a random number of tokens, and a fifth sharing row 0's first two
    pages; right-padded into a [5, BLOCK] block with their lengths."""
    prompts = [list(rng.integers(3, vocab, n)) for n in (21, 16, 9, int(rng.integers(1, 40)))]
    prompts.append(prompts[0][: 2 * PAGE_SIZE] + list(rng.integers(3, vocab, 7)))
    tokens = np.zeros((len(prompts), BLOCK), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return prompts, tokens, np.array([len(p) for p in prompts], np.int32)


def _prefill_and_decode(params, tokens, lengths, num_steps):
    """One-shot prefill, then greedy decode steps: the state, the prefill logits, the decode logits per step and
    the greedy tokens [num_steps + 1, B]."""
    state, logits = qoq_jax.prefill(
        params, jnp.asarray(tokens), jnp.asarray(lengths), max_length=MAX_LENGTH, page_size=PAGE_SIZE
    )
    generated, decoded = [np.argmax(np.asarray(logits), axis=-1)], []
    for _ in range(num_steps):
        state, step_logits = qoq_jax.decode_step(params, state, jnp.asarray(generated[-1]))
        decoded.append(np.asarray(step_logits))
        generated.append(np.argmax(decoded[-1], axis=-1))
    return state, logits, decoded, np.stack(generated)


@pytest.mark.parametrize("params", list(FORMATS), indirect=True)
def test_every_way_into_the_cache_gives_the_one_shot_logits(params):
    """One-shot prefill gives the reference logits, and `forward` gives them too. Ragged random chunks (1–16
    tokens per step; padding rows for rows that are done or waiting) into one shuffled pool through narrowed
    tables give them, the fifth row computing only its suffix over row 0's pages (a prefix-cache hit). Three
    greedy decode steps give the logits of recomputing prompt + generated tokens as after a preemption, at once
    and as a chunk over the pages."""
    rng, seed = seeded_rng()
    prompts, tokens, lengths = _prompts(rng, params.config.vocab_size)
    batch, shared = len(prompts), 2 * PAGE_SIZE
    _, one_shot, decoded, generated = _prefill_and_decode(params, tokens, lengths, 3)
    forward = qoq_jax.forward(params, jnp.asarray(tokens))[np.arange(batch), lengths - 1]
    _assert_same_logits(forward, one_shot, f"forward vs one-shot prefill (seed {seed})")

    # Chunks into one pool: each row on random pages, the fifth row's first two pages being row 0's.
    pages_per_row = MAX_LENGTH // PAGE_SIZE
    num_pages = batch * pages_per_row + 3
    tables = rng.permutation(num_pages)[: batch * pages_per_row].reshape(batch, -1)
    tables[4, :2] = tables[0, :2]
    cache = _pool(params, num_pages, tables)
    computed = np.zeros(batch, np.int32)
    computed[4] = shared  # its prefix is row 0's, computed once by row 0
    chunked = np.zeros_like(np.asarray(one_shot))
    while np.any(computed < lengths):
        sizes = np.minimum(rng.integers(1, CHUNK + 1, batch), lengths - computed)
        if computed[0] < shared:  # the hit needs row 0's pages written first
            sizes[4] = 0
        block = np.zeros((batch, CHUNK), np.int32)
        for row, size in enumerate(sizes):
            block[row, :size] = prompts[row][computed[row] : computed[row] + size]
        cache = dataclasses.replace(cache, block_tables=_narrowed(tables, sizes, num_pages))
        state, logits = qoq_jax.prefill(
            params, jnp.asarray(block), jnp.asarray(sizes), cache=cache, start_positions=jnp.asarray(computed)
        )
        cache = state.cache
        finished = (sizes > 0) & (computed + sizes == lengths)
        chunked[finished] = np.asarray(logits)[finished]
        computed += sizes
    _assert_same_logits(chunked, one_shot, f"chunked (and prefix-hit) prefill vs one-shot (seed {seed})")

    again = np.array(tokens)
    for row, n in enumerate(lengths):
        again[row, n : n + 3] = generated[:3, row]
    _, recomputed = qoq_jax.prefill(
        params, jnp.asarray(again), jnp.asarray(lengths + 3), max_length=MAX_LENGTH, page_size=PAGE_SIZE
    )
    _assert_same_logits(recomputed, decoded[-1], f"recompute vs decode (seed {seed})")
    block = np.zeros((batch, CHUNK), np.int32)
    block[:, :3] = generated[:3].T
    cache = dataclasses.replace(cache, block_tables=_narrowed(tables, lengths, num_pages))
    _, rechunked = qoq_jax.prefill(
        params, jnp.asarray(block), jnp.full((batch,), 3), cache=cache, start_positions=jnp.asarray(lengths)
    )
    _assert_same_logits(rechunked, decoded[-1], f"a recomputed chunk over the pages vs decode (seed {seed})")


@pytest.mark.parametrize("params", ["w4a8kv4"], indirect=True)
def test_generate_is_prefill_plus_decode(params):
    """`generate` samples the greedy tokens of one-shot prefill + decode steps (whose logits the test above
    ties to every other way into the cache)."""
    rng, seed = seeded_rng()
    prompts, tokens, lengths = _prompts(rng, params.config.vocab_size)
    _, logits, decoded, generated = _prefill_and_decode(params, tokens, lengths, 3)
    completions = qoq_jax.generate(params, prompts, max_new_tokens=4, ignore_eos=True)
    assert [len(c) for c in completions] == [4] * len(prompts), f"seed {seed}"
    _assert_greedy_tokens(completions, generated.T.tolist(), [np.asarray(logits)] + decoded, f"seed {seed}")


@pytest.mark.parametrize("params", list(FORMATS), indirect=True)
def test_padding_rows_write_nothing_and_leave_real_rows_alone(params):
    """Two real rows and three padding rows (length 0, block-table rows of the out-of-range id num_pages) through
    two chunks and three decode steps: the real rows' logits are bit for bit those of a run whose every other
    page holds random codes and NaN, the padding rows' logits are finite, and no page but the real rows' changes.
    (The shapes are the chunked steps' above, so the compiled chunk program is shared.)"""
    rng, seed = seeded_rng()
    batch, num_pages = 5, 5 * (MAX_LENGTH // PAGE_SIZE) + 3
    tables = np.full((batch, STEP_PAGES), num_pages, np.int32)
    owned = rng.permutation(num_pages)[: 2 * STEP_PAGES]
    tables[:2] = owned.reshape(2, -1)
    unowned = np.setdiff1d(np.arange(num_pages), owned)
    prompts = rng.integers(3, params.config.vocab_size, (2, 20))
    first = np.array([11, 6, 0, 0, 0], np.int32)
    second = np.array([9, 14, 0, 0, 0], np.int32)

    def run(cache):
        outputs = []
        for start, sizes in ((np.zeros(batch, np.int32), first), (first, second)):
            block = np.zeros((batch, CHUNK), np.int32)
            for row in range(2):
                block[row, : sizes[row]] = prompts[row, start[row] : start[row] + sizes[row]]
            state, logits = qoq_jax.prefill(
                params, jnp.asarray(block), jnp.asarray(sizes), cache=cache, start_positions=jnp.asarray(start)
            )
            cache = state.cache
            outputs.append(logits)
        for _ in range(3):
            state = dataclasses.replace(state, lengths=state.lengths.at[2:].set(0))  # as an engine pads each step
            state, logits = qoq_jax.decode_step(params, state, jnp.argmax(logits, axis=-1))
            outputs.append(logits)
        return state.cache, np.stack([np.asarray(o) for o in outputs])

    _, clean = run(_pool(params, num_pages, tables))
    poisoned = jax.tree.map(lambda leaf: _poison_pages(leaf, unowned, rng), _pool(params, num_pages, tables))
    before = jax.tree.map(np.asarray, poisoned)  # `run` donates the pool
    cache, outputs = run(poisoned)
    np.testing.assert_array_equal(outputs[:, :2], clean[:, :2], err_msg=f"seed {seed}")
    assert np.all(np.isfinite(outputs)) and np.all(np.isfinite(clean)), f"seed {seed}"
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(cache)):
        if old.ndim >= 3:  # pools (not the block tables)
            np.testing.assert_array_equal(np.asarray(new)[:, unowned], old[:, unowned], err_msg=f"seed {seed}")


def _poison_pages(leaf, pages, rng):
    """Pools get random codes, NaN scales / zeros / values on `pages`; block tables stay."""
    if leaf.ndim < 3:
        return leaf
    x = np.array(leaf)
    if x.dtype == np.uint8:
        x[:, pages] = rng.integers(0, 256, x[:, pages].shape)
    else:
        x[:, pages] = np.nan
    return jnp.asarray(x)
