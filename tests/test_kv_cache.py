"""The paged KV cache: quantized writes read back, generation through the pages against a cache-free model, the
engine's shared-pool prefill, the exact memory budget, the decode and chunked-prefill steps' CUDA lowering through
the kernels, and which attention implementation runs (and which fallbacks are reported)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import lowering_test
from seeding import seeded_rng
from tiny_models import TINY_CONFIGS, sharp_tiny_llama

import qoq_jax
from pallas_kernels.paged_attention import gather_kv
from qoq_jax import kv_cache
from qoq_jax.kv_cache import (
    PagedKVCache,
    attention_implementations,
    kv_bytes_per_page,
    kv_bytes_per_token,
    pages_that_fit,
)
from serve.kv_cache_manager import KVCacheManager
from qoq_jax.quant import dequantize_kv, quantize_kv
from qoq_jax.steps import DecodeState


def _config(name="llama"):
    return qoq_jax.ModelConfig.from_hf(TINY_CONFIGS[name]().to_dict())


@pytest.mark.parametrize("bits,dtype", [(4, "float32"), (8, "float32"), (16, "float32"), (16, "bfloat16")])
def test_writes_then_reads_reproduce_the_quantized_values(bits, dtype):
    """Prompt tokens land in their rows' pages as quantize→dequantize of their keys and values; padding tokens
    and tokens past a row's table are dropped, and no other page changes. bfloat16 pages on the jnp path hold
    their values' bits."""
    rng, seed = seeded_rng()
    config = _config()
    page_size, batch, length = 4, 3, 10
    tables = jnp.asarray(rng.permutation(12)[:9].reshape(batch, 3), jnp.int32)  # 12 pages: 3 never used
    cache = PagedKVCache.init(config, num_pages=12, page_size=page_size, block_tables=tables, dtype=dtype, kv_bits=bits)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    lengths = np.array([10, 1, 7])
    valid = positions < lengths[:, None]
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    k, v = (jnp.asarray(rng.normal(size=shape) * 3 + 1, dtype) for _ in range(2))
    q = jnp.asarray(rng.normal(size=(batch, length, config.num_heads, config.head_dim)), dtype)
    _, cache = cache.attend(1, q, k, v, positions, valid)
    stored_as = {4: jnp.uint8, 8: jnp.uint8, 16: jnp.uint16 if dtype == "bfloat16" else jnp.float32}[bits]
    assert cache.keys[1].codes.dtype == stored_as

    for pool, x in ((cache.keys[1], k), (cache.values[1], v)):
        everything = jnp.full((batch,), tables.shape[1] * page_size)
        stored = np.asarray(gather_kv(pool.pages, pool.scale, pool.zero, tables, everything, bits=bits))
        expected = x.astype(jnp.float32) if bits == 16 else dequantize_kv(*quantize_kv(x, bits), jnp.float32)
        expected = np.moveaxis(np.asarray(expected), 2, 1)  # [B, Hkv, T, D]
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(stored[b, :, :n], expected[b, :, :n], err_msg=f"seed {seed}")
            assert not np.any(stored[b, :, n:]), f"padding was written (seed {seed})"
        unused = np.setdiff1d(np.arange(12), np.asarray(tables))
        assert not np.any(np.asarray(pool.codes)[:, unused])
    assert not np.any(np.asarray(cache.keys[0].codes)), "another layer's pool changed"


@pytest.fixture(scope="module")
def sharp_params():
    """The tiny Llama with logits sharp enough that greedy choices are far from ties."""
    return sharp_tiny_llama(seed=5)


def _rounding(logits) -> float:
    """float32 rounding through the sharp model, whose logits reach ~±16: 1e-4 of their magnitude (seen: 1.6e-5)."""
    return 1e-4 * float(np.max(np.abs(logits)))


def test_generation_through_the_pages_equals_the_cache_free_model(sharp_params):
    """Greedy decoding through an fp32 KV16 pool of 8-token pages (several pages, a partial last one) gives, at
    every step, the logits the cache-free `forward` gives on the whole generated sequence."""
    rng, seed = seeded_rng()
    prompts = [list(rng.integers(3, 300, n)) for n in (5, 13)]
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    state, logits = qoq_jax.prefill(sharp_params, jnp.asarray(tokens), lengths, max_length=40, page_size=8)
    steps = [logits]
    for _ in range(20):
        state, logits = qoq_jax.decode_step(sharp_params, state, jnp.argmax(logits, axis=-1))
        steps.append(logits)
    steps = np.stack(steps, axis=1)  # [B, 21, vocab]
    generated = np.argmax(steps, axis=-1)
    for i, prompt in enumerate(prompts):
        sequence = jnp.asarray([prompt + list(generated[i, :-1])])
        reference = np.asarray(qoq_jax.forward(sharp_params, sequence)[0, len(prompt) - 1 :])
        np.testing.assert_allclose(steps[i], reference, rtol=0, atol=_rounding(reference), err_msg=f"seed {seed}")
    assert np.asarray(state.lengths).tolist() == [25, 33]


def test_prefill_into_a_shared_pool_matches_a_private_cache():
    """The serving path: rows on scattered pages of one pool (the allocator's tables) decode exactly as rows on
    their own fresh pages, at KV4, and the pages of rows not in the batch stay untouched."""
    rng, seed = seeded_rng()
    config = _config()
    params = qoq_jax.init_params(config, seed=3, quant=qoq_jax.QuantFormat("w8a8", kv_bits=4))
    tokens = jnp.asarray(rng.integers(3, 300, (2, 16)), jnp.int32)
    lengths = jnp.asarray([16, 9], jnp.int32)

    def run(state, logits):
        outputs = [logits]
        for _ in range(6):
            state, logits = qoq_jax.decode_step(params, state, jnp.argmax(logits, axis=-1))
            outputs.append(logits)
        return state, np.stack(outputs)

    _, private = run(*qoq_jax.prefill(params, tokens, lengths, max_length=32, page_size=8))

    allocator = KVCacheManager(num_pages=20, page_size=8)
    allocator.allocate("other", 24)  # someone else's pages first, so ours are not 0..7
    for row in ("b", "a"):
        allocator.allocate(row, 32)
    allocator.release("other")
    allocator.allocate("c", 8)
    pool = PagedKVCache.init(
        config,
        num_pages=20,
        page_size=8,
        block_tables=allocator.block_tables(["a", "b"], 4),
        dtype=params.dtype,
        kv_bits=4,
    )
    state, shared = run(*qoq_jax.prefill(params, tokens, lengths, cache=pool))
    np.testing.assert_allclose(shared, private, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
    untouched = np.asarray(
        allocator.block_table("c")
        + [p for p in range(20) if p not in allocator.block_table("a") and p not in allocator.block_table("b")]
    )
    for pool in state.cache.keys + state.cache.values:
        assert not np.any(np.asarray(pool.codes)[:, untouched]) and not np.any(np.asarray(pool.scale)[:, untouched])


def test_decoding_past_the_table_writes_nothing():
    """Inside a jit, a row whose table is full drops its new token instead of overwriting a page (its own or
    another row's); called eagerly the step refuses it (tests/test_validation.py)."""
    rng, _ = seeded_rng()
    params = qoq_jax.init_params(_config(), seed=2)
    tokens = jnp.asarray(rng.integers(3, 300, (2, 8)), jnp.int32)
    state, logits = qoq_jax.prefill(params, tokens, max_length=8, page_size=8)
    before = jax.tree_util.tree_map(np.asarray, state.cache)
    state, _ = jax.jit(qoq_jax.decode_step)(params, state, jnp.argmax(logits, axis=-1))
    after = jax.tree_util.tree_map(np.asarray, state.cache)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)


def test_prefill_refuses_inconsistent_caches():
    params = qoq_jax.init_params(_config(), seed=2)
    tokens = jnp.ones((2, 16), jnp.int32)
    cache = PagedKVCache.for_batch(params.config, 3, 16, page_size=8, dtype=params.dtype, kv_bits=16)
    with pytest.raises(ValueError, match="block tables for 3 rows"):
        qoq_jax.prefill(params, tokens, cache=cache)
    with pytest.raises(ValueError, match="either max_length"):
        qoq_jax.prefill(params, tokens[:1], max_length=16, cache=cache)
    with pytest.raises(ValueError, match="shorter than the 16-token prompt block"):
        qoq_jax.prefill(params, tokens, max_length=8)


@pytest.mark.parametrize("bits, dtype", [(4, jnp.bfloat16), (8, jnp.bfloat16), (16, jnp.bfloat16), (16, jnp.float32)])
def test_page_bytes_are_exactly_what_the_pool_allocates(bits, dtype):
    config = _config("llama_quantizable")
    cache = PagedKVCache.for_batch(config, 2, 48, page_size=16, dtype=dtype, kv_bits=bits)
    pools = cache.keys + cache.values
    allocated = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(pools))
    assert allocated == 6 * kv_bytes_per_page(config, 16, bits, dtype)  # 2 rows × 3 pages
    assert kv_bytes_per_page(config, 16, bits, dtype) == 16 * kv_bytes_per_token(config, bits, dtype)


def test_llama3_8b_budget_counts_bytes_not_bits():
    """QServe's per-layer K page is H_kv·64·D/2 + 64·H_kv·4 = 34816 bytes for Llama-3-8B; its budget formula
    (cache_bits·L·2·64·H_kv·D with cache_bits = 4 read as bytes) is 8× the codes and misses the scales."""
    config = qoq_jax.ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_context=8192,
    )
    page = kv_bytes_per_page(config, 64, 4, jnp.float16)
    assert page == 32 * 2 * 34816
    qserve_budget = 4 * 32 * 2 * 64 * 8 * 128
    assert qserve_budget / (32 * 2 * 8 * 64 * 128 // 2) == 8
    # 80 GB with 16 GB of weights and 4 GB reserved: every remaining byte goes to whole pages.
    fitting = pages_that_fit(
        config, 80 * 2**30, 16 * 2**30, page_size=64, kv_bits=4, dtype=jnp.float16, reserve_bytes=4 * 2**30
    )
    assert fitting == (60 * 2**30) // page and fitting * page <= 60 * 2**30 < (fitting + 1) * page
    assert pages_that_fit(config, 2**30, 2**31, page_size=64, kv_bits=4, dtype=jnp.float16) == 0
    assert kv_bytes_per_page(config, 64, 16, jnp.bfloat16) == 64 * 32 * 2 * 8 * 128 * 2


@lowering_test
def test_quantized_decode_step_lowers_for_cuda_through_the_kernels():
    """decode_step of a W4A8KV4 model with kernel="pallas" passes the CUDA lowering on CPU: the GEMMs (one per
    distinct linear shape) and the KV4 paged decode attention are Triton custom calls."""
    config = _config("llama_quantizable")
    quant = qoq_jax.QuantFormat("w4a8-g128", group_size=64, kernel="pallas")
    params = qoq_jax.init_params(config, dtype="bfloat16", quant=quant)
    state = jax.eval_shape(
        lambda: DecodeState(
            PagedKVCache.for_batch(config, 4, 256, page_size=64, dtype=jnp.bfloat16, kv_bits=4, kernel="pallas"),
            jnp.zeros((4,), jnp.int32),
        )
    )
    text = qoq_jax.decode_step.trace(params, state, jax.ShapeDtypeStruct((4,), jnp.int32))
    text = text.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 5
    assert 'name = "paged_decode_attention_kv4_p64' in text


@lowering_test
def test_quantized_chunked_prefill_lowers_for_cuda_through_the_kernels():
    """prefill of chunks over cached pages (start_positions) in a W4A8KV4 model with kernel="pallas" passes the
    CUDA lowering on CPU: the GEMMs and the KV4 paged prefill attention are Triton custom calls."""
    config = _config("llama_quantizable")
    quant = qoq_jax.QuantFormat("w4a8-g128", group_size=64, kernel="pallas")
    params = qoq_jax.init_params(config, dtype="bfloat16", quant=quant)
    cache = jax.eval_shape(
        lambda: PagedKVCache.for_batch(config, 4, 256, page_size=64, dtype=jnp.bfloat16, kv_bits=4, kernel="pallas")
    )
    rows = jax.ShapeDtypeStruct((4,), jnp.int32)
    traced = qoq_jax.prefill.trace(
        params, jax.ShapeDtypeStruct((4, 64), jnp.int32), rows, cache=cache, start_positions=rows
    )
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 5
    assert 'name = "paged_prefill_attention_kv4_p64' in text


def test_chunked_prefill_equals_one_prefill(sharp_params):
    """A prompt prefilled in chunks of 5, 7 and the rest (padded to a 16-token block, as an engine's buckets
    are) through an fp32 KV16 pool gives the logits of prefilling it at once, then decodes the same."""
    rng, seed = seeded_rng()
    prompt = jnp.asarray(rng.integers(3, 300, (1, 21)), jnp.int32)
    whole_state, whole = qoq_jax.prefill(sharp_params, prompt, max_length=32, page_size=8)
    cache = PagedKVCache.for_batch(sharp_params.config, 1, 32, page_size=8, dtype=jnp.float32, kv_bits=16)
    start = 0
    for size in (5, 7, 9):
        block = jnp.zeros((1, 16), jnp.int32).at[0, :size].set(prompt[0, start : start + size])
        state, logits = qoq_jax.prefill(
            sharp_params, block, jnp.asarray([size]), cache=cache, start_positions=jnp.asarray([start])
        )
        cache, start = state.cache, start + size
    assert int(state.lengths[0]) == 21 and not state.cache.continues_prefix
    np.testing.assert_allclose(logits, whole, rtol=0, atol=_rounding(whole), err_msg=f"seed {seed}")
    token = jnp.argmax(logits, axis=-1)
    _, chunked_next = qoq_jax.decode_step(sharp_params, state, token)
    _, whole_next = qoq_jax.decode_step(sharp_params, whole_state, token)
    np.testing.assert_allclose(chunked_next, whole_next, rtol=0, atol=_rounding(whole_next), err_msg=f"seed {seed}")


@pytest.fixture
def fresh_choices():
    """The implementation choices are made (and their fallbacks logged) once per process: start and end clean."""
    kv_cache.paged_implementation.cache_clear()
    kv_cache.prefill_implementation.cache_clear()
    yield
    kv_cache.paged_implementation.cache_clear()
    kv_cache.prefill_implementation.cache_clear()


def test_attention_off_gpu_runs_the_references_without_a_warning(fresh_choices, caplog):
    with caplog.at_level(logging.WARNING, logger="qoq_jax.kv_cache"):
        chosen = attention_implementations(_config(), page_size=64, dtype=jnp.bfloat16)
    assert (chosen.decode, chosen.extend, chosen.prefill, chosen.fallbacks) == ("reference", "reference", "xla", ())
    assert chosen.describe() == "decode=reference extend=reference prefill=xla" and not caplog.records


def test_gpu_fallbacks_are_decided_up_front_reported_and_logged_once(fresh_choices, monkeypatch, caplog):
    """On a GPU backend, "auto" takes the Pallas kernels where they load the shapes and cuDNN where it accepts
    them; where not, the fallback is named in `fallbacks` and logged once at warning level, however often the
    model is traced. A forced "reference" is a choice, not a fallback. (Faked on CPU: the cuDNN probe really runs
    and really fails here, as it does on a GPU without cuDNN.)"""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    odd = _config("llama_head_dim_24_mqa_bias")  # head_dim 24: no Triton load of that width
    with caplog.at_level(logging.WARNING, logger="qoq_jax.kv_cache"):
        first = attention_implementations(odd, page_size=16, dtype=jnp.bfloat16)
        assert attention_implementations(odd, page_size=16, dtype=jnp.bfloat16) == first
        tiny_pages = attention_implementations(_config(), page_size=4, dtype=jnp.float32)
        forced = attention_implementations(odd, page_size=16, dtype=jnp.bfloat16, kernel="reference")
    assert (first.decode, first.extend, first.prefill) == ("reference", "reference", "xla")
    assert "head_dim 24" in first.fallbacks[0] and "cuDNN is not detected" in first.fallbacks[1]
    assert (tiny_pages.decode, tiny_pages.prefill) == ("reference", "xla")
    assert "page_size 4" in tiny_pages.fallbacks[0] and "float32" in tiny_pages.fallbacks[1]
    assert (forced.decode, forced.prefill, forced.fallbacks) == ("reference", "xla", ())
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert sorted(warnings) == sorted(first.fallbacks + tiny_pages.fallbacks)  # each once
    supported = attention_implementations(_config("llama_quantizable"), page_size=64, dtype=jnp.bfloat16)
    assert (supported.decode, supported.extend) == ("pallas", "pallas")
