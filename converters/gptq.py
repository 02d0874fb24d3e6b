"""Numeric kernels of QoQ weight quantization: Hessian accumulation, RTN, GPTQ and the clip-ratio search.

Every quantizer here is a uint4 affine grid with precomputed ("static") parameters: for row o and group
g = column // group_size,

    quantize(w)   = clamp(round((clip(w) + zero[o, g]) / scale[o, g]), 0, 15)
    dequantize(q) = q * scale[o, g] - zero[o, g]

with round half to even and clip an optional clamp to [-P, P]. `scale` and `zero` are float32
[out, in // group_size]; group_size = in is per-channel. Orientation: W is [out, in], X is [tokens, in],
y = X Wᵀ. Math is float32; matmuls ask for full precision so GPUs do not fall back to TF32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qoq_jax.quant import channel_grid, round_to_grid

QMAX = 15
# The reference reads 512-row slices when it sums xᵀx; the same blocks keep the float32 sums comparable.
HESSIAN_BLOCK_ROWS = 512
# Reference `num_inv_tries`: after that many extra dampings a Hessian that is still not positive
# definite is broken input, not an ill-conditioned one.
MAX_CHOLESKY_TRIES = 250
RETRY_DAMP = 0.001
# Iteration 1 tries r = 1 alone, iteration 2 shrinks the range in 80 steps down to 0.2 (max_expand = 1).
CLIP_RATIOS = np.concatenate([[1.0], 1.0 - np.arange(1, 81) * (1.0 - 0.2) / 80])

_HIGHEST = lax.Precision.HIGHEST


@functools.partial(jax.tree_util.register_dataclass, data_fields=["xtx_sum", "num_tokens"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class HessianAccumulator:
    """Running Σ xᵀx and token count of one linear's inputs; `hessian()` turns them into 2/N Σ xᵀx."""

    xtx_sum: jax.Array
    num_tokens: jax.Array

    @classmethod
    def zeros(cls, in_features: int) -> "HessianAccumulator":
        return cls(jnp.zeros((in_features, in_features), jnp.float32), jnp.zeros((), jnp.int32))

    def hessian(self) -> jax.Array:
        return self.xtx_sum * (2.0 / self.num_tokens.astype(jnp.float32))


@jax.jit
def accumulate_hessian(acc: HessianAccumulator, x: jax.Array) -> HessianAccumulator:
    """Adds the inputs x [..., in] (any leading shape) to the running sum, 512 rows at a time."""
    in_features = acc.xtx_sum.shape[0]
    rows = x.reshape(-1, in_features).astype(jnp.float32)
    num_rows = rows.shape[0]
    pad = -num_rows % HESSIAN_BLOCK_ROWS
    blocks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(-1, HESSIAN_BLOCK_ROWS, in_features)

    def add_block(total, block):
        return total + jnp.matmul(block.T, block, precision=_HIGHEST), None

    xtx_sum, _ = lax.scan(add_block, acc.xtx_sum, blocks)
    return HessianAccumulator(xtx_sum, acc.num_tokens + num_rows)


def _quantize(w, scale, zero, clip):
    """The grid's codes as float32 (the caller casts); shared by RTN and GPTQ so both round identically."""
    return jnp.clip(jnp.round((jnp.clip(w, -clip, clip) + zero) / scale), 0, QMAX)


def _clip_bound(clip: float | None) -> jax.Array:
    """None → ∞, so that clipping is a traced value and switching it on or off does not recompile."""
    return jnp.asarray(jnp.inf if clip is None else clip, jnp.float32)


def _per_column(params, group_size):
    """[out, groups] → [out, in]: each column gets its group's value."""
    return jnp.repeat(params, group_size, axis=1)


def rtn_quantize(w, scale, zero, group_size: int, clip: float | None = None) -> jax.Array:
    """Round-to-nearest uint8 codes [out, in] on the static grid: the formats' own rounding
    (`qoq_jax.quant.round_to_grid`, which works on [in, out]) after the optional clip."""
    bound = _clip_bound(clip)
    clipped = jnp.clip(jnp.asarray(w, jnp.float32), -bound, bound)
    return round_to_grid(clipped.T, jnp.asarray(scale).T, jnp.asarray(zero).T, group_size).T


def dequantize(codes, scale, zero, group_size: int) -> jax.Array:
    """Ŵ = q·scale − zero, float32 [out, in]."""
    return codes.astype(jnp.float32) * _per_column(scale, group_size) - _per_column(zero, group_size)


def _damped_inverse_factor(h, damp):
    """Upper U with UᵀU = (H + δI)⁻¹: δ = damp·mean(diag H), plus 0.001·mean per failed Cholesky; and whether
    a Cholesky succeeded within MAX_CHOLESKY_TRIES (if not, U is NaN and the caller must refuse the result).

    With J the reversal permutation and J H J = M Mᵀ, H = R Rᵀ for the upper R = J M J, so U = R⁻¹: one
    Cholesky and one triangular solve instead of the reference's Cholesky, inverse, Cholesky. Only the
    Cholesky can fail (NaN), so only it is retried.
    """
    n = h.shape[0]
    step = jnp.mean(jnp.diag(h))
    reversed_h = jnp.flip(h) + damp * step * jnp.eye(n, dtype=h.dtype)

    def failed(state):
        tries, _, factor = state
        return (tries < MAX_CHOLESKY_TRIES) & ~jnp.all(jnp.isfinite(factor))

    def damp_more(state):
        tries, reversed_h, _ = state
        reversed_h = reversed_h + RETRY_DAMP * step * jnp.eye(n, dtype=h.dtype)
        return tries + 1, reversed_h, jnp.linalg.cholesky(reversed_h)

    _, _, reversed_factor = lax.while_loop(failed, damp_more, (0, reversed_h, jnp.linalg.cholesky(reversed_h)))
    identity = jnp.eye(n, dtype=h.dtype)
    factor = jnp.flip(jax.scipy.linalg.solve_triangular(reversed_factor, identity, lower=True))
    return factor, jnp.all(jnp.isfinite(factor))


def gptq_quantize(
    w,
    hessian,
    scale,
    zero,
    group_size: int,
    clip: float | None = None,
    act_order: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """GPTQ (Frantar et al.) uint8 codes [out, in] on the static grid, in the original column order, and whether
    the damped Hessian factorized (a bool array): when it never did (NaN or Inf activations, a Hessian that no
    damping makes positive definite) the codes are meaningless, and the caller must refuse them.

    Columns are processed in order of descending diag(H) when `act_order`, but each keeps the
    scale/zero of its original group ("static groups"). With `clip` = P (progressive g128, where w is the
    level-1 tensor U) a column is clamped to [−P, P] before rounding, but its error is measured against
    the unclamped column, so the clamping is compensated too. The work runs on Wᵀ so that a column is a
    contiguous row; the columns are zero-padded to whole blocks, and the padding gets an identity
    Hessian so it neither receives nor sends error.
    """
    return _gptq_codes(
        w, hessian, scale, zero, _clip_bound(clip), jnp.asarray(act_order), jnp.float32(damp), group_size, block_size
    )


@functools.partial(jax.jit, static_argnames=("group_size", "block_size"))
def _gptq_codes(w, hessian, scale, zero, clip, act_order, damp, group_size, block_size):
    out_features, in_features = w.shape
    w = w.astype(jnp.float32)
    h = hessian.astype(jnp.float32)

    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[None, :], 0.0, w)

    order = jnp.where(act_order, jnp.argsort(-jnp.diag(h), stable=True), jnp.arange(in_features))
    h = h[order][:, order]
    wt = w.T[order]
    column_group = order // group_size

    block = min(block_size, in_features)
    pad = -in_features % block
    padded = in_features + pad
    factor, factorized = _damped_inverse_factor(h, damp)
    h_inv = jnp.pad(factor, ((0, pad), (0, pad)))
    h_inv = h_inv + jnp.diag(jnp.arange(padded) >= in_features).astype(jnp.float32)
    wt = jnp.pad(wt, ((0, pad), (0, 0)))
    # Padding columns reuse group 0's grid; their codes are dropped.
    column_group = jnp.pad(column_group, (0, pad))

    def quantize_block(block_index, state):
        wt, codes = state
        start = block_index * block
        wt_block = lax.dynamic_slice_in_dim(wt, start, block)
        h_inv_rows = lax.dynamic_slice_in_dim(h_inv, start, block)
        h_inv_block = lax.dynamic_slice_in_dim(h_inv_rows, start, block, axis=1)
        groups = lax.dynamic_slice_in_dim(column_group, start, block)
        scale_block = scale.T[groups].astype(jnp.float32)
        zero_block = zero.T[groups].astype(jnp.float32)

        def quantize_column(i, state):
            wt_block, code_block, err_block = state
            column = wt_block[i]
            code = _quantize(column, scale_block[i], zero_block[i], clip)
            err = (column - (code * scale_block[i] - zero_block[i])) / h_inv_block[i, i]
            # Row i of the upper factor is zero left of i, so the full-width update only touches
            # the columns still to come (and column i itself, which is done).
            wt_block = wt_block - h_inv_block[i][:, None] * err[None, :]
            return wt_block, code_block.at[i].set(code), err_block.at[i].set(err)

        zeros = jnp.zeros_like(wt_block)
        _, code_block, err_block = lax.fori_loop(0, block, quantize_column, (wt_block, zeros, zeros))
        # Lazy batch update of every later column; earlier ones meet zeros of the upper factor.
        wt = wt - jnp.matmul(h_inv_rows.T, err_block, precision=_HIGHEST)
        codes = lax.dynamic_update_slice_in_dim(codes, code_block, start, axis=0)
        return wt, codes

    _, codes = lax.fori_loop(0, padded // block, quantize_block, (wt, jnp.zeros((padded, out_features), jnp.float32)))
    restored = jnp.zeros((in_features, out_features), jnp.float32).at[order].set(codes[:in_features])
    return restored.T.astype(jnp.uint8), factorized


def channel_scale_zero(w, ratio) -> tuple[jax.Array, jax.Array]:
    """Per-channel uint4 scale and scaled zero of the range [r·min, r·max], both rounded to fp16: the
    per-channel format's own grid (`qoq_jax.quant.channel_grid`) for W [out, in].

    `ratio` is a scalar or one per output channel. Returned as float32 [out].
    """
    scale, zero = channel_grid(jnp.asarray(w, jnp.float32).T, jnp.asarray(ratio, jnp.float32))
    return scale.astype(jnp.float32), zero.astype(jnp.float32)


def strided_token_sample(x, blocks: int = 8, block_len: int = 64) -> jax.Array:
    """`blocks` runs of `block_len` contiguous rows, evenly strided over x [tokens, in] (all rows if fewer)."""
    num_tokens = x.shape[0]
    if num_tokens <= blocks * block_len:
        return x
    starts = np.arange(blocks) * (num_tokens // blocks)
    return x[(starts[:, None] + np.arange(block_len)[None, :]).reshape(-1)]


@jax.jit
def clip_ratio_errors(w, x_sample, ratios) -> jax.Array:
    """[ratios, out]: Σ_t (x_t·(w_o − ŵ_o))² for RTN at each candidate ratio, one candidate at a time."""
    w = jnp.asarray(w, jnp.float32)
    x_sample = jnp.asarray(x_sample, jnp.float32)
    in_features = w.shape[1]

    def errors_at(ratio):
        scale, zero = channel_scale_zero(w, ratio)
        codes = _quantize(w, scale[:, None], zero[:, None], jnp.inf)
        diff = w - (codes * scale[:, None] - zero[:, None])
        products = jnp.matmul(x_sample.reshape(-1, in_features), diff.T, precision=_HIGHEST)
        return jnp.sum(products * products, axis=0)

    return lax.map(errors_at, jnp.asarray(ratios, jnp.float32))


def search_clip_ratios(w, x_sample, ratios=CLIP_RATIOS) -> jax.Array:
    """Best clip ratio per output channel (qoq-gchn ProductsError); ties go to the larger ratio.

    `ratios` must be in descending order (as CLIP_RATIOS is): argmin keeps the first minimum.
    """
    ratios = jnp.asarray(ratios, jnp.float32)
    return ratios[jnp.argmin(clip_ratio_errors(w, x_sample, ratios), axis=0)]
