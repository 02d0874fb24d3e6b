"""Per-sequence sampling: greedy, temperature, top-k, top-p, seeded.

Sampling parameters are arrays with one row per sequence, never static arguments, so requests with different
settings share one compiled step. Each row's randomness depends only on its seed and the token position, so a
request samples the same tokens whatever batch it runs in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qoq_jax.errors import InvalidSamplingError
from qoq_jax.validation import INT32_MAX, UINT32_MAX, check_float32, check_integer, is_real


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Every value must fit the array it
    becomes (float32 temperature and top_p, int32 top_k, uint32 seed): a value that would overflow is refused, not
    wrapped or turned into infinity."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_float32("temperature", self.temperature, 0.0, InvalidSamplingError)
        check_integer("top_k", self.top_k, 0, INT32_MAX, InvalidSamplingError)
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_integer("seed", self.seed, 0, UINT32_MAX, InvalidSamplingError)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """SamplingParams stacked per sequence: float32 / int32 / uint32 arrays of shape [B]."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @classmethod
    def stack(cls, params: list[SamplingParams]) -> "SamplingBatch":
        return cls(
            temperature=jnp.asarray([p.temperature for p in params], jnp.float32),
            top_k=jnp.asarray([p.top_k for p in params], jnp.int32),
            top_p=jnp.asarray([p.top_p for p in params], jnp.float32),
            seed=jnp.asarray([p.seed for p in params], jnp.uint32),
        )


def sample(logits_bv: jax.Array, sampling: SamplingBatch, positions_b: jax.Array) -> jax.Array:
    """Next tokens [B] int32 from float32 logits [B, V]; `positions_b` is the position the token will take."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    stochastic = sampling.temperature > 0
    drawn = jax.lax.cond(
        jnp.any(stochastic), lambda: _draw(logits_bv, sampling, positions_b), lambda: greedy
    )
    return jnp.where(stochastic, drawn, greedy)


def _draw(logits_bv, sampling: SamplingBatch, positions_b):
    """Temperature, then top-k, then top-p over the renormalised top-k (transformers' order)."""
    vocab = logits_bv.shape[-1]
    scaled = logits_bv / jnp.maximum(sampling.temperature, 1e-6)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    top_k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab)[None, :] < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & (mass_before < sampling.top_p[:, None])
    num_kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(sampling.seed, positions_b)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
