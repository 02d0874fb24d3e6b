"""Test inputs for the paged attention kernels: random page pools quantized as the cache writes them, shuffled block
tables, and an independent float64 numpy reading of a row's pages."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import pack_kv_codes
from qoq_jax.quant import quantize_kv


def make_pools(rng, bits, *, num_kv_heads, head_dim, num_pages, page_size, dtype=jnp.float32):
    """K and V pools of random tokens quantized as the cache writes them: (codes, scale, zero) each. Keys get
    an offset per channel and heads get different ranges, so zeros and scales vary as in a real model."""
    pools = []
    for offset in (rng.normal(0, 2, head_dim), np.zeros(head_dim)):
        spread = rng.uniform(0.2, 3.0, (num_kv_heads, 1, 1, 1))
        x = rng.normal(size=(num_kv_heads, num_pages, page_size, head_dim)) * spread + offset
        if bits == 16:
            pools.append((jnp.asarray(x, dtype), None, None))
            continue
        codes, scale, zero = quantize_kv(jnp.asarray(x, jnp.float32), bits)
        pools.append((pack_kv_codes(codes) if bits == 4 else codes, scale, zero))
    return pools


def row_tokens(codes, scale, zero, table_row, *, bits) -> np.ndarray:
    """Every token of one row's pages in float64 [Hkv, slots·page_size, D], dequantized with numpy."""
    pages = np.asarray(codes)[:, np.asarray(table_row)]
    if bits < 16:
        if bits == 4:
            pages = np.concatenate([pages & 15, pages >> 4], axis=-1)
        s = np.asarray(scale, np.float64)[:, np.asarray(table_row), :, None]
        z = np.asarray(zero, np.float64)[:, np.asarray(table_row), :, None]
        pages = pages.astype(np.float64) * s - z
    pages = pages.astype(np.float64)
    return pages.reshape(pages.shape[0], -1, pages.shape[-1])


def float64_softmax_attention(q_hd, keys_hsd, values_hsd, *, sm_scale=None, softcap=None) -> np.ndarray:
    """One query [Hq, D] over keys and values [Hkv, S, D] (GQA), float64, logits scaled by sm_scale (default
    head_dim^−½) and soft-capped as softcap·tanh(x / softcap) if given; zeros when S is 0."""
    num_heads, head_dim = q_hd.shape
    group = num_heads // keys_hsd.shape[0]
    out = np.zeros((num_heads, head_dim))
    if keys_hsd.shape[1] == 0:
        return out
    for h in range(num_heads):
        logits = keys_hsd[h // group] @ q_hd[h] * (head_dim**-0.5 if sm_scale is None else sm_scale)
        if softcap is not None:
            logits = softcap * np.tanh(logits / softcap)
        weights = np.exp(logits - logits.max())
        out[h] = weights @ values_hsd[h // group] / weights.sum()
    return out


def poison_unread(pool, tables, ends, page_size, begins=None):
    """The (codes, scale, zero) pool with NaN in every slot no row reads (row b reads its tokens begins[b] (default
    0) … ends[b] − 1 through tables[b]; out-of-range table entries read nothing): in the values at 16 bits, else in
    the scale and zero. A kernel that lets an unread slot reach its output returns NaN."""
    codes, scale, zero = (None if x is None else np.array(x) for x in pool)
    num_pages = codes.shape[1]
    read = np.zeros((num_pages, page_size), bool)
    begins = np.zeros(len(np.asarray(ends)), int) if begins is None else np.asarray(begins)
    for row, begin, end in zip(np.asarray(tables), begins, np.asarray(ends)):
        for token in range(int(begin), int(end)):
            page = row[token // page_size]
            if 0 <= page < num_pages:
                read[page, token % page_size] = True
    if scale is None:
        codes = codes.astype(np.float32)
        codes[:, ~read] = np.nan
        return jnp.asarray(codes, pool[0].dtype), None, None
    scale[:, ~read] = np.nan
    zero[:, ~read] = np.nan
    return jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(zero)


def scribble_past(tables, ends, page_size, num_pages, rng):
    """Tables whose entries past each row's ceil(ends / page_size) pages are random ids, some out of range or
    negative: what they hold must never matter."""
    tables = np.array(tables)
    for b, end in enumerate(np.asarray(ends)):
        used = -(-int(end) // page_size)
        tables[b, used:] = rng.integers(-3, num_pages + 3, tables.shape[1] - used)
    return jnp.asarray(tables, jnp.int32)
