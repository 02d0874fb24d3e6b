"""Paged decode attention: the Pallas kernel against its jnp reference, the reference against float64 attention
over the dequantized pages, the KV4 packing, input validation, and the CUDA (Triton) lowering at Llama-3-8B and
SmolLM2 shapes checked on CPU.

`TestPagedDecodeAttention` runs the real kernel (GPU only); `TestPagedDecodeAttentionInterpret` runs the same
tests in Pallas interpret mode on CPU. Every test draws fresh random data; the seed is in the failure message.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import lower_for_cuda, triton_module_text
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from paged_pools import float64_softmax_attention, make_pools, poison_unread, row_tokens, scribble_past
from seeding import seeded_rng
from suite_guard import assert_every_test_ran_and_passed

from pallas_kernels.paged_attention import (
    DecodeAttentionBlockSizes,
    code_width,
    decode_walk,
    pack_kv_codes,
    paged_decode_attention,
    paged_decode_attention_reference,
    unpack_kv_codes,
)

ON_GPU = jax.default_backend() == "gpu"
PAGE_SIZE = 8


def make_case(rng, bits, *, batch_lengths, num_heads, num_kv_heads, head_dim, dtype=jnp.float32, slack_pages=3):
    """A decode batch over a shuffled pool: rows own disjoint random pages; tables are as wide as the longest
    row plus `slack_pages` unused slots (holding other rows' pages, which the lengths must mask out)."""
    pages_per_row = -(-max(batch_lengths) // PAGE_SIZE) + slack_pages
    num_pages = len(batch_lengths) * pages_per_row + 5
    (k, k_scale, k_zero), (v, v_scale, v_zero) = make_pools(
        rng, bits, num_kv_heads=num_kv_heads, head_dim=head_dim, num_pages=num_pages, page_size=PAGE_SIZE, dtype=dtype
    )
    tables = rng.permutation(num_pages)[: len(batch_lengths) * pages_per_row].reshape(len(batch_lengths), -1)
    q = jnp.asarray(rng.normal(size=(len(batch_lengths), num_heads, head_dim)), dtype)
    args = (q, k, v, jnp.asarray(tables, jnp.int32), jnp.asarray(batch_lengths, jnp.int32))
    return args + (k_scale, k_zero, v_scale, v_zero)


def float64_attention(q, k, v, tables, lengths, k_scale, k_zero, v_scale, v_zero, *, bits, window=None, **options):
    """Independent float64 numpy attention over each row's dequantized pages (its last `window` tokens)."""
    rows = []
    for b, n in enumerate(np.asarray(lengths)):
        first = 0 if window is None else max(0, n - window)
        keys = row_tokens(k, k_scale, k_zero, tables[b], bits=bits)[:, first:n]
        values = row_tokens(v, v_scale, v_zero, tables[b], bits=bits)[:, first:n]
        rows.append(float64_softmax_attention(np.asarray(q[b], np.float64), keys, values, **options))
    return np.stack(rows)


# (head_dim, query heads, KV heads): GQA ratios 1, 3, 4 and 8 at both head dims.
HEAD_SHAPES = [(64, 2, 2), (64, 6, 2), (128, 4, 1), (128, 16, 2)]
# 1 token, a page ± 1, and a long row over many pages.
LENGTHS = [1, PAGE_SIZE - 1, PAGE_SIZE + 1, 5 * PAGE_SIZE + 3]


class TestPagedDecodeAttention:
    """Kernel against reference; the real kernel, so GPU only (see the interpret subclass)."""

    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _backend(self):
        if not self.INTERPRET and not ON_GPU:
            pytest.skip("the real Pallas Triton kernel needs a GPU; TestPagedDecodeAttentionInterpret runs it on CPU")

    @pytest.mark.parametrize("bits", [4, 8, 16])
    @pytest.mark.parametrize("head_dim, num_heads, num_kv_heads", HEAD_SHAPES)
    def test_kernel_matches_reference(self, bits, head_dim, num_heads, num_kv_heads):
        rng, seed = seeded_rng()
        lengths = list(LENGTHS) + [int(rng.integers(1, 6 * PAGE_SIZE))]
        args = make_case(
            rng, bits, batch_lengths=lengths, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
        )
        # Two pages per step and two splits: several steps per split, a split past the short rows' lengths.
        blocks = DecodeAttentionBlockSizes(pages_per_block=2, num_splits=2)
        actual = paged_decode_attention(*args, bits=bits, block_sizes=blocks, interpret=self.INTERPRET)
        expected = paged_decode_attention_reference(*args, bits=bits)
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")

    @pytest.mark.parametrize("num_splits", [1, 4])
    def test_splits_and_empty_rows(self, num_splits):
        """Any split count gives the same result; a row of length 0 gets zeros, not NaN; a length past the block
        table (7 pages here, padded to 8 for 4 splits) is cut to the table, never reading the padding."""
        rng, seed = seeded_rng()
        args = make_case(rng, 4, batch_lengths=[0, 3, 4 * PAGE_SIZE], num_heads=4, num_kv_heads=2, head_dim=64)
        args = args[:4] + (jnp.asarray([0, 3, 10**6], jnp.int32),) + args[5:]
        blocks = DecodeAttentionBlockSizes(pages_per_block=1, num_splits=num_splits)
        actual = np.asarray(paged_decode_attention(*args, bits=4, block_sizes=blocks, interpret=self.INTERPRET))
        expected = paged_decode_attention_reference(*args, bits=4)
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")
        assert np.all(actual[0] == 0)

    @pytest.mark.parametrize("bits", [4, 16])
    def test_padding_rows_and_unread_slots_count_nothing(self, bits):
        """Padding rows (length 0 or 1, their table filled with the out-of-range id num_pages) get zeros. Slots no
        row's length reaches (the rest of a last page, unowned pages) may hold NaN, and table entries past a row's
        pages may hold any id, without changing any row's output."""
        rng, seed = seeded_rng()
        lengths = [0, 1, 13, 3 * PAGE_SIZE, 2]
        q, k, v, tables, lengths, *scales = make_case(
            rng, bits, batch_lengths=lengths, num_heads=4, num_kv_heads=2, head_dim=64
        )
        num_pages = k.shape[1]
        tables = tables.at[:2].set(num_pages)
        expected = paged_decode_attention_reference(q, k, v, tables, lengths, *scales, bits=bits)
        tables = scribble_past(tables, lengths, PAGE_SIZE, num_pages, rng)
        k, k_scale, k_zero = poison_unread((k, *scales[:2]), tables, lengths, PAGE_SIZE)
        v, v_scale, v_zero = poison_unread((v, *scales[2:]), tables, lengths, PAGE_SIZE)
        args = (q, k, v, tables, lengths, k_scale, k_zero, v_scale, v_zero)
        blocks = DecodeAttentionBlockSizes(pages_per_block=2, num_splits=2)
        actual = np.asarray(paged_decode_attention(*args, bits=bits, block_sizes=blocks, interpret=self.INTERPRET))
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(paged_decode_attention_reference(*args, bits=bits), expected)
        assert np.all(actual[:2] == 0)

    @pytest.mark.parametrize("bits", [4, 16])
    def test_sliding_window_and_softcap(self, bits):
        """A window shorter than most rows, starting mid-page and mid-step (two pages a step, two splits), with
        Gemma's scale and soft-capped logits: kernel and reference equal float64 attention over each row's last
        `window` tokens, whatever the slots before the window hold (NaN here)."""
        rng, seed = seeded_rng()
        lengths = [1, PAGE_SIZE + 2, 3 * PAGE_SIZE + 5, 6 * PAGE_SIZE - 1, 4 * PAGE_SIZE, int(rng.integers(1, 48))]
        q, k, v, tables, lengths, *scales = make_case(
            rng, bits, batch_lengths=lengths, num_heads=4, num_kv_heads=2, head_dim=64
        )
        options = dict(sm_scale=0.2, softcap=1.5, window=2 * PAGE_SIZE + 3)
        expected = float64_attention(q, k, v, tables, lengths, *scales, bits=bits, **options)
        begins = np.maximum(np.asarray(lengths) - options["window"], 0)
        k, k_scale, k_zero = poison_unread((k, *scales[:2]), tables, lengths, PAGE_SIZE, begins)
        v, v_scale, v_zero = poison_unread((v, *scales[2:]), tables, lengths, PAGE_SIZE, begins)
        args = (q, k, v, tables, lengths, k_scale, k_zero, v_scale, v_zero)
        reference = paged_decode_attention_reference(*args, bits=bits, **options)
        np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
        blocks = DecodeAttentionBlockSizes(pages_per_block=2, num_splits=2)
        actual = paged_decode_attention(*args, bits=bits, block_sizes=blocks, interpret=self.INTERPRET, **options)
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")

    def test_bfloat16_queries(self):
        """The model's dtype: codes and weights enter the dots as bf16, the softmax stays float32."""
        rng, seed = seeded_rng()
        args = make_case(
            rng, 4, batch_lengths=[2 * PAGE_SIZE + 5, 7], num_heads=8, num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16
        )
        blocks = DecodeAttentionBlockSizes(pages_per_block=2, num_splits=2)
        actual = paged_decode_attention(*args, bits=4, block_sizes=blocks, interpret=self.INTERPRET)
        expected = float64_attention(*args, bits=4)
        assert actual.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0.03, atol=0.03, err_msg=f"{seed}")


class TestPagedDecodeAttentionInterpret(TestPagedDecodeAttention):
    INTERPRET = True


def test_interpret_suite_is_not_skipped(request):
    """The CPU suite must really run the kernel tests, not only collect them: every test of the interpret class
    ran before this one and passed (a misplaced skip, or INTERPRET turned off, would silently drop them)."""
    assert_every_test_ran_and_passed(request, TestPagedDecodeAttentionInterpret)


def test_walk_never_visits_pages_before_the_window(rng):
    """Each split walks from the page holding its row's window start (or its own first page) through the page
    holding the row's last token: the pages it visits are exactly those of its range that hold a visible token,
    plus at most one step's worth of slots past them (masked)."""
    page_size, per_block, per_split = 4, 2, 6
    for length, window in zip(rng.integers(0, 40, 200), rng.choice([1, 3, 4, 9, 17, None], 200)):
        seen = set()
        for split in range(40 // (page_size * per_split) + 1):
            first_split, end_split = split * per_split, (split + 1) * per_split
            first, steps = decode_walk(
                int(length), window, first_split, end_split, page_size=page_size, pages_per_block=per_block
            )
            visited = set(range(int(first), int(first) + int(steps) * per_block))
            begin = 0 if window is None else max(0, int(length) - int(window))
            needed = {t // page_size for t in range(begin, int(length))} & set(range(first_split, end_split))
            assert needed <= visited and all(page >= max(first_split, begin // page_size) for page in visited)
            assert len(visited - needed) < per_block, (length, window, split)
            seen |= needed
        assert seen == {t // page_size for t in range(begin, int(length))}


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads", [(64, 6, 2), (128, 32, 8)])
def test_reference_matches_float64(bits, head_dim, num_heads, num_kv_heads):
    rng, seed = seeded_rng()
    lengths = LENGTHS + [int(rng.integers(1, 8 * PAGE_SIZE))]
    args = make_case(
        rng, bits, batch_lengths=lengths, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
    )
    actual = paged_decode_attention_reference(*args, bits=bits)
    np.testing.assert_allclose(actual, float64_attention(*args, bits=bits), rtol=1e-5, atol=1e-5, err_msg=f"{seed}")


@settings(max_examples=15, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=6).map(lambda s: (*s, 64)),
        elements=st.integers(0, 15),
    )
)
def test_pack_unpack_round_trip(codes):
    packed = pack_kv_codes(jnp.asarray(codes))
    assert packed.shape == (*codes.shape[:-1], 32) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_kv_codes(packed), codes)


def test_packed_layout_pairs_channel_j_with_channel_j_plus_half():
    codes = np.arange(64) % 16
    packed = np.asarray(pack_kv_codes(jnp.asarray(codes)))
    np.testing.assert_array_equal(packed & 15, codes[:32])
    np.testing.assert_array_equal(packed >> 4, codes[32:])


def test_refuses_malformed_inputs():
    rng, _ = seeded_rng()
    q, k, v, tables, lengths, *scales = make_case(rng, 4, batch_lengths=[5], num_heads=4, num_kv_heads=2, head_dim=64)
    with pytest.raises(ValueError, match="bits must be one of"):
        paged_decode_attention_reference(q, k, v, tables, lengths, *scales, bits=2)
    with pytest.raises(ValueError, match="need width 64"):
        paged_decode_attention_reference(q, k, v, tables, lengths, *scales, bits=8)
    with pytest.raises(ValueError, match="do not divide"):
        paged_decode_attention_reference(q[:, :3], k, v, tables, lengths, *scales, bits=4)
    with pytest.raises(ValueError, match="k_scale must be shape"):
        paged_decode_attention_reference(q, k, v, tables, lengths, None, *scales[1:], bits=4)
    with pytest.raises(ValueError, match="lengths must be"):
        paged_decode_attention_reference(q, k, v, tables, lengths[:0], *scales, bits=4)
    with pytest.raises(ValueError, match="power-of-two page_size"):
        small = make_case(rng, 4, batch_lengths=[5], num_heads=4, num_kv_heads=2, head_dim=16)
        paged_decode_attention(*small, bits=4, interpret=True)


def test_default_block_sizes_split_long_contexts_over_small_batches():
    one_row = DecodeAttentionBlockSizes.for_shape(1, 8, 8192 // 64, 64)
    assert one_row.pages_per_block * 64 == 128 and one_row.num_splits == 16
    assert DecodeAttentionBlockSizes.for_shape(256, 8, 8192 // 64, 64).num_splits == 1
    assert DecodeAttentionBlockSizes.for_shape(1, 8, 1, 64).num_splits == 1
    # KV8's code tiles are twice KV4's: 8 warps keep its registers at KV4's level (kernel-compile.md).
    assert [DecodeAttentionBlockSizes.for_shape(1, 8, 128, 64, bits=b).num_warps for b in (4, 8, 16)] == [4, 8, 4]


# --- the CUDA lowering, checked on CPU ----------------------------------------------------------------------

# (batch, query heads, KV heads, head_dim, pages per row, pool pages): Llama-3-8B and SmolLM2-135M.
LOWERING_SHAPES = [(1, 32, 8, 128, 128, 4096), (64, 32, 8, 128, 32, 4096), (16, 9, 3, 64, 32, 1000)]


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("batch, num_heads, num_kv_heads, head_dim, pages_per_row, num_pages", LOWERING_SHAPES)
def test_lowers_for_cuda(bits, batch, num_heads, num_kv_heads, head_dim, pages_per_row, num_pages):
    """The Triton lowering (with explicit Triton CompilerParams) accepts the kernel at real shapes, and the dots
    are tensor-core dots on bf16 tiles of 16 query rows: two per step for KV4 (nibble halves), one for KV8/16."""
    page_size, dtype = 64, jnp.bfloat16
    pool = ((num_kv_heads, num_pages, page_size, code_width(head_dim, bits)), jnp.uint8 if bits < 16 else dtype)
    scale = ((num_kv_heads, num_pages, page_size), jnp.float16)
    scales = [scale] * 4 if bits < 16 else []
    lowered = lower_for_cuda(
        lambda q, k, v, tables, lengths, *s: paged_decode_attention(q, k, v, tables, lengths, *s, bits=bits),
        ((batch, num_heads, head_dim), dtype),
        pool,
        pool,
        ((batch, pages_per_row), jnp.int32),
        ((batch,), jnp.int32),
        *scales,
    )
    blocks = DecodeAttentionBlockSizes.for_shape(batch, num_kv_heads, pages_per_row, page_size)
    module = triton_module_text(lowered)
    assert f"@paged_decode_attention_kv{bits}_p64_b{blocks.pages_per_block}_s{blocks.num_splits}" in module
    width = code_width(head_dim, bits)
    tokens = blocks.pages_per_block * page_size
    dots = re.findall(r"tt\.dot .*: tensor<(\w+)> \* tensor<(\w+)> -> tensor<(\w+)>", module)
    qk = (f"16x{width}xbf16", f"{width}x{tokens}xbf16", f"16x{tokens}xf32")
    pv = (f"16x{tokens}xbf16", f"{tokens}x{width}xbf16", f"16x{width}xf32")
    assert sorted(dots) == sorted([qk, pv] * (2 if bits == 4 else 1))


def test_sliding_window_soft_capped_variant_lowers_for_cuda():
    """Gemma 2 2B's decode (8 query and 4 KV heads of 256, a 4096-token window, soft-cap 50) at KV4."""
    page_size, head_dim, dtype = 64, 256, jnp.bfloat16
    pool = ((4, 2048, page_size, code_width(head_dim, 4)), jnp.uint8)
    scale = ((4, 2048, page_size), jnp.float16)
    lowered = lower_for_cuda(
        lambda q, k, v, tables, lengths, *s: paged_decode_attention(
            q, k, v, tables, lengths, *s, bits=4, sm_scale=256**-0.5, softcap=50.0, window=4096
        ),
        ((32, 8, head_dim), dtype),
        pool,
        pool,
        ((32, 128), jnp.int32),
        ((32,), jnp.int32),
        *[scale] * 4,
    )
    module = triton_module_text(lowered)
    assert re.search(r"@paged_decode_attention_kv4_p64_b2_s\d+_capped_w4096", module)
    assert "tt.dot" in module
