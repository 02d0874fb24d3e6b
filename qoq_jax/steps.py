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
from qoq_jax.kv_cache import DEFAULT_PAGE_SIZE, NoKVCache, PagedKVCache
from qoq_jax.params import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The paged KV cache and how many tokens of each row it holds (the next token's position)."""

    cache: PagedKVCache
    lengths: jax.Array  # [B] int32


@jax.jit
def forward(params: Params, token_ids: jax.Array) -> jax.Array:
    """Logits [B, S, vocab] float32 of unpadded token ids [B, S]. Nothing is cached; at KV4/KV8 attention sees
    the keys and values after their quantization round trip (see `NoKVCache`)."""
    batch, length = token_ids.shape
    _check_fits(params, length)
    model = params.model()
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    hidden, _ = model(token_ids, positions, jnp.ones((batch, length), bool), NoKVCache(kv_bits=params.kv_bits))
    return model.logits(hidden)


@functools.partial(jax.jit, static_argnames=("max_length", "page_size"), donate_argnames=("cache",))
def prefill(
    params: Params,
    token_ids: jax.Array,
    lengths: jax.Array | None = None,
    *,
    max_length: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    cache: PagedKVCache | None = None,
    start_positions: jax.Array | None = None,
) -> tuple[DecodeState, jax.Array]:
    """Runs right-padded prompts token_ids [B, T] with true `lengths` [B] (default T) and returns the decode
    state and the logits [B, vocab] after each last prompt token.

    The prompts' keys and values go into `cache` when given (a pool and these rows' block tables, as a serving
    engine keeps them; donated), else into a fresh pool of `page_size`-token pages holding `max_length`
    (default T) tokens per row. With `start_positions` [B] (needs `cache`) the rows are chunks continuing
    sequences whose first start_positions[b] tokens are already in the cache (chunked prefill, a cached prefix):
    they take positions start..start+length−1 and attend over those cached tokens too."""
    batch, length = token_ids.shape
    if cache is None:
        if start_positions is not None:
            raise ValueError("start_positions continue sequences in a cache: pass the cache too")
        max_length = length if max_length is None else max_length
        _check_fits(params, max_length)
        cache = PagedKVCache.for_batch(
            params.config,
            batch,
            max_length,
            page_size=page_size,
            dtype=params.dtype,
            kv_bits=params.kv_bits,
            kernel=params.kernel,
        )
    elif max_length is not None:
        raise ValueError("pass either max_length (for a fresh cache) or cache, not both")
    elif cache.block_tables.shape[0] != batch:
        raise ValueError(f"the cache has block tables for {cache.block_tables.shape[0]} rows; got {batch} prompts")
    if cache.max_length < length:
        raise ValueError(f"the cache holds {cache.max_length} tokens per row, shorter than the {length}-token prompts")
    lengths = jnp.full((batch,), length, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    starts = jnp.zeros((batch,), jnp.int32) if start_positions is None else start_positions.astype(jnp.int32)
    model = params.model()
    offsets = jnp.arange(length, dtype=jnp.int32)[None, :]
    chunked = dataclasses.replace(cache, continues_prefix=start_positions is not None)
    hidden, chunked = model(token_ids, starts[:, None] + offsets, offsets < lengths[:, None], chunked)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    state = DecodeState(cache=dataclasses.replace(chunked, continues_prefix=False), lengths=starts + lengths)
    return state, model.logits(last)


@functools.partial(jax.jit, donate_argnames=("state",))
def decode_step(params: Params, state: DecodeState, tokens: jax.Array) -> tuple[DecodeState, jax.Array]:
    """Appends one token per row (tokens [B]) and returns the next-token logits [B, vocab]. Rows whose cache is
    full (lengths == cache.max_length) write nothing."""
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
