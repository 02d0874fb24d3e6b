"""Paged prefill ("extend") attention: the Pallas kernel against its jnp reference, the reference against float64
causal attention over the dequantized pages, the masking rules (padding rows, unread slots, table entries past a
row's pages), input validation, and the CUDA (Triton) lowering at Llama-3-8B and SmolLM2 shapes checked on CPU.

`TestPagedPrefillAttention` runs the real kernel (GPU only); `TestPagedPrefillAttentionInterpret` runs the same
tests in Pallas interpret mode on CPU. Every test draws fresh random data; the seed is in the failure message.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import lower_for_cuda, triton_module_text
from paged_pools import float64_softmax_attention, make_pools, poison_unread, row_tokens, scribble_past
from seeding import seeded_rng
from suite_guard import assert_every_test_ran_and_passed

from pallas_kernels.paged_attention import code_width
from pallas_kernels.paged_prefill_attention import (
    PrefillAttentionBlockSizes,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    prefill_walk,
)

ON_GPU = jax.default_backend() == "gpu"
PAGE_SIZE = 8
CHUNK = 13  # not a multiple of any query block: the last block is partly padding


def chunk_rows(rng):
    """(start, length) per row: a prompt with no prefix; a prefix and chunk both ending on page boundaries; both
    mid-page; one query after a long prefix; a chunk ending past the block's query tiles; an empty real row; a
    random ragged row. Padding rows are added by the tests that need them."""
    start = int(rng.integers(0, 4 * PAGE_SIZE))
    return [
        (0, CHUNK),
        (2 * PAGE_SIZE, PAGE_SIZE),
        (PAGE_SIZE + 3, 5),
        (3 * PAGE_SIZE - 1, 1),
        (5, CHUNK),
        (4, 0),
        (start, int(rng.integers(1, CHUNK + 1))),
    ]


def make_chunks(rng, bits, rows, *, num_heads, num_kv_heads, head_dim, dtype=jnp.float32, slack_pages=2):
    """Chunks over a shuffled pool: rows own disjoint random pages, their tables `slack_pages` wider than their
    longest row needs (the extra slots hold other rows' pages, which the lengths must mask out)."""
    starts, lengths = (np.asarray(x, np.int32) for x in zip(*rows))
    pages_per_row = -(-int(np.max(starts + lengths)) // PAGE_SIZE) + slack_pages
    num_pages = len(rows) * pages_per_row + 5
    (k, k_scale, k_zero), (v, v_scale, v_zero) = make_pools(
        rng, bits, num_kv_heads=num_kv_heads, head_dim=head_dim, num_pages=num_pages, page_size=PAGE_SIZE, dtype=dtype
    )
    tables = rng.permutation(num_pages)[: len(rows) * pages_per_row].reshape(len(rows), -1)
    q = jnp.asarray(rng.normal(size=(len(rows), CHUNK, num_heads, head_dim)), dtype)
    row_args = (jnp.asarray(tables, jnp.int32), jnp.asarray(starts), jnp.asarray(lengths))
    return (q, k, v, *row_args, k_scale, k_zero, v_scale, v_zero)


def float64_prefill_attention(
    q, k, v, tables, starts, lengths, k_scale, k_zero, v_scale, v_zero, *, bits, window=None, **options
):
    """Independent float64 numpy causal attention: query t of row b over the row's tokens 0 … starts[b] + t (its
    last `window` of them)."""
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        keys = row_tokens(k, k_scale, k_zero, tables[b], bits=bits)
        values = row_tokens(v, v_scale, v_zero, tables[b], bits=bits)
        for t in range(int(lengths[b])):
            end = int(starts[b]) + t + 1
            first = 0 if window is None else max(0, end - window)
            query = np.asarray(q[b, t], np.float64)
            out[b, t] = float64_softmax_attention(query, keys[:, first:end], values[:, first:end], **options)
    return out


def small_blocks(num_heads, num_kv_heads):
    """Several query blocks per chunk and two pages per step, at the fewest rows a dot takes (16)."""
    group = -(-num_heads // num_kv_heads)
    padded_group = 1 << (group - 1).bit_length()
    return PrefillAttentionBlockSizes(query_tokens=max(1, 16 // padded_group), pages_per_block=2)


# (head_dim, query heads, KV heads): GQA groups 1, 3 (padded to 4) and 4 (MQA), at both head dims.
HEAD_SHAPES = [(64, 2, 2), (64, 6, 2), (128, 4, 1)]


class TestPagedPrefillAttention:
    """Kernel against reference; the real kernel, so GPU only (see the interpret subclass)."""

    INTERPRET = False

    @classmethod
    def skip_reason(cls) -> str | None:
        if not cls.INTERPRET and not ON_GPU:
            return "the real Pallas Triton kernel needs a GPU; TestPagedPrefillAttentionInterpret runs it on CPU"
        return None

    @pytest.fixture(autouse=True)
    def _backend(self):
        if self.skip_reason():
            pytest.skip(self.skip_reason())

    @pytest.mark.parametrize("bits", [4, 8, 16])
    @pytest.mark.parametrize("head_dim, num_heads, num_kv_heads", HEAD_SHAPES)
    def test_kernel_matches_reference(self, bits, head_dim, num_heads, num_kv_heads):
        rng, seed = seeded_rng()
        args = make_chunks(
            rng, bits, chunk_rows(rng), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
        )
        blocks = small_blocks(num_heads, num_kv_heads)
        actual = paged_prefill_attention(*args, bits=bits, block_sizes=blocks, interpret=self.INTERPRET)
        expected = paged_prefill_attention_reference(*args, bits=bits)
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")

    @pytest.mark.parametrize("bits", [4, 16])
    def test_padding_rows_and_unread_slots_count_nothing(self, bits):
        """Padding rows (length 0, table filled with the out-of-range id num_pages; one with a start, as a
        finished row may have) get zeros and do no step. Slots past each row's end (the rest of its last page,
        pages it does not own) may hold NaN, and its table entries past its pages any id, without changing any
        output."""
        rng, seed = seeded_rng()
        rows = chunk_rows(rng) + [(0, 0), (9, 0)]
        q, k, v, tables, starts, lengths, *scales = make_chunks(
            rng, bits, rows, num_heads=8, num_kv_heads=2, head_dim=64
        )
        num_pages = k.shape[1]
        tables = tables.at[-2:].set(num_pages)
        expected = paged_prefill_attention_reference(q, k, v, tables, starts, lengths, *scales, bits=bits)
        ends = starts + lengths
        tables = scribble_past(tables, ends, PAGE_SIZE, num_pages, rng)
        k, k_scale, k_zero = poison_unread((k, *scales[:2]), tables, ends, PAGE_SIZE)
        v, v_scale, v_zero = poison_unread((v, *scales[2:]), tables, ends, PAGE_SIZE)
        args = (q, k, v, tables, starts, lengths, k_scale, k_zero, v_scale, v_zero)
        actual = np.asarray(
            paged_prefill_attention(*args, bits=bits, block_sizes=small_blocks(8, 2), interpret=self.INTERPRET)
        )
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(paged_prefill_attention_reference(*args, bits=bits), expected)
        for b, n in enumerate(np.asarray(lengths)):
            assert np.all(actual[b, n:] == 0), f"queries past row {b}'s length must give zeros (seed {seed})"

    @pytest.mark.parametrize("bits", [4, 16])
    def test_sliding_window_and_softcap(self, bits):
        """A window shorter than most rows' context (mid-page, unaligned to the two pages a step), Gemma's scale
        and soft-capped logits: kernel and reference equal float64 attention over each query's last `window`
        tokens, whatever the slots before a row's first window hold (NaN here)."""
        rng, seed = seeded_rng()
        q, k, v, tables, starts, lengths, *scales = make_chunks(
            rng, bits, chunk_rows(rng), num_heads=8, num_kv_heads=2, head_dim=64
        )
        options = dict(sm_scale=0.2, softcap=1.5, window=PAGE_SIZE + 3)
        expected = float64_prefill_attention(q, k, v, tables, starts, lengths, *scales, bits=bits, **options)
        ends, begins = starts + lengths, np.maximum(np.asarray(starts) + 1 - options["window"], 0)
        k, k_scale, k_zero = poison_unread((k, *scales[:2]), tables, ends, PAGE_SIZE, begins)
        v, v_scale, v_zero = poison_unread((v, *scales[2:]), tables, ends, PAGE_SIZE, begins)
        args = (q, k, v, tables, starts, lengths, k_scale, k_zero, v_scale, v_zero)
        reference = paged_prefill_attention_reference(*args, bits=bits, **options)
        np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
        blocks = small_blocks(8, 2)
        actual = paged_prefill_attention(*args, bits=bits, block_sizes=blocks, interpret=self.INTERPRET, **options)
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")

    def test_bfloat16_queries_with_default_blocks(self):
        """The model's dtype and the default tiles (one query block here): codes and weights enter the dots as
        bf16, the softmax stays float32."""
        rng, seed = seeded_rng()
        args = make_chunks(rng, 4, chunk_rows(rng), num_heads=8, num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16)
        actual = paged_prefill_attention(*args, bits=4, interpret=self.INTERPRET)
        assert actual.dtype == jnp.bfloat16
        expected = float64_prefill_attention(*args, bits=4)
        np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0.03, atol=0.03, err_msg=f"{seed}")


class TestPagedPrefillAttentionInterpret(TestPagedPrefillAttention):
    INTERPRET = True


def test_interpret_suite_is_not_skipped(request):
    """The CPU suite must really run the kernel tests, not only collect them: every test of the interpret class
    ran before this one and passed, and the real-kernel class runs only on a GPU."""
    assert_every_test_ran_and_passed(request, TestPagedPrefillAttentionInterpret)
    assert TestPagedPrefillAttention.skip_reason() is not None or ON_GPU


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads", [(64, 6, 2), (128, 32, 8)])
def test_reference_matches_float64(bits, head_dim, num_heads, num_kv_heads):
    rng, seed = seeded_rng()
    args = make_chunks(rng, bits, chunk_rows(rng), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    actual = paged_prefill_attention_reference(*args, bits=bits)
    expected = float64_prefill_attention(*args, bits=bits)
    # float32 softmax sums over a few hundred keys: ~1e-5 from float64 at the worst of 10^5 outputs.
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")


def test_walk_never_visits_pages_before_every_querys_window(rng):
    """A query block's walk starts at the page holding its first query's window start: no page wholly before
    every window of the block is visited, and every page a query of the block sees is."""
    page_size, per_block, query_tokens = 4, 2, 3
    cases = zip(rng.integers(0, 30, 200), rng.integers(0, 12, 200), rng.choice([1, 5, 9, None], 200))
    for start, length, window in cases:
        for first_query in range(0, 12, query_tokens):
            _, first, end, steps = prefill_walk(
                int(start), int(length), first_query, window, query_tokens=query_tokens, table_tokens=64,
                page_size=page_size, pages_per_block=per_block,
            )
            visited = set(range(int(first), int(first) + int(steps) * per_block))
            queries = [start + t for t in range(first_query, min(first_query + query_tokens, int(length)))]
            seen = {
                key // page_size
                for p in queries
                for key in range(0 if window is None else max(0, p - int(window) + 1), p + 1)
            }
            assert seen <= visited and len(visited - seen) < per_block, (start, length, window, first_query)


def test_refuses_malformed_inputs():
    rng, _ = seeded_rng()
    q, k, v, tables, starts, lengths, *scales = make_chunks(
        rng, 4, [(0, 5), (3, 2)], num_heads=4, num_kv_heads=2, head_dim=64
    )
    with pytest.raises(ValueError, match="q must be"):
        paged_prefill_attention_reference(q[:, 0], k, v, tables, starts, lengths, *scales, bits=4)
    with pytest.raises(ValueError, match="starts must be"):
        paged_prefill_attention_reference(q, k, v, tables, starts[:1], lengths, *scales, bits=4)
    with pytest.raises(ValueError, match="need width 64"):
        paged_prefill_attention_reference(q, k, v, tables, starts, lengths, *scales, bits=8)
    with pytest.raises(ValueError, match="block_tables must be"):
        paged_prefill_attention_reference(q, k, v, tables[:1], starts, lengths, *scales, bits=4)
    with pytest.raises(ValueError, match="must be a power of two ≥ 16"):
        blocks = PrefillAttentionBlockSizes(query_tokens=2, pages_per_block=1)
        paged_prefill_attention(q, k, v, tables, starts, lengths, *scales, bits=4, block_sizes=blocks, interpret=True)
    with pytest.raises(ValueError, match="power-of-two page_size"):
        small = make_chunks(rng, 4, [(0, 5)], num_heads=4, num_kv_heads=2, head_dim=16)
        paged_prefill_attention(*small, bits=4, interpret=True)


def test_default_block_sizes_fill_32_rows():
    llama3_8b = PrefillAttentionBlockSizes.for_shape(group=4, page_size=64, head_dim=128)
    assert (llama3_8b.query_tokens, llama3_8b.pages_per_block, llama3_8b.num_warps) == (8, 1, 8)
    smollm2 = PrefillAttentionBlockSizes.for_shape(group=3, page_size=16, head_dim=64)  # group padded to 4
    assert (smollm2.query_tokens, smollm2.pages_per_block, smollm2.num_warps) == (8, 4, 8)
    assert PrefillAttentionBlockSizes.for_shape(group=1, page_size=128, head_dim=128).query_tokens == 32


# --- the CUDA lowering, checked on CPU ----------------------------------------------------------------------

# (batch, chunk, query heads, KV heads, head_dim, pages per row, pool pages): Llama-3-8B and SmolLM2-135M.
LOWERING_SHAPES = [(4, 512, 32, 8, 128, 64, 4096), (2, 256, 9, 3, 64, 32, 1000)]


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("batch, chunk, num_heads, num_kv_heads, head_dim, pages_per_row, num_pages", LOWERING_SHAPES)
def test_lowers_for_cuda(bits, batch, chunk, num_heads, num_kv_heads, head_dim, pages_per_row, num_pages):
    """The Triton lowering (with explicit Triton CompilerParams) accepts the kernel at real shapes, and the dots
    are tensor-core dots on bf16 tiles of 32 query rows: two per step each way for KV4 (nibble halves), one for
    KV8/16."""
    page_size, dtype = 64, jnp.bfloat16
    pool = ((num_kv_heads, num_pages, page_size, code_width(head_dim, bits)), jnp.uint8 if bits < 16 else dtype)
    scales = [((num_kv_heads, num_pages, page_size), jnp.float16)] * 4 if bits < 16 else []
    rows = ((batch,), jnp.int32)
    lowered = lower_for_cuda(
        lambda q, k, v, tables, starts, lengths, *s: paged_prefill_attention(
            q, k, v, tables, starts, lengths, *s, bits=bits
        ),
        ((batch, chunk, num_heads, head_dim), dtype),
        pool,
        pool,
        ((batch, pages_per_row), jnp.int32),
        rows,
        rows,
        *scales,
    )
    blocks = PrefillAttentionBlockSizes.for_shape(num_heads // num_kv_heads, page_size, head_dim)
    module = triton_module_text(lowered)
    assert f"@paged_prefill_attention_kv{bits}_p64_q{blocks.query_tokens}_r32_b{blocks.pages_per_block}" in module
    width, keys = code_width(head_dim, bits), blocks.pages_per_block * page_size
    dots = re.findall(r"tt\.dot .*: tensor<(\w+)> \* tensor<(\w+)> -> tensor<(\w+)>", module)
    qk = (f"32x{width}xbf16", f"{width}x{keys}xbf16", f"32x{keys}xf32")
    pv = (f"32x{keys}xbf16", f"{keys}x{width}xbf16", f"32x{width}xf32")
    assert sorted(dots) == sorted([qk, pv] * (2 if bits == 4 else 1))


def test_sliding_window_soft_capped_variant_lowers_for_cuda():
    """Gemma 2 2B's chunked prefill (8 query and 4 KV heads of 256, a 4096-token window, soft-cap 50) at KV4."""
    page_size, head_dim, dtype = 64, 256, jnp.bfloat16
    pool = ((4, 2048, page_size, code_width(head_dim, 4)), jnp.uint8)
    scales = [((4, 2048, page_size), jnp.float16)] * 4
    rows = ((2,), jnp.int32)
    lowered = lower_for_cuda(
        lambda q, k, v, tables, starts, lengths, *s: paged_prefill_attention(
            q, k, v, tables, starts, lengths, *s, bits=4, sm_scale=256**-0.5, softcap=50.0, window=4096
        ),
        ((2, 256, 8, head_dim), dtype),
        pool,
        pool,
        ((2, 128), jnp.int32),
        rows,
        rows,
        *scales,
    )
    module = triton_module_text(lowered)
    assert re.search(r"@paged_prefill_attention_kv4_p64_q\d+_r\d+_b1_capped_w4096", module)
