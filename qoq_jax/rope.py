"""Rotary position embeddings (NeoX half-rotation, as transformers' Llama): linear, Llama-3.1 and LongRoPE scaling,
partial rotary dimensions."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from qoq_jax.config import RopeConfig


@functools.lru_cache(maxsize=None)
def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-pair rotation frequencies [rotary_dim // 2], float32; scaling folded in so positions stay integers."""
    dim = rope.rotary_dim(head_dim)
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, rope)
    elif rope.rope_type == "longrope":
        inv_freq = inv_freq / np.asarray(rope.long_factor if rope.long_context else rope.short_factor, np.float64)
    return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama-3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled)


def rotary_angles(rope: RopeConfig, head_dim: int, positions_bt) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(cos, sin) float32 [B, T, rotary_dim / 2] of each token's position (LongRoPE's scaled by its attention
    factor)."""
    angles = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies(rope, head_dim))
    return jnp.cos(angles) * rope.attention_factor, jnp.sin(angles) * rope.attention_factor


def apply_rope(x_bthd: jnp.ndarray, cos_btr: jnp.ndarray, sin_btr: jnp.ndarray) -> jnp.ndarray:
    """Rotates channel pairs (i, i + R/2) of the first R = 2·cos.shape[-1] channels of every head; the rest pass.
    Angles in float32."""
    half = cos_btr.shape[-1]
    cos, sin = cos_btr[:, :, None, :], sin_btr[:, :, None, :]
    x = x_bthd.astype(jnp.float32)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x_bthd.dtype)
