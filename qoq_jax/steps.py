"""Pure step functions over pytrees: `forward`, `prefill`, `decode_step`.

Each is jitted here (so eager calls are fast) and stays traceable inside a user's own `jax.jit`.
`decode_step` donates its state, so the KV cache is updated in place.

Called eagerly, each first checks on the host what the arrays hold, and refuses with `InvalidRequestError`:
token ids outside the vocabulary, prompt lengths outside [1, T], chunks past their cache, decode rows whose cache
is full or that stand at the end of the model's context (reading device arrays back for this waits for them).
Inside a jit the values are unknown and unchecked, and these cases are defined as: an out-of-vocabulary id reads
a NaN embedding (its row's logits are NaN; other rows are unharmed), and a row whose cache is full writes nothing
(the engine relies on this for its padding rows). Shapes are checked in both cases.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from qoq_jax.errors import InvalidRequestError, PromptTooLongError
from qoq_jax.kv_cache import DEFAULT_PAGE_SIZE, KVCache, NoKVCache, PagedKVCache
from qoq_jax.params import Params
from qoq_jax.sharding import TENSOR_AXES


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The paged KV cache and how many tokens of each row it holds (the next token's position)."""

    cache: PagedKVCache
    lengths: jax.Array  # [B] int32


def _host_checked(check):
    """Runs `check` (with the step's own arguments) before the jitted step; `.trace`, `.lower` and `.eval_shape`
    stay the jitted function's, so lowering never needs concrete values."""

    def wrap(jitted):
        @functools.wraps(jitted)
        def checked(*args, **kwargs):
            check(*args, **kwargs)
            return jitted(*args, **kwargs)

        checked.trace, checked.lower, checked.eval_shape = jitted.trace, jitted.lower, jitted.eval_shape
        return checked

    return wrap


def _host_value(x) -> np.ndarray | None:
    """x's values, or None inside a trace (or for an array spread over other hosts' devices)."""
    try:
        return np.asarray(x) if getattr(x, "is_fully_addressable", True) else None
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_token_ids(params: Params, token_ids, name: str, ndim: int) -> None:
    kind = "[batch, seq]" if ndim == 2 else "[batch]"
    if jnp.ndim(token_ids) != ndim or not jnp.issubdtype(jnp.result_type(token_ids), jnp.integer):
        raise InvalidRequestError(f"{name} must be an integer array {kind}, got shape {jnp.shape(token_ids)}")
    ids = _host_value(token_ids)
    vocab = params.config.vocab_size
    if ids is not None and ids.size and not (0 <= ids.min() and ids.max() < vocab):
        where = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= vocab))[0])
        index = ", ".join(map(str, where))
        raise InvalidRequestError(f"{name}[{index}] = {ids[where]} is outside the vocabulary [0, {vocab})")


def _check_rows(name: str, values, batch: int) -> np.ndarray | None:
    if jnp.shape(values) != (batch,):
        raise InvalidRequestError(f"{name} must have shape ({batch},), one per row; got {jnp.shape(values)}")
    host = _host_value(values)
    return None if host is None else host.astype(np.int64)


def _check_forward(params: Params, token_ids) -> None:
    _check_token_ids(params, token_ids, "token_ids", ndim=2)


def _check_prefill(params: Params, token_ids, lengths=None, *, cache=None, start_positions=None, **_) -> None:
    _check_token_ids(params, token_ids, "token_ids", ndim=2)
    batch, width = jnp.shape(token_ids)
    given = None if lengths is None else _check_rows("lengths", lengths, batch)
    shortest = 1 if cache is None else 0  # into a given cache a row of length 0 is padding: it writes nothing
    if given is not None and np.any((given < shortest) | (given > width)):
        row = int(np.argmax((given < shortest) | (given > width)))
        raise InvalidRequestError(
            f"lengths[{row}] = {given[row]} is outside [{shortest}, {width}], the prompt block"
            + ("" if shortest else " (length 0 is a padding row, only into a given cache)")
        )
    if start_positions is None or cache is None:
        return
    starts = _check_rows("start_positions", start_positions, batch)
    if starts is None:
        return
    if np.any(starts < 0):
        row = int(np.argmax(starts < 0))
        raise InvalidRequestError(f"start_positions[{row}] = {starts[row]} is negative")
    ends = starts + (np.full(batch, width) if given is None else given)
    limit = min(cache.max_length, params.config.max_context)
    if np.any(ends > limit):
        row = int(np.argmax(ends > limit))
        raise InvalidRequestError(
            f"start_positions[{row}] + lengths[{row}] = {ends[row]} exceeds the {cache.max_length} tokens of its "
            f"cache row (model context {params.config.max_context})"
        )


def _check_decode_step(params: Params, state: DecodeState, tokens) -> None:
    _check_token_ids(params, tokens, "tokens", ndim=1)
    batch = jnp.shape(state.lengths)[0]
    _check_rows("tokens", tokens, batch)
    lengths = _check_rows("state.lengths", state.lengths, batch)
    if lengths is None:
        return
    capacity, context = state.cache.max_length, params.config.max_context
    for row, length in enumerate(lengths.tolist()):
        if length >= capacity:
            raise InvalidRequestError(f"row {row} holds {length} tokens: its cache of {capacity} tokens is full")
        if length >= context:
            raise InvalidRequestError(f"row {row} is at position {length}: the model's context is {context} tokens")


@_host_checked(_check_forward)
@jax.jit
def forward(params: Params, token_ids: jax.Array) -> jax.Array:
    """Logits [B, S, vocab] float32 of unpadded token ids [B, S]. Nothing is cached; at KV4/KV8 attention sees
    the keys and values after their quantization round trip (see `NoKVCache`), as `prefill` does."""
    batch, length = token_ids.shape
    _check_fits(params, length)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    valid = jnp.ones((batch, length), bool)
    cache = NoKVCache(
        kv_bits=params.kv_bits, kv_clip=params.kv_clip, kv_range_search=params.kv_range_search, kernel=params.kernel
    )
    logits, _ = _run_model(params, token_ids, positions, valid, cache)
    return logits


@_host_checked(_check_prefill)
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
    they take positions start..start+length−1 and attend over those cached tokens too.

    Every attention sees keys and values as the pages hold them (at KV4/KV8 after their quantization round
    trip), so prefilling a prompt at once, in chunks, over a cached prefix or again after a preemption gives the
    same logits to float rounding, and the logits of `forward`. Without `start_positions` the prompts attend over
    their own round-tripped K/V (cuDNN flash attention on GPU); with it, over the pages (the Pallas prefill
    kernel on GPU), whose block tables may be narrower than T as long as they cover each row's start + length:
    tokens past a row's table are not stored. A row of length 0 (padding: give it a block-table row of
    `num_pages`, so nothing is written) gets finite logits and a state length of its start."""
    state, hidden, lengths = _prefill(params, token_ids, lengths, max_length, page_size, cache, start_positions)
    return state, lm_head(params, last_positions(hidden, lengths))


@_host_checked(_check_prefill)
@functools.partial(jax.jit, static_argnames=("max_length", "page_size"), donate_argnames=("cache",))
def prefill_hidden(
    params: Params,
    token_ids: jax.Array,
    lengths: jax.Array | None = None,
    *,
    max_length: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    cache: PagedKVCache | None = None,
    start_positions: jax.Array | None = None,
) -> tuple[DecodeState, jax.Array]:
    """`prefill` returning the final hidden states [B, T, D] of every prompt position instead of the last
    logits, which are `lm_head(params, last_positions(hidden, lengths))`: the logits of any position without
    [B, T, vocab] ever existing (prompt log-probabilities, `qoq_jax.logprobs.prompt_logprobs`)."""
    state, hidden, _ = _prefill(params, token_ids, lengths, max_length, page_size, cache, start_positions)
    return state, hidden


def last_positions(hidden_btd: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """Each row's hidden state [B, D] at its last token (position lengths − 1; a row of length 0: its first)."""
    return jnp.take_along_axis(hidden_btd, jnp.maximum(lengths_b - 1, 0)[:, None, None], axis=1)[:, 0]


def _prefill(params, token_ids, lengths, max_length, page_size, cache, start_positions):
    """The decode state, the final hidden states and the row lengths (filled in when not given)."""
    batch, length = token_ids.shape
    if cache is None:
        if start_positions is not None:
            raise ValueError("start_positions continue sequences in a cache: pass the cache too")
        max_length = length if max_length is None else max_length
        if max_length < length:
            raise ValueError(f"max_length={max_length} is shorter than the {length}-token prompt block")
        _check_fits(params, max_length)
        cache = PagedKVCache.for_batch(
            params.config,
            batch,
            max_length,
            page_size=page_size,
            dtype=params.dtype,
            kv_bits=params.kv_bits,
            kernel=params.kernel,
            kv_clip=params.kv_clip,
            kv_range_search=params.kv_range_search,
        )
    elif max_length is not None:
        raise ValueError("pass either max_length (for a fresh cache) or cache, not both")
    elif cache.block_tables.shape[0] != batch:
        raise ValueError(f"the cache has block tables for {cache.block_tables.shape[0]} rows; got {batch} prompts")
    lengths = jnp.full((batch,), length, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    starts = jnp.zeros((batch,), jnp.int32) if start_positions is None else start_positions.astype(jnp.int32)
    offsets = jnp.arange(length, dtype=jnp.int32)[None, :]
    chunked = dataclasses.replace(cache, continues_prefix=start_positions is not None)
    positions, valid = starts[:, None] + offsets, offsets < lengths[:, None]
    hidden, chunked = _run_decoder(params, token_ids, positions, valid, chunked)
    state = DecodeState(cache=dataclasses.replace(chunked, continues_prefix=False), lengths=starts + lengths)
    return state, hidden, lengths


@_host_checked(_check_decode_step)
@functools.partial(jax.jit, donate_argnames=("state",))
def decode_step(params: Params, state: DecodeState, tokens: jax.Array) -> tuple[DecodeState, jax.Array]:
    """Appends one token per row (tokens [B]) at position state.lengths[b] and returns the next-token logits
    [B, vocab]. Rows whose cache is full (lengths == cache.max_length) write nothing; a padding row (length 0, a
    block-table row of `num_pages`) writes nothing, attends over nothing and costs one page step."""
    positions = state.lengths[:, None]
    logits, cache = _run_model(params, tokens[:, None], positions, jnp.ones_like(positions, bool), state.cache)
    return DecodeState(cache=cache, lengths=state.lengths + 1), logits[:, 0]


def _run_model(params: Params, token_ids, positions, valid, cache: KVCache):
    """The model over new tokens [B, T]: float32 logits [B, T, vocab] and the updated cache."""
    hidden, cache = _run_decoder(params, token_ids, positions, valid, cache)
    return lm_head(params, hidden), cache


def _run_decoder(params: Params, token_ids, positions, valid, cache: KVCache):
    """The decoder over new tokens [B, T]: the final (normed) hidden states [B, T, D] and the updated cache.

    With tensor parallelism the model runs per device inside `shard_map` on its shards of the weights and cache,
    calling its collectives itself (see `qoq_jax.sharding`); the hidden states come out whole on every device."""
    parallel = params.parallel

    def run(state, cache, token_ids, positions, valid):
        model = nnx.merge(params.graphdef, state)
        tensor_axes = () if parallel is None else TENSOR_AXES
        return model(token_ids, positions, valid, cache, tensor_axes=tensor_axes)

    args = (params.state, cache, token_ids, positions, valid)
    if parallel is None:
        return run(*args)
    return jax.shard_map(
        run,
        mesh=parallel.mesh,
        in_specs=parallel.partition_specs(args),
        out_specs=(P(), parallel.partition_specs(cache)),
        check_vma=False,  # the collectives are the model's own; Pallas calls carry no replication types
    )(*args)


def lm_head(params: Params, hidden: jax.Array) -> jax.Array:
    """Float32 logits [..., vocab] of final hidden states [..., D]; split over the vocabulary under tensor
    parallelism, where the LM head is."""
    parallel = params.parallel

    def run(state, hidden):
        return nnx.merge(params.graphdef, state).logits(hidden)

    if parallel is None:
        return run(params.state, hidden)
    return jax.shard_map(
        run,
        mesh=parallel.mesh,
        in_specs=(parallel.partition_specs(params.state), P()),
        out_specs=parallel.logits_spec(hidden.ndim),
        check_vma=False,
    )(params.state, hidden)


def _check_fits(params: Params, length: int) -> None:
    config = params.config
    if length > config.max_context:
        raise PromptTooLongError(
            f"{length} tokens exceed the model's context of {config.max_context} ({config.context_limit_reason})"
        )
