"""Paged prefill ("extend") attention over KV4 / KV8 / KV16 page pools: prompt chunks that continue sequences
whose earlier tokens are in the pages (chunked prefill, prefix-cache hits, recompute after preemption).

Row b's chunk holds lengths[b] queries at positions starts[b] … starts[b] + lengths[b] − 1, and the cache has
already written the chunk's own keys and values into the pages, so query i attends causally over the row's
tokens 0 … starts[b] + i, all read back from the pages: the cached prefix and the chunk itself exactly as a
later decode step will read them. That is what makes chunking exact under KV4: every attention sees the same
quantized keys and values. Page layout, the algebraic scale folding and the masking rules (a token counts only
below the row's end and on a real page; nothing else, even NaN, reaches the output) are those of
`pallas_kernels.paged_attention`, whose layout and step helpers this kernel shares.

With `window` W query p sees positions p − W + 1 … p only: a program's walk starts at the page holding its first
query's window start, so pages entirely before every query's window are never read. With `softcap`, the scaled
logits are capped as in decode.

Kernel (Pallas, Triton lowering; `interpret=True` runs it on CPU)
----------------------------------------------------------------
Grid (batch, KV heads, query blocks). Program (b, h, i) serves `query_tokens` consecutive queries of row b for
every query head of KV head h: the GQA group, padded to a power of two, times the block's queries are the rows
of one tensor-core dot per key tile, so each tile is gathered and unpacked once for the whole group. It walks
the row's pages from the first to the one holding the block's last query, `pages_per_block` pages per
online-softmax step, with the causal mask on absolute positions; a block past the row's length does no step and
writes zeros. There are no splits over keys: a prefill has enough query blocks to fill the GPU.
`paged_prefill_attention_reference` is the same attention in plain jnp.

Prompts with nothing cached do not come here: `qoq_jax.kv_cache` gives them cuDNN flash attention over the
quantize → dequantize round trip of their own K/V, the same values this kernel would read back from the pages
(to the model dtype's rounding, which every path has), without the gathers and in-kernel dequantization, and
prefill attention is compute-bound.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import (
    _MIN_QUERY_ROWS,
    _attend_step,
    _check_pools,
    _initial_carry,
    _padded_tables,
    _pool_specs_and_operands,
    _query_groups,
    _step_pages,
    _store_normalized,
    _variant_name,
    attend_gathered,
    gather_kv,
    kernel_supports,
    readable_tokens,
    window_start,
)


@dataclasses.dataclass(frozen=True)
class PrefillAttentionBlockSizes:
    """`query_tokens` queries per program (times the padded GQA group: the rows of every dot, a power of two
    ≥ 16) and `pages_per_block` pages of keys per online-softmax step."""

    query_tokens: int
    pages_per_block: int
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_shape(cls, group: int, page_size: int, head_dim: int) -> "PrefillAttentionBlockSizes":
        """32 query rows and about 64 keys per step on 8 warps: the largest tile that compiles within limits on
        sm_90 and sm_80 at every KV width (128 rows, jax's flash-attention tile, spilled or hit 255 registers on
        both; 64 rows hit 255 at KV4 on sm_80: benchmarks/results/kernel-compile.md). Not tuned on a GPU yet."""
        query_tokens = max(1, 32 // _padded_group(group))
        return cls(query_tokens=query_tokens, pages_per_block=max(1, 64 // page_size), num_warps=8)


def _padded_group(group: int) -> int:
    return 1 << (group - 1).bit_length()


def _prefill_kernel(
    tables_ref,
    starts_ref,
    lengths_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    bits,
    page_size,
    pages_per_block,
    query_tokens,
    sm_scale,
    softcap,
    window,
):
    *scale_refs, o_ref = refs
    rows = q_ref.shape[0]
    block_tokens = pages_per_block * page_size
    start, length = starts_ref[0], lengths_ref[0]
    first_query = pl.program_id(2) * query_tokens
    queries = first_query + jnp.arange(rows) % query_tokens  # row r: query r % query_tokens of head r // query_tokens
    positions = start + queries
    is_query = queries < length
    first_key, first_page, end, num_steps = prefill_walk(
        start,
        length,
        first_query,
        window,
        query_tokens=query_tokens,
        table_tokens=tables_ref.shape[0] * page_size,
        page_size=page_size,
        pages_per_block=pages_per_block,
    )
    q_groups, q_sum = _query_groups(q_ref, bits)
    pool_refs = (k_ref, v_ref, *scale_refs)

    def step(j, carry):
        page = first_page + j * pages_per_block
        pages, on_page = _step_pages(tables_ref, page, pages_per_block, page_size, k_ref.shape[0])
        keys = page * page_size + jnp.arange(block_tokens)
        readable = (keys >= first_key) & (keys < end) & on_page
        visible = (keys[None, :] <= positions[:, None]) & is_query[:, None] & readable[None, :]
        if window is not None:
            visible &= keys[None, :] > positions[:, None] - window
        return _attend_step(
            carry, q_groups, q_sum, pool_refs, pages, readable, visible, bits=bits, sm_scale=sm_scale, softcap=softcap
        )

    _store_normalized(o_ref, jax.lax.fori_loop(0, num_steps, step, _initial_carry(q_groups)), bits)


def prefill_walk(start, length, first_query, window, *, query_tokens, table_tokens, page_size, pages_per_block):
    """(first key, first page, end, steps) of a query block's walk: keys from the window start of its first query
    (page-aligned down: pages wholly before every query's window are never visited) to its last query, never past
    the table; no step for a block past the row's length."""
    first_key = window_start(start + first_query + 1, window)
    first_page = first_key // page_size
    end = jnp.minimum(start + jnp.minimum(length, first_query + query_tokens), table_tokens)
    steps = -(-(end - first_page * page_size) // (pages_per_block * page_size))
    return first_key, first_page, end, jnp.where(first_query < length, jnp.maximum(steps, 0), 0)


def _prefill_unbatched(
    q_rows, k_codes, v_codes, tables, starts, lengths, scales, *, bits, blocks, sm_scale, softcap, window, interpret
):
    """The one pallas_call: q_rows [B, Hkv, query blocks, rows, D] → the same shape in q's dtype."""
    batch, num_kv_heads, num_blocks, rows, head_dim = q_rows.shape
    page_size = k_codes.shape[2]
    pool_specs, pool_operands = _pool_specs_and_operands(k_codes, v_codes, scales, bits)
    row_spec = pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, i: (b, h, i, 0, 0))
    kernel = functools.partial(
        _prefill_kernel,
        bits=bits,
        page_size=page_size,
        pages_per_block=blocks.pages_per_block,
        query_tokens=blocks.query_tokens,
        sm_scale=sm_scale,
        softcap=softcap,
        window=window,
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_blocks),
        in_specs=[
            pl.BlockSpec((None, tables.shape[1]), lambda b, h, i: (b, 0)),
            pl.BlockSpec((1,), lambda b, h, i: (b,)),
            pl.BlockSpec((1,), lambda b, h, i: (b,)),
            row_spec,
            *pool_specs,
        ],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name=(
            f"paged_prefill_attention_kv{bits}_p{page_size}_q{blocks.query_tokens}_r{rows}"
            f"_b{blocks.pages_per_block}{_variant_name(softcap, window)}"
        ),
    )(tables, starts, lengths, q_rows, *pool_operands)


@functools.partial(jax.jit, static_argnames=("bits", "sm_scale", "softcap", "window", "block_sizes", "interpret"))
def paged_prefill_attention(
    q: jax.Array,
    k_codes: jax.Array,
    v_codes: jax.Array,
    block_tables: jax.Array,
    starts: jax.Array,
    lengths: jax.Array,
    k_scale: jax.Array | None = None,
    k_zero: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    v_zero: jax.Array | None = None,
    *,
    bits: int,
    sm_scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    block_sizes: PrefillAttentionBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of prompt chunks q [B, T, Hq, D] over their rows' pages.

    Query t of row b (valid for t < lengths[b]) sits at position starts[b] + t and sees the row's tokens at
    positions 0 … starts[b] + t (with `window`, only the last `window` of them), which must already be in the
    pages; `softcap` caps the scaled logits as c·tanh(x / c). k_codes / v_codes and their fp16 scale /
    zero are page pools in `pallas_kernels.paged_attention`'s layout; block_tables [B, pages] int32 maps a row's
    page slots to pool pages, any width: entries past ceil((starts + lengths) / page_size) never affect the
    result, an out-of-range id (a padding row's `num_pages`) holds no token, and keys past the table do not
    exist. A row of length 0 does no work. Returns [B, T, Hq, D] in q's dtype, zeros for queries past a length.
    page_size and D as `kernel_supports` requires.
    """
    scales = dict(k_scale=k_scale, k_zero=k_zero, v_scale=v_scale, v_zero=v_zero)
    batch, chunk, num_heads, head_dim, num_kv_heads, num_pages, page_size = _check_inputs(
        q, k_codes, v_codes, block_tables, starts, lengths, scales, bits
    )
    if not kernel_supports(page_size, head_dim):
        raise ValueError(
            f"the prefill kernel needs power-of-two page_size ≥ 8 and head_dim ≥ 32; got "
            f"page_size {page_size}, head_dim {head_dim}"
        )
    group = num_heads // num_kv_heads
    blocks = block_sizes or PrefillAttentionBlockSizes.for_shape(group, page_size, head_dim)
    padded_group, query_tokens = _padded_group(group), blocks.query_tokens
    rows = padded_group * query_tokens
    if rows < _MIN_QUERY_ROWS or rows & (rows - 1):
        raise ValueError(
            f"query_tokens={query_tokens} × the padded GQA group {padded_group} must be a power of two ≥ "
            f"{_MIN_QUERY_ROWS} (the rows of a tensor-core dot); got {rows}"
        )
    num_blocks, per_block = -(-chunk // query_tokens), blocks.pages_per_block
    # [B, T, Hkv·G, D] → [B, Hkv, query blocks, G·query_tokens, D], head-major within a block.
    q_rows = q.reshape(batch, chunk, num_kv_heads, group, head_dim)
    padding = ((0, 0), (0, num_blocks * query_tokens - chunk), (0, 0), (0, padded_group - group), (0, 0))
    q_rows = jnp.pad(q_rows, padding)
    q_rows = q_rows.reshape(batch, num_blocks, query_tokens, num_kv_heads, padded_group, head_dim)
    q_rows = q_rows.transpose(0, 3, 1, 4, 2, 5).reshape(batch, num_kv_heads, num_blocks, rows, head_dim)
    out = _prefill_unbatched(
        q_rows,
        k_codes,
        v_codes,
        # A walk from a window's first page may start mid-block: room for one more block of slots.
        _padded_tables(block_tables, per_block, num_pages, extra=0 if window is None else per_block),
        starts.astype(jnp.int32),
        lengths.astype(jnp.int32),
        scales,
        bits=bits,
        blocks=blocks,
        sm_scale=float(head_dim**-0.5 if sm_scale is None else sm_scale),
        softcap=softcap,
        window=window,
        interpret=interpret,
    )
    out = out.reshape(batch, num_kv_heads, num_blocks, padded_group, query_tokens, head_dim)
    out = out.transpose(0, 2, 4, 1, 3, 5)[:, :, :, :, :group].reshape(batch, -1, num_heads, head_dim)
    return out[:, :chunk]


def _check_inputs(q, k_codes, v_codes, block_tables, starts, lengths, scales, bits):
    """(batch, chunk, query heads, head_dim, KV heads, pool pages, page_size), or ValueError naming the input."""
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, chunk, query heads, head_dim]; got shape {q.shape}")
    batch, chunk, num_heads, head_dim = q.shape
    if starts.shape != (batch,):
        raise ValueError(f"starts must be [batch={batch}]; got {starts.shape}")
    one_query = jax.ShapeDtypeStruct((batch, num_heads, head_dim), q.dtype)  # the pools are checked as decode's
    *_, num_kv_heads, num_pages, page_size = _check_pools(
        one_query, k_codes, v_codes, block_tables, lengths, scales, bits
    )
    return batch, chunk, num_heads, head_dim, num_kv_heads, num_pages, page_size


@functools.partial(jax.jit, static_argnames=("bits", "sm_scale", "softcap", "window"))
def paged_prefill_attention_reference(
    q: jax.Array,
    k_codes: jax.Array,
    v_codes: jax.Array,
    block_tables: jax.Array,
    starts: jax.Array,
    lengths: jax.Array,
    k_scale: jax.Array | None = None,
    k_zero: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    v_zero: jax.Array | None = None,
    *,
    bits: int,
    sm_scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> jax.Array:
    """`paged_prefill_attention` in plain jnp: gather and dequantize the rows' pages (as wide as the table
    passed, each row's tokens past starts + lengths read as absent), then a causally masked float32 softmax."""
    scales = dict(k_scale=k_scale, k_zero=k_zero, v_scale=v_scale, v_zero=v_zero)
    batch, chunk, num_heads, head_dim, num_kv_heads, num_pages, page_size = _check_inputs(
        q, k_codes, v_codes, block_tables, starts, lengths, scales, bits
    )
    ends = starts.astype(jnp.int32) + lengths.astype(jnp.int32)
    begins = window_start(starts.astype(jnp.int32) + 1, window)  # the first query's window: no query sees less
    keys = gather_kv(k_codes, k_scale, k_zero, block_tables, ends, bits=bits, begins=begins)
    values = gather_kv(v_codes, v_scale, v_zero, block_tables, ends, bits=bits, begins=begins)
    queries = jnp.arange(chunk)
    positions = starts[:, None] + queries[None, :]  # [B, T]
    key_positions = jnp.arange(keys.shape[2])[None, None, :]
    causal = key_positions <= positions[:, :, None]
    in_window = key_positions >= window_start(positions + 1, window)[:, :, None]
    is_query = queries[None, :] < lengths[:, None]
    readable = readable_tokens(block_tables, ends, page_size, num_pages, begins)[:, None, :]
    visible = causal & in_window & is_query[:, :, None] & readable
    q_grouped = q.reshape(batch, chunk, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    out = attend_gathered(q_grouped, keys, values, visible, scale, softcap)
    return out.reshape(batch, chunk, num_heads, head_dim).astype(q.dtype)
