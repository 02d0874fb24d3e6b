"""Calibration of the 4-bit KV cache, one layer at a time, by the error of that layer's attention output.

Per-token-per-head uint4 keys are QoQ's weak point: post-RoPE keys carry per-channel offsets and a few outlier
channels, so each token's 16 levels are spent on a range that most of its channels never use. These stages
shape what is written to the pages without changing the float model (`QuantFormat.qk_transform`):

* centring: k ← k − μ (μ the calibration mean of the layer's post-RoPE keys). q·k drops only q·μ, the same for
  every key of a query, which softmax ignores. Not in soft-capped layers (Gemma 2): tanh does not ignore it, so
  there μ stays 0 (rotation and the learned A are exact there too: q·k does not change at all).
* rotation: k ← k·H, q ← q·H (H the head_dim Hadamard matrix), which spreads outlier channels over the head.
* learned transform: k ← (k − μ)·A, q ← q·A⁻ᵀ, with A (started at H) and μ trained by Adam (optax) on the
  layer's attention-output error with K and V fake-quantized (straight-through rounding), OmniQuant-style;
  the loss scores every `query_stride`-th query (over all keys) to keep a step cheap.
* SmoothAttention strength per layer: (α, β) of λ = Kmax^α / Qmax^β chosen from a grid by the same error
  (on the float model, before the weights are quantized, since λ is folded into W_q and W_k).
* clip ratios per layer for K and V (`quantize_kv`'s `clip`), chosen from a grid by the same error.
* range search: each vector written to the pages takes the range of least round-trip error among a few
  (`quantize_kv`'s `search`, `QuantFormat.kv_range_search`), decided per token as it is written, not here; the
  errors above are then measured with it, the learned transform's training loss without it (min–max ranges).
* sensitivity: each layer's error at 4 bits, which `converters.qoq` uses to give the worst layers 8-bit pages.

The error is ‖attn(q', K̂', V̂) − attn(q, K, V)‖² / ‖attn(q, K, V)‖² over the calibration rows (causal, the
queries unquantized), where ' marks the transformed and ^ the quantization round trip the pages apply.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from converters import equivalence
from converters.hadamard import hadamard_matrix
from qoq_jax.config import ModelConfig
from qoq_jax.kv_cache import FULL_ATTENTION, LayerAttention, grouped_attention, prompt_attention
from qoq_jax.model import transform_qk
from qoq_jax.quant import fake_quantize_kv

CLIP_RATIOS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8)
"""Candidate clip ratios of the KV search, full range first (a tie keeps it)."""

SEARCH_QUERY_STRIDE = 4
"""The clip search scores every 4th query position (over all keys): a quarter of the attention's cost."""


SMOOTHING_GRID = ((0.0, 0.0),) + tuple(
    (a, b) for a in np.round(np.arange(0.1, 1.0, 0.1), 2).tolist() for b in (0.0, round(1.0 - a, 2))
)
"""SmoothAttention (α, β) candidates: none, then (a, 0) and (a, 1 − a), as the reference's GridSearch (at a
step of 0.1 instead of 0.05: 19 candidates instead of 39, for the CPU)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionSample:
    """One layer's post-RoPE queries [N, T, Hq, D], keys and values [N, T, Hkv, D] (float32, before any q/k
    transform) on N calibration rows, their unquantized attention output, and the layer's `attention` (scale,
    soft-cap, sliding window), which every error of this module computes as the model does."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    reference: jax.Array
    attention: LayerAttention = dataclasses.field(default=FULL_ATTENTION, metadata=dict(static=True))

    @classmethod
    def create(cls, query, key, value, attention: LayerAttention = FULL_ATTENTION) -> "AttentionSample":
        query, key, value = (jnp.asarray(x, jnp.float32) for x in (query, key, value))
        return cls(query, key, value, _attention(query, key, value, attention), attention)

    def smoothed(self, lam_kv: np.ndarray) -> "AttentionSample":
        """The sample after SmoothAttention's q·λ, k/λ (the reference output does not change)."""
        lam = jnp.asarray(lam_kv, jnp.float32).reshape(self.key.shape[2:])
        groups = self.query.shape[2] // self.key.shape[2]
        return dataclasses.replace(self, query=self.query * jnp.repeat(lam, groups, axis=0), key=self.key / lam)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QKTransform:
    """k ← (k − offset)·key_transform and q ← q·query_transform per KV head ([Hkv, D, D], [Hkv, D])."""

    key_transform: jax.Array
    query_transform: jax.Array
    key_offset: jax.Array

    @classmethod
    def identity(cls, num_kv_heads: int, head_dim: int) -> "QKTransform":
        eye = jnp.broadcast_to(jnp.eye(head_dim, dtype=jnp.float32), (num_kv_heads, head_dim, head_dim))
        return cls(eye, eye, jnp.zeros((num_kv_heads, head_dim), jnp.float32))

    def apply(self, q_nthd, k_nthd):
        return transform_qk(q_nthd, k_nthd, self.key_transform, self.query_transform, self.key_offset)


def _attention(q, k, v, attention: LayerAttention):
    return prompt_attention(q, k, v, jnp.full((q.shape[0],), q.shape[1], jnp.int32), attention)


def _scored_error(sample: AttentionSample, transform: QKTransform, quantize, query_stride: int):
    """Relative squared attention error of every `query_stride`-th query (the last one included) over all keys,
    with K and V after `quantize(x, clip_index)`: 0 for K, 1 for V."""
    length = sample.key.shape[1]
    positions = jnp.arange(query_stride - 1, length, query_stride)
    q, k = transform.apply(sample.query[:, positions], sample.key)
    offsets = positions[:, None] - jnp.arange(length)[None, :]
    window = length if sample.attention.window is None else sample.attention.window
    mask = (offsets >= 0) & (offsets < window)
    out = grouped_attention(q, quantize(k, 0), quantize(sample.value, 1), mask[None], sample.attention)
    reference = sample.reference[:, positions]
    return jnp.sum((out - reference) ** 2) / jnp.sum(reference**2)


@functools.partial(jax.jit, static_argnames=("bits", "query_stride", "search"))
def attention_error(
    sample: AttentionSample,
    transform: QKTransform,
    bits: int,
    k_clip=1.0,
    v_clip=1.0,
    query_stride: int = 1,
    search: bool = False,
):
    """Relative squared error of the attention output when the pages hold `bits`-bit K and V (every query, or
    every `query_stride`-th), written with `quantize_kv`'s range `search` or without."""
    clips = (k_clip, v_clip)
    return _scored_error(sample, transform, lambda x, i: fake_quantize_kv(x, bits, clips[i], search), query_stride)


def initial_transform(sample: AttentionSample, *, rotate: bool, center: bool) -> QKTransform:
    """Hadamard (or identity) A with μ the sample's mean key (or 0; always 0 in a soft-capped layer)."""
    num_kv_heads, head_dim = sample.key.shape[2:]
    transform = QKTransform.identity(num_kv_heads, head_dim)
    if rotate:
        hadamard = jnp.asarray(hadamard_matrix(head_dim), jnp.float32)  # orthonormal: A⁻ᵀ = A
        rotation = jnp.broadcast_to(hadamard, (num_kv_heads, head_dim, head_dim))
        transform = dataclasses.replace(transform, key_transform=rotation, query_transform=rotation)
    if center and sample.attention.softcap is None:
        transform = dataclasses.replace(transform, key_offset=jnp.mean(sample.key, axis=(0, 1)))
    return transform


def search_smoothing(
    sample: AttentionSample,
    layer_weights,
    config: ModelConfig,
    k_absmax,
    q_absmax,
    *,
    bits: int,
):
    """The SmoothAttention (α, β) of `SMOOTHING_GRID` whose smoothed keys, centred and rotated as the pages of
    a `qk_transform` model hold them, give the least attention error; returns (α, β, error). A candidate whose
    scale is NaN/Inf is scored as no smoothing, which it becomes; only the chosen one's warning reaches the
    calibration report (the caller applies it)."""
    best = None
    for alpha, beta in SMOOTHING_GRID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", equivalence.SmoothingDisabledWarning)
            _, lam = equivalence.smooth_attention(layer_weights, config, k_absmax, q_absmax, alpha=alpha, beta=beta)
        smoothed = sample.smoothed(lam)
        error = float(attention_error(smoothed, initial_transform(smoothed, rotate=True, center=True), bits))
        if best is None or error < best[2]:
            best = (alpha, beta, error)
    return best


def _ste_fake_quantize(x, bits: int):
    """The KV round trip with straight-through rounding: gradients reach x through the scale and zero too."""
    levels = 2**bits - 1
    vmax, vmin = jnp.max(x, axis=-1, keepdims=True), jnp.min(x, axis=-1, keepdims=True)
    scale = jnp.maximum((vmax - vmin) / levels, 1e-8)
    y = (x - vmin) / scale
    codes = y + jax.lax.stop_gradient(jnp.clip(jnp.round(y), 0, levels) - y)
    return codes * scale + vmin


def _training_loss(learned, sample: AttentionSample, bits: int, query_stride: int):
    matrix, offset = learned
    if sample.attention.softcap is not None:  # μ stays as it started (0): soft-capping does not drop q·μ
        offset = jax.lax.stop_gradient(offset)
    transform = QKTransform(matrix, jnp.swapaxes(jnp.linalg.inv(matrix), -1, -2), offset)
    return _scored_error(sample, transform, lambda x, _: _ste_fake_quantize(x, bits), query_stride)


def learn_transform(
    sample: AttentionSample,
    start: QKTransform,
    *,
    bits: int,
    steps: int,
    learning_rate: float,
    query_stride: int,
    search: bool = False,
) -> QKTransform:
    """A and μ refined from `start` by Adam on one calibration row per step (rows in turn, so the result
    depends only on the sample); A⁻ᵀ is taken in float64. Keeps `start` if training did not lower the error
    (measured as the pages are written: with range `search` or without)."""
    learned = _train((start.key_transform, start.key_offset), sample, bits, steps, learning_rate, query_stride)
    matrix = np.asarray(learned[0], np.float64)
    inverse_t = np.swapaxes(np.linalg.inv(matrix), -1, -2)
    result = QKTransform(learned[0], jnp.asarray(inverse_t, jnp.float32), learned[1])
    errors = [float(attention_error(sample, transform, bits, search=search)) for transform in (result, start)]
    if errors[0] >= errors[1]:
        return start
    return result


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _train(learned, sample: AttentionSample, bits: int, steps: int, learning_rate: float, query_stride: int):
    """`steps` Adam steps in one compiled loop (one compilation per layer shape, not per layer)."""
    optimizer = optax.adam(learning_rate)
    rows = sample.query.shape[0]

    def step(index, carry):
        learned, state = carry
        row = index % rows
        one = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1), sample)
        grads = jax.grad(_training_loss)(learned, one, bits, query_stride)
        updates, state = optimizer.update(grads, state, learned)
        return optax.apply_updates(learned, updates), state

    return jax.lax.fori_loop(0, steps, step, (learned, optimizer.init(learned)))[0]


def search_clip(sample: AttentionSample, transform: QKTransform, bits: int, search: bool = False):
    """Per-layer clip ratios: K's first (V at full range), then V's given K's, each grid scored in one vectorised
    call on every `SEARCH_QUERY_STRIDE`-th query, the pages written with range `search` or without; the full
    range (1, 1) instead if the pair does worse on every query. Returns (k, v, its error on every query)."""
    ratios = jnp.asarray(CLIP_RATIOS, jnp.float32)
    k_errors = _clip_errors(sample, transform, bits, ratios, jnp.float32(1.0), vary_key=True, search=search)
    k_clip = CLIP_RATIOS[int(np.argmin(k_errors))]
    v_errors = _clip_errors(sample, transform, bits, jnp.float32(k_clip), ratios, vary_key=False, search=search)
    v_clip = CLIP_RATIOS[int(np.argmin(v_errors))]
    chosen = float(attention_error(sample, transform, bits, k_clip, v_clip, search=search))
    full = float(attention_error(sample, transform, bits, search=search))
    return (k_clip, v_clip, chosen) if chosen < full else (1.0, 1.0, full)


@functools.partial(jax.jit, static_argnames=("bits", "vary_key", "search"))
def _clip_errors(sample, transform, bits: int, k_clips, v_clips, *, vary_key: bool, search: bool):
    """The strided attention error for each K ratio (V's fixed) or each V ratio (K's fixed)."""

    def error(k_clip, v_clip):
        return attention_error(sample, transform, bits, k_clip, v_clip, SEARCH_QUERY_STRIDE, search)

    return jax.vmap(error, in_axes=(0, None) if vary_key else (None, 0))(k_clips, v_clips)
