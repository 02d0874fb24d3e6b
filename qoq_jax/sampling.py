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
    greedy = greedy_tokens(logits_bv)
    stochastic = sampling.temperature > 0
    drawn = jax.lax.cond(jnp.any(stochastic), lambda: _draw(logits_bv, sampling, positions_b), lambda: greedy)
    return jnp.where(stochastic, drawn, greedy)


def greedy_tokens(logits_bv: jax.Array) -> jax.Array:
    """`argmax` over the vocabulary (the first maximum), in two short passes: the maxima of blocks of logits,
    then the winning block. XLA's CPU argmax is a scalar loop (180 ms for 256 × 49152 logits on two cores,
    against 7 ms this way), and it is the sampler's most common call."""
    blocks = _blocks(logits_bv, -jnp.inf)
    best_block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    within = jnp.take_along_axis(blocks, best_block[:, None, None], axis=1)[:, 0]
    return (best_block * _BLOCK + jnp.argmax(within, axis=-1)).astype(jnp.int32)


_BLOCK = 128


def _blocks(x_bv: jax.Array, fill) -> jax.Array:
    """[B, V] → [B, ceil(V / 128), 128], padded with `fill`."""
    batch, vocab = x_bv.shape
    padded = -(-vocab // _BLOCK) * _BLOCK
    return jnp.pad(x_bv, ((0, 0), (0, padded - vocab)), constant_values=fill).reshape(batch, -1, _BLOCK)


def _draw(logits_bv, sampling: SamplingBatch, positions_b):
    """Temperature, then top-k and top-p when a row asks for them, then one draw per row by inverse CDF."""
    scaled = logits_bv / jnp.maximum(sampling.temperature, 1e-6)[:, None]
    filters = (sampling.top_k > 0) | (sampling.top_p < 1.0)
    scaled = jax.lax.cond(jnp.any(filters), lambda: _top_k_top_p(scaled, sampling), lambda: scaled)
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(sampling.seed, positions_b)
    uniform = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys)
    return _inverse_cdf(scaled, uniform)


def _top_k_top_p(scaled, sampling: SamplingBatch):
    """Logits outside each row's top-k, then outside its top-p of the renormalised top-k (transformers' order),
    set to -inf; the sort this takes is the sampler's costliest step, so rows without filters skip it."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    top_k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab)[None, :] < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & (mass_before < sampling.top_p[:, None])
    num_kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _inverse_cdf(logits_bv, uniform_b):
    """The first token whose cumulative softmax mass exceeds u · total, found block by block (a cumulative sum
    over the blocks' masses, then within the chosen block) so no pass runs over the whole vocabulary serially.
    Tokens of zero mass (filtered out) are never chosen."""
    probs = _blocks(jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True)), 0.0)
    block_mass = jnp.sum(probs, axis=-1)
    cumulative = jnp.cumsum(block_mass, axis=-1)
    target = uniform_b * cumulative[:, -1]
    last = probs.shape[1] - 1
    block = jnp.minimum(jnp.sum(cumulative <= target[:, None], axis=-1), last)
    within = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(cumulative - block_mass, block[:, None], axis=1)
    index = jnp.sum(before + jnp.cumsum(within, axis=-1) <= target[:, None], axis=-1)
    last_positive = jnp.max(jnp.where(within > 0, jnp.arange(_BLOCK), 0), axis=-1)  # float rounding at the end
    return (block * _BLOCK + jnp.minimum(index, last_positive)).astype(jnp.int32)
