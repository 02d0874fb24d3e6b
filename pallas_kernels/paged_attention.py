"""Paged decode attention over KV4 / KV8 / KV16 page pools: one query token per sequence, GQA, split over pages.

Page pool layout (one layer's keys or values; defined here, written by `qoq_jax.kv_cache`)
------------------------------------------------------------------------------------------
* KV4: codes uint8 [Hkv, num_pages, page_size, D/2]. Byte j of a token-head holds channel j in the low nibble
  and channel D/2 + j in the high nibble, so a loaded slab splits into two [tokens, D/2] code tiles with one mask
  and one shift, each dotted with its own half of q (no interleave, which the Triton lowering lacks).
* KV8: codes uint8 [Hkv, num_pages, page_size, D].
* KV4 and KV8 carry fp16 `scale` and `zero` [Hkv, num_pages, page_size], one per token per KV head:
  x̂ = code·scale − zero (`qoq_jax.quant.quantize_kv`).
* KV16: values [Hkv, num_pages, page_size, D] in the model dtype, no scale or zero.

Arithmetic
----------
Scale and zero are per token, so they are applied around the dots instead of to every code:

    logits[h, t] = scale_k[t]·(q_h · c_t) − zero_k[t]·Σ_d q_h,d
    out[h]       = Σ_t (p[h, t]·scale_v[t])·c_t − Σ_t p[h, t]·zero_v[t]

The first dot sees the weights p·scale_v rounded to the query dtype, so its rounding error scales with the
varying part c·scale of each value; the zero term, which carries any common offset, is exact float32.
Codes enter the dots in the query dtype, which holds 0..255 exactly; dots accumulate in float32 and the
softmax statistics are float32.

Kernel (Pallas, Triton lowering; `interpret=True` runs it on CPU)
----------------------------------------------------------------
Grid (batch, KV heads, splits). Program (b, h, s) serves every query head of KV head h (G = Hq/Hkv rows,
padded to 16 for the tensor-core dot) over split s of sequence b's block table, which is an ordinary input:
the Triton lowering has no scalar prefetch. It walks `pages_per_block` pages per step, gathering them through
the table, with an online softmax; pages past the sequence's length are never visited and the partial last
page is masked. Each split writes its normalized partial output with its (max, sum), and `_combine_splits`
merges the splits in float32. `paged_decode_attention_reference` is the same attention in plain jnp.

Sliding windows and soft-capping (Mistral, Qwen, Gemma, Phi-3)
--------------------------------------------------------------
With `window` W a query at position p sees only positions p − W + 1 … p. The walk over a row's pages then
starts at the page holding p − W + 1 (unaligned to `pages_per_block`, each split's table is padded so its last
step stays inside it): pages entirely before the window are never read, and the earlier tokens of the first page
are masked. With `softcap` c the scaled logits become c·tanh(logits / c) before the mask (Gemma 2).

Masking (both kernels here and in `paged_prefill_attention`, which shares the step helpers below)
------------------------------------------------------------------------------------------------
A token counts only if it is within the row's length and its block-table entry is a real page (0 ≤ id <
num_pages); an out-of-range id, such as a padding row's `num_pages`, holds nothing. Whatever a skipped slot holds
(a reused page's stale tokens, NaN) cannot reach the output: logits are replaced by the mask value, and the
values, scales and zeros of unreadable tokens are zeroed before they meet the probabilities.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

KV_BITS = (4, 8, 16)
_MIN_QUERY_ROWS = 16  # the smallest M of a Triton tensor-core dot
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so exp(mask − mask) never makes a NaN


def code_width(head_dim: int, bits: int) -> int:
    """Last-axis size of a page pool's codes (or values) for one token-head."""
    return head_dim // 2 if bits == 4 else head_dim


def pack_kv_codes(codes: jax.Array) -> jax.Array:
    """KV4 codes [..., D] (0..15) → packed uint8 [..., D/2] in the layout above."""
    half = codes.shape[-1] // 2
    codes = codes.astype(jnp.uint8)
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_kv_codes(packed: jax.Array) -> jax.Array:
    """Packed uint8 [..., D/2] → codes uint8 [..., D], the inverse of `pack_kv_codes`."""
    return jnp.concatenate([packed & 15, packed >> 4], axis=-1)


def kernel_supports(page_size: int, head_dim: int) -> bool:
    """Shapes the Triton kernel can load: power-of-two pages of ≥ 8 tokens, power-of-two head_dim ≥ 32."""
    return page_size >= 8 and head_dim >= 32 and not page_size & (page_size - 1) and not head_dim & (head_dim - 1)


@dataclasses.dataclass(frozen=True)
class DecodeAttentionBlockSizes:
    """`pages_per_block` pages per online-softmax step; the block table is cut into `num_splits` splits."""

    pages_per_block: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_shape(cls, batch: int, num_kv_heads: int, pages_per_sequence: int, page_size: int, *, bits: int = 4):
        """About 128 tokens per step; enough splits to give the GPU ~512 programs, at least 4 steps each.

        KV8 runs 8 warps: its [128 tokens, D] code tiles are twice KV4's, and at 4 warps it needed 168 registers
        on sm_90 and 213 on sm_80 (128 on both at 8; benchmarks/results/kernel-compile.md)."""
        pages_per_block = max(1, 128 // page_size)
        steps = -(-pages_per_sequence // pages_per_block)
        splits = 1
        while batch * num_kv_heads * splits < 512 and steps // (2 * splits) >= 4:
            splits *= 2
        return cls(pages_per_block=pages_per_block, num_splits=splits, num_warps=8 if bits == 8 else 4)


def _check_pools(q, k_codes, v_codes, block_tables, lengths, scales, bits):
    if bits not in KV_BITS:
        raise ValueError(f"bits must be one of {KV_BITS}; got {bits}")
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, query heads, head_dim]; got shape {q.shape}")
    batch, num_heads, head_dim = q.shape
    if k_codes.ndim != 4 or k_codes.shape != v_codes.shape:
        raise ValueError(
            f"k and v pools must both be [kv_heads, pages, page_size, width]; got {k_codes.shape}, {v_codes.shape}"
        )
    num_kv_heads, num_pages, page_size, width = k_codes.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
    if width != code_width(head_dim, bits):
        raise ValueError(f"KV{bits} pools for head_dim {head_dim} need width {code_width(head_dim, bits)}; got {width}")
    if bits < 16 and k_codes.dtype != jnp.uint8:
        raise ValueError(f"KV{bits} codes must be uint8; got {k_codes.dtype}")
    expected_scale = (num_kv_heads, num_pages, page_size)
    for name, scale in scales.items():
        if (scale is None) != (bits == 16) or (scale is not None and scale.shape != expected_scale):
            need = "none at 16 bits" if bits == 16 else f"shape {expected_scale}"
            raise ValueError(f"{name} must be {need}; got {None if scale is None else scale.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, pages per sequence]; got {block_tables.shape}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [batch={batch}]; got {lengths.shape}")
    return batch, num_heads, head_dim, num_kv_heads, num_pages, page_size


def _load_channel_groups(pool_ref, pages, bits, dtype):
    """The gathered pages as [tokens, width] tiles in `dtype`: two (low, high channel halves) for KV4."""
    raw = pool_ref[pages]
    raw = raw.reshape(raw.shape[0] * raw.shape[1], raw.shape[2])
    if bits == 16:
        return [raw.astype(dtype)]
    codes = raw.astype(jnp.int32)  # Triton has no arithmetic on 8-bit types
    if bits == 8:
        return [codes.astype(dtype)]
    return [(codes & 15).astype(dtype), (codes >> 4).astype(dtype)]


def _per_token(ref, pages):
    values = ref[pages]
    return values.reshape(values.shape[0] * values.shape[1]).astype(jnp.float32)


def _step_pages(tables_ref, first_slot, pages_per_block, page_size, num_pages):
    """One step's page ids from the block table (an out-of-range id, the padding rows' `num_pages`, loads page 0)
    and which of its tokens lie on a real page [pages_per_block · page_size]."""
    pages = tables_ref[pl.ds(first_slot, pages_per_block)]
    on_page = (pages >= 0) & (pages < num_pages)
    tokens_on_page = jnp.broadcast_to(on_page[:, None], (pages_per_block, page_size))
    return jnp.where(on_page, pages, 0), tokens_on_page.reshape(pages_per_block * page_size)


def _query_groups(q_ref, bits):
    """The query tile [rows, D] as the channel groups the codes split into, and (below 16 bits) each row's
    float32 sum, the factor of the zero term."""
    half = q_ref.shape[1] // 2
    groups = [q_ref[:, pl.ds(0, half)], q_ref[:, pl.ds(half, half)]] if bits == 4 else [q_ref[...]]
    q_sum = sum(jnp.sum(g.astype(jnp.float32), axis=1) for g in groups) if bits < 16 else None
    return groups, q_sum


def _initial_carry(q_groups):
    """Online-softmax state (row max, row sum, one float32 accumulator per channel group) before any token."""
    rows = q_groups[0].shape[0]
    return (
        jnp.full((rows,), _MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        *[jnp.zeros((rows, g.shape[1]), jnp.float32) for g in q_groups],
    )


def _attend_step(carry, q_groups, q_sum, pool_refs, pages, readable, visible, *, bits, sm_scale, softcap):
    """One online-softmax step over the tokens of the gathered `pages`.

    `visible` [rows, tokens] says which query row sees which token; `readable` [tokens] which tokens hold data
    at all. Everything else counts exactly 0, whatever the pool holds there (a reused page's stale slots,
    another row's NaN): masked logits are replaced, and values, scales and zeros of unreadable tokens are
    zeroed before they meet the probabilities."""
    k_ref, v_ref, *scale_refs = pool_refs
    m_prev, l_prev, *acc = carry
    dtype = q_groups[0].dtype
    k_groups = _load_channel_groups(k_ref, pages, bits, dtype)
    logits = sum(jnp.dot(qg, kg.T, preferred_element_type=jnp.float32) for qg, kg in zip(q_groups, k_groups))
    if bits < 16:
        k_scale_ref, k_zero_ref, v_scale_ref, v_zero_ref = scale_refs
        logits = _per_token(k_scale_ref, pages)[None, :] * logits
        logits -= q_sum[:, None] * _per_token(k_zero_ref, pages)[None, :]
    logits = _capped(logits * sm_scale, softcap)
    logits = jnp.where(visible, logits, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    correction = jnp.exp(m_prev - m_next)
    probs = jnp.where(visible, jnp.exp(logits - m_next[:, None]), 0.0)
    l_next = correction * l_prev + jnp.sum(probs, axis=1)
    v_groups = _load_channel_groups(v_ref, pages, bits, dtype)
    if bits < 16:
        v_scale = jnp.where(readable, _per_token(v_scale_ref, pages), 0.0)
        v_zero = jnp.where(readable, _per_token(v_zero_ref, pages), 0.0)
        weights = (probs * v_scale[None, :]).astype(dtype)
        zero_term = jnp.sum(probs * v_zero[None, :], axis=1)[:, None]
    else:
        v_groups = [jnp.where(readable[:, None], vg, jnp.zeros_like(vg)) for vg in v_groups]
        weights, zero_term = probs.astype(dtype), 0.0
    acc = [
        correction[:, None] * a + jnp.dot(weights, vg, preferred_element_type=jnp.float32) - zero_term
        for a, vg in zip(acc, v_groups)
    ]
    return (m_next, l_next, *acc)


def _capped(logits, softcap: float | None):
    """Soft-capping c·tanh(x / c) of scaled logits (Gemma 2); None: unchanged."""
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def window_start(ends, window: int | None):
    """The first position a query at position ends − 1 sees: ends − window (≥ 0), or 0 without a window."""
    return jnp.zeros_like(ends) if window is None else jnp.maximum(ends - window, 0)


def decode_walk(length, window: int | None, split_first, split_end, *, page_size: int, pages_per_block: int):
    """(first page, steps) of a split's walk over pages split_first … split_end − 1 of a row of `length` tokens:
    from the page holding the window's first token (or the split's first page, if later) to the one holding the
    last token, `pages_per_block` pages a step. Pages wholly before the window, or past the length, are never
    visited."""
    first_page = jnp.maximum(split_first, window_start(length, window) // page_size)
    end_page = jnp.minimum(-(-length // page_size), split_end)
    return first_page, jnp.maximum(-(-(end_page - first_page) // pages_per_block), 0)


def _store_normalized(o_ref, carry, bits):
    """Writes acc / row sum into o_ref [rows, D] in its dtype (rows that saw no token get zeros)."""
    _, row_sum, *acc = carry
    inverse = jnp.where(row_sum > 0, 1.0 / jnp.where(row_sum > 0, row_sum, 1.0), 0.0)[:, None]
    if bits == 4:
        half = o_ref.shape[1] // 2
        o_ref[:, pl.ds(0, half)] = (acc[0] * inverse).astype(o_ref.dtype)
        o_ref[:, pl.ds(half, half)] = (acc[1] * inverse).astype(o_ref.dtype)
    else:
        o_ref[...] = (acc[0] * inverse).astype(o_ref.dtype)


def _decode_kernel(
    tables_ref,
    lengths_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    bits,
    page_size,
    pages_per_block,
    pages_per_split,
    sm_scale,
    softcap,
    window,
):
    *scale_refs, o_ref, max_ref, sum_ref = refs
    rows = q_ref.shape[0]
    block_tokens = pages_per_block * page_size
    length = lengths_ref[0]
    start = window_start(length, window)
    split_first = pl.program_id(2) * pages_per_split
    split_end = split_first + pages_per_split
    first_page, num_steps = decode_walk(
        length, window, split_first, split_end, page_size=page_size, pages_per_block=pages_per_block
    )
    q_groups, q_sum = _query_groups(q_ref, bits)
    pool_refs = (k_ref, v_ref, *scale_refs)

    def step(i, carry):
        page = first_page + i * pages_per_block
        pages, on_page = _step_pages(tables_ref, page - split_first, pages_per_block, page_size, k_ref.shape[0])
        tokens = page * page_size + jnp.arange(block_tokens)
        readable = (tokens >= start) & (tokens < length) & (tokens < split_end * page_size) & on_page
        visible = jnp.broadcast_to(readable[None, :], (rows, block_tokens))
        return _attend_step(
            carry, q_groups, q_sum, pool_refs, pages, readable, visible, bits=bits, sm_scale=sm_scale, softcap=softcap
        )

    carry = jax.lax.fori_loop(0, num_steps, step, _initial_carry(q_groups))
    _store_normalized(o_ref, carry, bits)
    max_ref[...] = carry[0]
    sum_ref[...] = carry[1]


def _pool_specs_and_operands(k_codes, v_codes, scales, bits):
    """BlockSpecs and operands of the K/V pools (and their scales and zeros below 16 bits) for a grid whose
    second axis is the KV head: each program sees its head's whole pool and gathers pages from it."""
    num_pages, page_size, width = k_codes.shape[1:]
    pool_spec = pl.BlockSpec((None, num_pages, page_size, width), lambda b, h, i: (h, 0, 0, 0))
    scale_spec = pl.BlockSpec((None, num_pages, page_size), lambda b, h, i: (h, 0, 0))
    specs, operands = [pool_spec, pool_spec], [k_codes, v_codes]
    if bits < 16:
        specs += [scale_spec] * 4
        operands += [scales[name] for name in ("k_scale", "k_zero", "v_scale", "v_zero")]
    return specs, operands


def _padded_tables(block_tables, multiple, num_pages, *, extra: int = 0):
    """Tables [..., pages] padded on the right with `num_pages` (no page) to a multiple of `multiple` slots, then
    `extra` more (room for a walk that starts mid-way through a block of pages)."""
    width = -(-block_tables.shape[-1] // multiple) * multiple + extra
    padding = ((0, 0),) * (block_tables.ndim - 1) + ((0, width - block_tables.shape[-1]),)
    return jnp.pad(block_tables.astype(jnp.int32), padding, constant_values=num_pages)


@functools.partial(jax.jit, static_argnames=("bits", "sm_scale", "softcap", "window", "block_sizes", "interpret"))
def paged_decode_attention(
    q: jax.Array,
    k_codes: jax.Array,
    v_codes: jax.Array,
    block_tables: jax.Array,
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
    block_sizes: DecodeAttentionBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of one query per sequence, q [B, Hq, D], over the first `lengths[b]` tokens of its pages (with
    `window`, only the last `window` of them: pages before those are never read; with `softcap`, the scaled
    logits capped as c·tanh(x / c)).

    k_codes / v_codes and their fp16 scale / zero are page pools in the layout above; block_tables [B, pages]
    int32 maps each sequence's page slots to pool pages. Entries past ceil(length / page_size) never affect the
    result, whatever they hold; a token on an out-of-range page id (a padding row's `num_pages`) counts as
    absent; lengths past the table are cut to it. A sequence with no token gets zeros. Returns
    [B, Hq, D] in q's dtype. page_size and D must be powers of two (Triton loads), page_size ≥ 8 and D ≥ 32
    (`kernel_supports`).
    """
    scales = dict(k_scale=k_scale, k_zero=k_zero, v_scale=v_scale, v_zero=v_zero)
    batch, num_heads, head_dim, num_kv_heads, num_pages, page_size = _check_pools(
        q, k_codes, v_codes, block_tables, lengths, scales, bits
    )
    if not kernel_supports(page_size, head_dim):
        raise ValueError(
            f"the decode kernel needs power-of-two page_size ≥ 8 and head_dim ≥ 32; got "
            f"page_size {page_size}, head_dim {head_dim}"
        )
    blocks = block_sizes or DecodeAttentionBlockSizes.for_shape(
        batch, num_kv_heads, block_tables.shape[1], page_size, bits=bits
    )
    group = num_heads // num_kv_heads
    rows = max(_MIN_QUERY_ROWS, 1 << (group - 1).bit_length())
    q_grouped = q.reshape(batch, num_kv_heads, group, head_dim)
    q_grouped = jnp.pad(q_grouped, ((0, 0), (0, 0), (0, rows - group), (0, 0)))

    splits, per_block = blocks.num_splits, blocks.pages_per_block
    lengths = jnp.minimum(lengths.astype(jnp.int32), block_tables.shape[1] * page_size)  # never into the padding
    tables = _padded_tables(block_tables, splits * per_block, num_pages).reshape(batch, splits, -1)
    pages_per_split = tables.shape[2]
    if window is not None:  # a walk starting at the window's first page may run past its split's slots
        tables = _padded_tables(tables, 1, num_pages, extra=per_block)

    pool_specs, pool_operands = _pool_specs_and_operands(k_codes, v_codes, scales, bits)
    in_specs = [
        pl.BlockSpec((None, None, tables.shape[2]), lambda b, h, s: (b, s, 0)),
        pl.BlockSpec((1,), lambda b, h, s: (b,)),
        pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
        *pool_specs,
    ]
    operands = [tables, lengths, q_grouped, *pool_operands]
    partial_shape = (batch, splits, num_kv_heads, rows)
    kernel = functools.partial(
        _decode_kernel,
        bits=bits,
        page_size=page_size,
        pages_per_block=per_block,
        pages_per_split=pages_per_split,
        sm_scale=float(head_dim**-0.5 if sm_scale is None else sm_scale),
        softcap=softcap,
        window=window,
    )
    out, row_max, row_sum = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, s, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name=f"paged_decode_attention_kv{bits}_p{page_size}_b{per_block}_s{splits}{_variant_name(softcap, window)}",
    )(*operands)
    out = _combine_splits(out, row_max, row_sum)[:, :, :group]
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def _variant_name(softcap: float | None, window: int | None) -> str:
    """The kernel-name suffix of a soft-capped or windowed variant (profiles tell them apart)."""
    return ("" if softcap is None else "_capped") + ("" if window is None else f"_w{window}")


def _combine_splits(out, row_max, row_sum):
    """Merges per-split normalized outputs [B, splits, ..., D] by their softmax (max, sum), in float32."""
    weights = row_sum * jnp.exp(row_max - jnp.max(row_max, axis=1, keepdims=True))
    total = jnp.sum(weights, axis=1)
    merged = jnp.sum(out * weights[..., None], axis=1)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


def readable_tokens(block_tables, lengths, page_size: int, num_pages: int, begins=None) -> jax.Array:
    """[B, slots·page_size] bool: the tokens a row's pages hold, its tokens begins[b] (default 0) … lengths[b] − 1
    that lie on real pages."""
    on_page = (block_tables >= 0) & (block_tables < num_pages)
    tokens = jnp.repeat(on_page, page_size, axis=1)
    positions = jnp.arange(tokens.shape[1])[None, :]
    begins = jnp.zeros_like(lengths) if begins is None else begins
    return tokens & (positions < lengths[:, None]) & (positions >= begins[:, None])


def gather_kv(codes, scale, zero, block_tables, lengths, *, bits: int, begins=None) -> jax.Array:
    """Tokens begins[b] (default 0) … lengths[b] − 1 of each row's pages read back dequantized, float32
    [B, Hkv, slots·page_size, D]; every other slot (outside that range, on an out-of-range page id) reads 0,
    whatever the pool holds there."""
    num_pages, page_size = codes.shape[1:3]
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1)
    pages = jnp.moveaxis(codes[:, tables], 0, 1)  # [B, Hkv, slots, page_size, width]
    batch, num_kv_heads, num_slots = pages.shape[:3]
    pages = pages.reshape(batch, num_kv_heads, num_slots * page_size, -1)
    if bits == 4:
        pages = unpack_kv_codes(pages)
    values = pages.astype(jnp.float32)
    if bits < 16:

        def per_token(x):
            return jnp.moveaxis(x[:, tables], 0, 1).reshape(batch, num_kv_heads, -1, 1).astype(jnp.float32)

        values = values * per_token(scale) - per_token(zero)
    readable = readable_tokens(block_tables, lengths, page_size, num_pages, begins)
    return jnp.where(readable[:, None, :, None], values, 0.0)


def attend_gathered(
    q_btkgd, keys_bksd, values_bksd, visible_bts, sm_scale: float, softcap: float | None = None
) -> jax.Array:
    """GQA attention in float32 of queries [B, T, Hkv, G, D] over gathered keys and values [B, Hkv, S, D]:
    query t of row b sees key s where visible[b, t, s]; a query that sees none gets zeros. [B, T, Hkv, G, D]."""
    batch, length, num_kv_heads, groups, head_dim = q_btkgd.shape
    # As XLA's CPU backend runs these fastest (measured: ~2x the batched [G, D]x[D, S] dots for a decode query,
    # ~1.35x for a 16-token chunk): one query multiplies and reduces; a chunk is one [G·T, D]x[D, S] dot per head.
    q = jnp.transpose(q_btkgd.astype(jnp.float32), (0, 2, 3, 1, 4)).reshape(batch, num_kv_heads, -1, head_dim)
    if length == 1:
        logits = jnp.sum(q[:, :, :, None] * keys_bksd[:, :, None], axis=-1)
    else:
        logits = jnp.einsum("bkmd,bksd->bkms", q, keys_bksd)
    logits = _capped(logits.reshape(batch, num_kv_heads, groups, length, -1) * sm_scale, softcap)
    visible = visible_bts[:, None, None]
    probs = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, _MASK_VALUE), axis=-1), 0.0)
    probs = probs.reshape(batch, num_kv_heads, groups * length, -1)
    if length == 1:
        out = jnp.sum(probs[..., None] * values_bksd[:, :, None], axis=-2)
    else:
        out = jnp.einsum("bkms,bksd->bkmd", probs, values_bksd)
    return jnp.transpose(out.reshape(batch, num_kv_heads, groups, length, head_dim), (0, 3, 1, 2, 4))


@functools.partial(jax.jit, static_argnames=("bits", "sm_scale", "softcap", "window"))
def paged_decode_attention_reference(
    q: jax.Array,
    k_codes: jax.Array,
    v_codes: jax.Array,
    block_tables: jax.Array,
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
    """`paged_decode_attention` in plain jnp: gather and dequantize the row's pages (as wide as the table passed),
    then a masked float32 softmax."""
    scales = dict(k_scale=k_scale, k_zero=k_zero, v_scale=v_scale, v_zero=v_zero)
    batch, num_heads, head_dim, num_kv_heads, num_pages, page_size = _check_pools(
        q, k_codes, v_codes, block_tables, lengths, scales, bits
    )
    begins = window_start(lengths, window)
    keys = gather_kv(k_codes, k_scale, k_zero, block_tables, lengths, bits=bits, begins=begins)
    values = gather_kv(v_codes, v_scale, v_zero, block_tables, lengths, bits=bits, begins=begins)
    visible = readable_tokens(block_tables, lengths, page_size, num_pages, begins)[:, None, :]
    q_grouped = q.reshape(batch, 1, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    out = attend_gathered(q_grouped, keys, values, visible, scale, softcap)
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
