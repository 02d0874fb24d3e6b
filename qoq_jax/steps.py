"""Pure step functions over pytrees: `forward`, `prefill`, `decode_step`.

Each is jitted here (so eager calls are fast) and stays traceable inside a user's own `jax.jit`.
`decode_step` donates its state, so the KV cache is updated in place.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qoq_jax.errors import PromptTooLongError
from qoq_jax.kv_cache import DenseKVCache, KVCache
from qoq_jax.params import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The KV cache and how many tokens of each sequence it holds (the next token's position)."""

    cache: KVCache
    lengths: jax.Array  # [B] int32


@jax.jit
def forward(params: Params, token_ids: jax.Array) -> jax.Array:
    """Logits [B, S, vocab] float32 of unpadded token ids [B, S], attending through a fresh KV cache."""
    batch, length = token_ids.shape
    _check_fits(params, length)
    model = params.model()
    cache = DenseKVCache.init(params.config, batch, length, params.dtype, kv_bits=params.kv_bits)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    hidden, _ = model(token_ids, positions, jnp.ones((batch, length), bool), cache)
    return model.logits(hidden)


@functools.partial(jax.jit, static_argnames=("max_length",))
def prefill(
    params: Params, token_ids: jax.Array, lengths: jax.Array | None = None, *, max_length: int | None = None
) -> tuple[DecodeState, jax.Array]:
    """Runs right-padded prompts token_ids [B, T] with true `lengths` [B] (default T) into a cache of
    `max_length` slots (default T); returns the state and the logits [B, vocab] after each last prompt token."""
    batch, length = token_ids.shape
    max_length = length if max_length is None else max_length
    if max_length < length:
        raise ValueError(f"max_length={max_length} is shorter than the prompt block of {length} tokens")
    _check_fits(params, max_length)
    lengths = jnp.full((batch,), length, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    model = params.model()
    cache = DenseKVCache.init(params.config, batch, max_length, params.dtype, kv_bits=params.kv_bits)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    hidden, cache = model(token_ids, positions, positions < lengths[:, None], cache)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return DecodeState(cache=cache, lengths=lengths), model.logits(last)


@functools.partial(jax.jit, donate_argnames=("state",))
def decode_step(params: Params, state: DecodeState, tokens: jax.Array) -> tuple[DecodeState, jax.Array]:
    """Appends one token per sequence (tokens [B]) and returns the next-token logits [B, vocab]."""
    model = params.model()
    positions = state.lengths[:, None]
    hidden, cache = model(tokens[:, None], positions, jnp.ones_like(positions, bool), state.cache)
    return DecodeState(cache=cache, lengths=state.lengths + 1), model.logits(hidden[:, 0])


def _check_fits(params: Params, length: int) -> None:
    config = params.config
    if length > config.max_context:
        raise PromptTooLongError(
            f"{length} tokens exceed the model's context of {config.max_context} ({config.context_limit_reason})"
        )
