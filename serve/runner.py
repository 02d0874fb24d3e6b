"""The model runner: the device state, shape buckets, compiled programs and one device call per step.

Device state lives between steps and is changed only by the steps themselves (vLLM's persistent InputBatch):

    pool        the paged KV pool (donated into every step, updated in place)
    DeviceBatch per slot (one per running sequence, plus a padding slot): its block table at full width, its
                last sampled token (the next decode input), its sampling parameters (penalties and logit bias
                too), prompt length and stop ids (held back under min_tokens), and its token history (per-token
                counts of what it generated and a mask of its prompt, for the penalties)

A step's host inputs are small: decode rows (slot, position), prompt-chunk rows (tokens, slot, start, length,
the settings their slot takes on), and the block-table entries that changed since the last step, packed in one
int32 and one float32 array (two transfers). One jitted program per step

    tables ← tables + updates
    decode rows:  decode_step over tables[slots, :width]    → logits
    chunk rows:   prefill(start_positions) over the same pool → logits at each chunk's end
                  (and, when a row asks, the log-probabilities of its prompt tokens from every position)
    all rows:     one sampler → tokens[slot]

returns the sampled tokens (and log-probabilities, copied back only in steps where a request asked), which the
host starts copying back at once and reads one step later, after it has dispatched the next step: the device
never waits on the host's bookkeeping. Sampled tokens feed the next decode
on the device, so a decoding sequence's token never makes the round trip before it is used.

Shapes are bucketed to powers of two: decode rows up to max_num_seqs, chunk rows of `prefill_row_tokens` tokens
up to max_prefill_rows, and the table width to the pages of the longest sequence in the step, so attention reads
what is there, not max_model_len. Each (decode rows, chunk rows, width) is one compiled program. Warm-up compiles
a covering set (the widest rows at every width); a step whose own program is not compiled yet runs in the
cheapest compiled one that covers it (more padding rows), while its own compiles in the background, so serving
never waits on a compilation once warm-up is done.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np

from qoq_jax.kv_cache import PagedKVCache
from qoq_jax.logits_processors import NO_TOKEN, TokenHistory
from qoq_jax.logprobs import TokenLogprobs, no_logprobs, prompt_logprobs
from qoq_jax.params import Params
from qoq_jax.sampling import SamplingBatch, SamplingParams, sample_next
from qoq_jax.steps import DecodeState, decode_step, last_positions, lm_head, prefill_hidden
from serve.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

WARMUP_MODES = ("all", "cover", "none")
MAX_LOGIT_BIAS = 256  # logit_bias entries a request may give (a slot holds that many)
MAX_HELD_STOP_IDS = 32  # stop ids (EOS included) a request with min_tokens may hold back


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DeviceBatch:
    """Per-slot state on the device; the last slot is padding (its table is all `num_pages`: writes dropped)."""

    tables: jax.Array  # [slots + 1, pages per sequence] int32
    tokens: jax.Array  # [slots + 1] int32: each slot's last sampled token
    sampling: SamplingBatch  # [slots + 1]
    prompt_lengths: jax.Array  # [slots + 1] int32
    stop_ids: jax.Array  # [slots + 1, MAX_HELD_STOP_IDS] int32: held back under min_tokens; -1 pads
    history: TokenHistory  # [slots + 1, vocab]


@dataclasses.dataclass
class DecodeRows:
    slots: jax.Array  # [B] int32; padding rows: the padding slot
    positions: jax.Array  # [B] int32: tokens already in the cache; padding rows: 0


@dataclasses.dataclass
class ChunkRows:
    tokens: jax.Array  # [R, T] int32
    slots: jax.Array  # [R] int32
    starts: jax.Array  # [R] int32
    lengths: jax.Array  # [R] int32; padding rows: 0
    samples: jax.Array  # [R] bool: the row ends its sequence's chunk and its token is kept
    sampling: SamplingBatch  # [R]: written into the rows' slots, with the next two
    prompt_lengths: jax.Array  # [R] int32
    stop_ids: jax.Array  # [R, MAX_HELD_STOP_IDS] int32
    targets: jax.Array  # [R, T] int32: the token after each position (prompt log-probabilities)
    wants_prompt_logprobs: jax.Array  # [R] bool


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where a step's host inputs sit in its two flat arrays (one int32, one float32: two transfers a step).
    ints: table updates (slot, index, page) × K, decode slots × B, decode positions × B, then R chunk rows of
    `int_columns`; floats: R chunk rows of `float_columns` (with the settings each row writes into its slot)."""

    decode_rows: int
    chunk_rows: int
    row_tokens: int
    table_updates: int

    @functools.cached_property
    def int_columns(self) -> dict[str, slice | int]:
        widths = {"tokens": self.row_tokens, "targets": self.row_tokens, "stop_ids": MAX_HELD_STOP_IDS}
        widths["logit_bias_ids"] = MAX_LOGIT_BIAS
        return _columns(widths | dict.fromkeys(_CHUNK_SCALARS + _SAMPLING_INTS + _CHUNK_FLAGS))

    @functools.cached_property
    def float_columns(self) -> dict[str, slice | int]:
        return _columns({"logit_bias": MAX_LOGIT_BIAS} | dict.fromkeys(_SAMPLING_FLOATS))

    @property
    def num_ints(self) -> int:
        return 3 * self.table_updates + 2 * self.decode_rows + self.chunk_rows * _width(self.int_columns)

    @property
    def num_floats(self) -> int:
        return self.chunk_rows * _width(self.float_columns)

    def views(self, ints, floats):
        """The table updates [K, 3], decode slots and positions [B], chunk rows' ints and floats [R, columns]:
        numpy views to fill on the host, or the device arrays' slices."""
        ends = np.cumsum([3 * self.table_updates, self.decode_rows, self.decode_rows])
        updates, slots, positions = ints[: ends[0]], ints[ends[0] : ends[1]], ints[ends[1] : ends[2]]
        chunk_ints = ints[ends[2] :].reshape(self.chunk_rows, _width(self.int_columns))
        chunk_floats = floats.reshape(self.chunk_rows, _width(self.float_columns))
        return updates.reshape(-1, 3), slots, positions, chunk_ints, chunk_floats

    def unpack(self, ints: jax.Array, floats: jax.Array):
        """The table updates [K, 3], DecodeRows or None, ChunkRows or None."""
        updates, slots, positions, chunk_ints, chunk_floats = self.views(ints, floats)
        decode = DecodeRows(slots, positions) if self.decode_rows else None
        if not self.chunk_rows:
            return updates, decode, None
        column = {name: chunk_ints[:, at] for name, at in self.int_columns.items()}
        float_column = {name: chunk_floats[:, at] for name, at in self.float_columns.items()}
        sampling = SamplingBatch(
            **{name: float_column[name] for name in _SAMPLING_FLOATS},
            top_k=column["top_k"],
            seed=jax.lax.bitcast_convert_type(column["seed"], jnp.uint32),
            min_tokens=column["min_tokens"],
            logit_bias_ids=column["logit_bias_ids"],
            logit_bias=float_column["logit_bias"],
            **{name: column[name] > 0 for name in _CHUNK_FLAGS},
        )
        chunks = ChunkRows(
            tokens=column["tokens"],
            slots=column["slots"],
            starts=column["starts"],
            lengths=column["lengths"],
            samples=column["samples"] > 0,
            sampling=sampling,
            prompt_lengths=column["prompt_lengths"],
            stop_ids=column["stop_ids"],
            targets=column["targets"],
            wants_prompt_logprobs=column["wants_prompt_logprobs"] > 0,
        )
        return updates, decode, chunks

    @functools.cached_property
    def default_row(self) -> tuple[np.ndarray, np.ndarray]:
        """A chunk row's ints and floats with the default settings (what padding rows hold)."""
        return self.settings_row(SamplingParams())

    def settings_row(self, sampling: SamplingParams, held_stop_ids=(), num_prompt_tokens: int = 0):
        """A chunk row's ints and floats holding a request's settings (tokens, slot and position left at 0)."""
        column, float_column = self.int_columns, self.float_columns
        ints, floats = np.zeros((_width(column),), np.int32), np.zeros((_width(float_column),), np.float32)
        ints[column["stop_ids"]] = -1
        ints[column["stop_ids"]][: len(held_stop_ids)] = held_stop_ids
        ints[column["logit_bias_ids"]] = NO_TOKEN
        if sampling.logit_bias:
            ids, biases = zip(*sampling.logit_bias)
            ints[column["logit_bias_ids"]][: len(ids)], floats[float_column["logit_bias"]][: len(ids)] = ids, biases
        for name in _SAMPLING_INTS:
            ints[column[name]] = np.uint32(getattr(sampling, name)).view(np.int32)  # int32 values keep their bits
        for name in _SAMPLING_FLOATS:
            floats[float_column[name]] = getattr(sampling, name)
        ints[column["wants_logprobs"]] = sampling.logprobs is not None
        ints[column["processed_logprobs"]] = sampling.logprobs_mode == "processed"
        ints[column["prompt_lengths"]] = num_prompt_tokens
        ints[column["wants_prompt_logprobs"]] = sampling.prompt_logprobs is not None
        return ints, floats


_SAMPLING_INTS = ("top_k", "seed", "min_tokens")  # SamplingParams' integers (the seed as its uint32's bits)
_SAMPLING_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_CHUNK_SCALARS = ("slots", "starts", "lengths", "samples", "prompt_lengths", "wants_prompt_logprobs")
_CHUNK_FLAGS = ("wants_logprobs", "processed_logprobs")


def _columns(widths: dict[str, int | None]) -> dict[str, slice | int]:
    """Consecutive columns of the given widths (None: one column, indexed as a scalar)."""
    columns, at = {}, 0
    for name, width in widths.items():
        columns[name] = at if width is None else slice(at, at + width)
        at += 1 if width is None else width
    return columns


def _width(columns: dict[str, slice | int]) -> int:
    last = list(columns.values())[-1]
    return last + 1 if isinstance(last, int) else last.stop


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    """A compiled program's shape: padded decode rows, chunk rows (0: none) and block-table width in pages."""

    decode_rows: int
    chunk_rows: int
    width: int

    def covers(self, other: "StepShape") -> bool:
        return (
            self.decode_rows >= other.decode_rows and self.chunk_rows >= other.chunk_rows and self.width >= other.width
        )

    def cost(self, row_tokens: int) -> tuple[int, int]:
        """Tokens computed, then width: the order in which a fallback program is preferred."""
        return self.decode_rows + self.chunk_rows * row_tokens, self.width


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    """The tokens one step sampled: one per decode row, and one per chunk row (kept only where a chunk
    samples); their log-probabilities (TokenLogprobs of numpy arrays) when a request of the step asked, else None;
    and the prompt log-probabilities [R, T] of the chunk rows (position t scores the token after it) when one
    asked."""

    decode_token_ids: np.ndarray
    chunk_token_ids: np.ndarray
    decode_logprobs: TokenLogprobs | None = None
    chunk_logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None


class InFlightStep:
    """A dispatched step: what it was asked to do, and its sampled tokens (and the log-probabilities its
    requests asked for) on their way to the host."""

    def __init__(self, scheduled: SchedulerOutput, shape: StepShape, epochs: tuple[int, ...], outputs, index: int):
        self.scheduled = scheduled
        self.epochs = epochs  # of decode rows, then chunks, when planned
        self.index = index
        self._decode_rows = shape.decode_rows
        sampled, logprobs, prompt = outputs  # [decode rows + chunk rows] tokens and TokenLogprobs; [R, T]
        wants = any(s.request.sampling.logprobs is not None for s in _sequences(scheduled))
        wants_prompt = any(c.seq.request.sampling.prompt_logprobs is not None for c in scheduled.chunks)
        self._arrays = [sampled, logprobs if wants else None, prompt if wants_prompt else None]
        for array in jax.tree.leaves(self._arrays):
            array.copy_to_host_async()

    def result(self) -> RunnerOutput:
        """Blocks until the step has run."""
        sampled, logprobs, prompt = jax.tree.map(np.asarray, self._arrays)
        decode_logprobs = chunk_logprobs = None
        if logprobs is not None:
            decode_logprobs = jax.tree.map(lambda x: x[: self._decode_rows], logprobs)
            chunk_logprobs = jax.tree.map(lambda x: x[self._decode_rows :], logprobs)
        decode, chunk = sampled[: len(self.scheduled.decode)], sampled[self._decode_rows :]
        return RunnerOutput(decode, chunk, decode_logprobs, chunk_logprobs, prompt)


class ModelRunner:
    """Owns the device arrays and the compiled step programs."""

    def __init__(
        self,
        params: Params,
        *,
        num_pages: int,
        page_size: int,
        pages_per_seq: int,
        max_num_seqs: int,
        max_prefill_rows: int,
        prefill_row_tokens: int,
        compile_in_background: bool = True,
    ):
        self.params = params
        self.num_pages, self.page_size, self.pages_per_seq = num_pages, page_size, pages_per_seq
        self.num_slots = max_num_seqs
        self.row_tokens = prefill_row_tokens
        self.decode_buckets = [0] + _powers_of_two(max_num_seqs)
        self.chunk_buckets = [0] + _powers_of_two(max_prefill_rows)
        self.width_buckets = sorted({min(w, pages_per_seq) for w in _powers_of_two(pages_per_seq)})
        # Entries a step can add: a page per decode row; a whole table per admitted sequence (one per row at most).
        self.max_table_updates = max_num_seqs + max_prefill_rows * (pages_per_seq + 1)
        self.num_dispatched = 0
        self.num_steps_in_larger_program = 0  # run in a covering program while their own compiled
        self._layouts: dict[tuple[int, int], StepLayout] = {}
        self._build_state()
        self._programs = _Programs(self._compile, row_tokens=prefill_row_tokens, background=compile_in_background)

    def _build_state(self) -> None:
        """A fresh (empty) pool and batch: at start, and after a failure that lost the donated ones."""
        params, parallel = self.params, self.params.parallel

        def empty_pool():
            return PagedKVCache.init(
                params.config,
                num_pages=self.num_pages,
                page_size=self.page_size,
                block_tables=jnp.zeros((1, 1), jnp.int32),  # each step sets its rows' tables
                dtype=params.dtype,
                kv_bits=params.kv_bits,
                kv_clip=params.kv_clip,
                kv_range_search=params.kv_range_search,
                kernel=params.kernel,
            )

        slots = self.num_slots + 1
        batch = DeviceBatch(
            tables=np.full((slots, self.pages_per_seq), self.num_pages, np.int32),
            tokens=np.zeros((slots,), np.int32),
            sampling=SamplingBatch.stack([SamplingParams()] * slots, logit_bias_width=MAX_LOGIT_BIAS),
            prompt_lengths=np.zeros((slots,), np.int32),
            stop_ids=np.full((slots, MAX_HELD_STOP_IDS), -1, np.int32),
            history=jax.tree.map(np.asarray, TokenHistory.empty(slots, params.config.vocab_size)),
        )
        self.pool = empty_pool() if parallel is None else parallel.build(empty_pool)
        self.batch = jax.device_put(batch) if parallel is None else parallel.place(batch)
        self._abstract_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (self.pool, self.batch)
        )

    @property
    def state_lost(self) -> bool:
        """Whether a failed step consumed the donated pool or batch."""
        return any(leaf.is_deleted() for leaf in jax.tree.leaves((self.pool, self.batch)))

    def reset(self) -> None:
        self._build_state()

    @property
    def num_compiled(self) -> int:
        return self._programs.num_compiled

    @property
    def num_compiling(self) -> int:
        return self._programs.num_compiling

    def wait_for_compilations(self) -> None:
        """Blocks until the programs queued for background compilation are ready (benchmarks, tests)."""
        self._programs.wait()

    # --- compilation ----------------------------------------------------------------------------------------

    def all_shapes(self) -> list[StepShape]:
        return [
            StepShape(d, c, w)
            for d, c, w in itertools.product(self.decode_buckets, self.chunk_buckets, self.width_buckets)
            if d or c
        ]

    def cover_shapes(self) -> list[StepShape]:
        """At every width: decode-only programs at 1, 8, 64, … rows and the most, the most chunk rows alone, and
        both at their most. Any step has a program that covers it, and a decode-only step (the common one while
        its own program compiles) runs in one of at most 8× its rows (in the widest decode program, a step of one
        SmolLM2 sequence on a CPU cost 7× what its own program costs)."""
        d, c = self.decode_buckets[-1], self.chunk_buckets[-1]
        decode = sorted({b for b in self.decode_buckets if b.bit_length() % 3 == 1} | {d})
        rows = [(n, 0) for n in decode] + [(0, c), (d, c)]
        return [StepShape(*r, w) for w in self.width_buckets for r in rows]

    def warmup(self, mode: str, threads: int = 1) -> None:
        """Compiles the programs of a warm-up mode (one of WARMUP_MODES) before serving."""
        if mode != "none":
            self._programs.compile_all(self.all_shapes() if mode == "all" else self.cover_shapes(), threads)

    def _layout(self, shape: StepShape) -> StepLayout:
        """One per row counts, kept: its columns and default row are worked out once."""
        rows = shape.decode_rows, shape.chunk_rows
        layout = self._layouts.get(rows)
        if layout is None:
            layout = self._layouts[rows] = StepLayout(*rows, self.row_tokens, self.max_table_updates)
        return layout

    def _compile(self, shape: StepShape):
        inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self._inputs(None, shape)]
        layout = self._layout(shape)
        return _step.lower(self.params, *self._abstract_state, *inputs, layout=layout, width=shape.width).compile()

    # --- one step ---------------------------------------------------------------------------------------------

    def dispatch(self, scheduled: SchedulerOutput) -> InFlightStep:
        """Runs `scheduled` on the device without waiting for it."""
        own = self.shape_of(scheduled)
        shape, program = self._programs.get(own)
        self.num_steps_in_larger_program += shape != own
        ints, floats = self._inputs(scheduled, shape)
        epochs = tuple(s.epoch for s in scheduled.decode) + tuple(c.seq.epoch for c in scheduled.chunks)
        self.pool, self.batch, *outputs = program(self.params, self.pool, self.batch, ints, floats)
        self.num_dispatched += 1
        return InFlightStep(scheduled, shape, epochs, outputs, self.num_dispatched)

    def shape_of(self, scheduled: SchedulerOutput) -> StepShape:
        """The smallest buckets holding the step: rows, and pages of its longest sequence."""
        rows = sum(-(-c.num_tokens // self.row_tokens) for c in scheduled.chunks)
        longest = max([p + 1 for p in scheduled.decode_positions] + [c.start + c.num_tokens for c in scheduled.chunks])
        return StepShape(
            _bucket(len(scheduled.decode), self.decode_buckets),
            _bucket(rows, self.chunk_buckets),
            _bucket(-(-longest // self.page_size), self.width_buckets),
        )

    def _inputs(self, scheduled: SchedulerOutput | None, shape: StepShape) -> tuple[np.ndarray, np.ndarray]:
        """The two host arrays of `shape`'s layout holding `scheduled` (None: all padding, for compiling)."""
        layout, padding, dropped = self._layout(shape), self.num_slots, self.num_slots + 1
        ints = np.zeros((layout.num_ints,), np.int32)
        floats = np.zeros((layout.num_floats,), np.float32)
        updates, slots, positions, chunk_ints, chunk_floats = layout.views(ints, floats)
        updates[:, 0] = dropped
        slots[:] = padding
        column = layout.int_columns
        chunk_ints[:], chunk_floats[:] = layout.default_row
        chunk_ints[:, column["slots"]] = padding
        if scheduled is None:
            return ints, floats
        if scheduled.decode:
            count = len(scheduled.decode)
            slots[:count] = [s.slot for s in scheduled.decode]
            positions[:count] = scheduled.decode_positions
        row = 0
        for chunk in scheduled.chunks:
            seq = chunk.seq
            request = seq.request
            settings = layout.settings_row(request.sampling, seq.held_stop_ids, len(request.prompt_token_ids))
            for start in range(chunk.start, chunk.start + chunk.num_tokens, self.row_tokens):
                length = min(self.row_tokens, chunk.start + chunk.num_tokens - start)
                chunk_ints[row], chunk_floats[row] = settings
                following = seq.token_ids[start + 1 : start + length + 1]
                chunk_ints[row, column["tokens"]][:length] = seq.token_ids[start : start + length]
                chunk_ints[row, column["targets"]][: len(following)] = following
                chunk_ints[row, column["slots"]], chunk_ints[row, column["starts"]] = seq.slot, start
                chunk_ints[row, column["lengths"]] = length
                row += 1
            chunk_ints[row - 1, column["samples"]] = chunk.samples
        entries = [(u.slot, u.first_index + i, page) for u in scheduled.table_updates for i, page in enumerate(u.pages)]
        if len(entries) > layout.table_updates:
            raise RuntimeError(f"{len(entries)} block-table entries in one step; at most {layout.table_updates}")
        if entries:
            updates[: len(entries)] = entries
        return ints, floats

    def chunk_rows(self, scheduled: SchedulerOutput) -> list[range]:
        """The step's chunk rows holding each chunk, in order (its last one samples)."""
        ends = list(itertools.accumulate(-(-c.num_tokens // self.row_tokens) for c in scheduled.chunks))
        return [range(start, end) for start, end in zip([0] + ends, ends)]


def _sequences(scheduled: SchedulerOutput):
    return itertools.chain(scheduled.decode, (chunk.seq for chunk in scheduled.chunks))


@functools.partial(jax.jit, static_argnames=("layout", "width"), donate_argnames=("pool", "batch"))
def _step(params: Params, pool: PagedKVCache, batch: DeviceBatch, ints, floats, *, layout: StepLayout, width: int):
    """One engine step: decode rows and prompt-chunk rows over the one pool, sampling on the device.

    Returns the pool, the batch, the tokens sampled for the decode rows, then the chunk rows, with their
    TokenLogprobs, and the chunk rows' prompt TokenLogprobs [R, T] (None without chunk rows)."""
    updates, decode, chunks = layout.unpack(ints, floats)
    dropped = batch.tokens.shape[0]  # one past the padding slot: scatters there are dropped
    tables = batch.tables.at[updates[:, 0], updates[:, 1]].set(updates[:, 2], mode="drop")
    tokens, sampling, prompt_lengths, stop_ids, history = (
        batch.tokens, batch.sampling, batch.prompt_lengths, batch.stop_ids, batch.history
    )  # fmt: skip
    if chunks is not None:
        owned = jnp.where(chunks.lengths > 0, chunks.slots, dropped)

        def write(old, new):
            return old.at[owned].set(new, mode="drop")

        sampling = jax.tree.map(write, sampling, chunks.sampling)
        prompt_lengths, stop_ids = write(prompt_lengths, chunks.prompt_lengths), write(stop_ids, chunks.stop_ids)
        # A sequence's history starts with its first chunk (sequences with penalties never start on a cached
        # prefix); tokens past the prompt are outputs being recomputed after a preemption.
        history = history.restart(jnp.where(chunks.starts == 0, owned, dropped))
        offsets = jnp.arange(chunks.tokens.shape[1])[None, :]
        generated = chunks.starts[:, None] + offsets >= chunks.prompt_lengths[:, None]
        history = history.record(owned, chunks.tokens, generated, offsets < chunks.lengths[:, None])
    # Rows to sample, decode rows then chunk rows: their logits, the slots whose settings they take (out of range:
    # not kept) and where their tokens go (padding decode rows: nowhere), and the position of each new token.
    logits, sampling_slots, token_slots, positions, prompt = [], [], [], [], None
    if decode is not None:
        cache = dataclasses.replace(pool, block_tables=tables[decode.slots, :width])
        state, decode_logits = decode_step(
            params, DecodeState(cache=cache, lengths=decode.positions), tokens[decode.slots]
        )
        pool = state.cache
        logits.append(decode_logits)
        sampling_slots.append(decode.slots)
        token_slots.append(jnp.where(decode.slots < dropped - 1, decode.slots, dropped))
        positions.append(state.lengths)
    if chunks is not None:
        cache = dataclasses.replace(pool, block_tables=tables[chunks.slots, :width])
        state, hidden = prefill_hidden(
            params, chunks.tokens, chunks.lengths, cache=cache, start_positions=chunks.starts
        )
        pool = state.cache
        logits.append(lm_head(params, last_positions(hidden, chunks.lengths)))
        sampling_slots.append(jnp.where(chunks.samples, chunks.slots, dropped))
        token_slots.append(sampling_slots[-1])
        positions.append(state.lengths)
        prompt = jax.lax.cond(
            jnp.any(chunks.wants_prompt_logprobs),
            lambda: prompt_logprobs(params, hidden, chunks.targets),
            lambda: no_logprobs(chunks.tokens.shape, params.config.vocab_size),
        )
    # One sampler for every row of the step (a sequence has a decode row or chunk rows, never both).
    logits, sampling_slots, token_slots, positions = map(
        jnp.concatenate, (logits, sampling_slots, token_slots, positions)
    )
    sampled, history = _sample(logits, sampling_slots, positions, sampling, prompt_lengths, stop_ids, history)
    tokens = tokens.at[token_slots].set(sampled.tokens, mode="drop")
    pool = dataclasses.replace(pool, block_tables=jnp.zeros((1, 1), jnp.int32))
    batch = DeviceBatch(tables, tokens, sampling, prompt_lengths, stop_ids, history)
    if params.parallel is not None:
        batch = params.parallel.constrain(batch)  # as the next step takes it
    return pool, batch, sampled.tokens, sampled.logprobs, prompt


def _sample(logits, slots, positions, sampling, prompt_lengths, stop_ids, history):
    """SampledTokens of rows on `slots` (out of range: not kept) from their slots' settings; the kept tokens are
    recorded in the slots' history."""
    slot_rows = jnp.minimum(slots, prompt_lengths.shape[0] - 1)  # a row not kept reads the padding slot
    sampled = sample_next(
        logits,
        jax.tree.map(lambda x: x[slot_rows], sampling),
        history,
        positions,
        positions - prompt_lengths[slot_rows],
        stop_ids[slot_rows],
        history_rows_b=slot_rows,
    )
    return sampled, history.record_sampled(slots, sampled.tokens)


class _Programs:
    """Compiled step programs by shape. A step whose own program is not ready runs in the cheapest ready one
    that covers it, and its own is compiled in the background; with none ready it is compiled at once."""

    def __init__(self, compile_fn, *, row_tokens: int, background: bool):
        self._compile = compile_fn
        self._row_tokens = row_tokens
        self._in_background = background
        self._ready: dict[StepShape, object] = {}
        self._queued: dict[StepShape, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qoq-jax-compile")

    @property
    def num_compiled(self) -> int:
        return len(self._ready)

    def compile_all(self, shapes: list[StepShape], threads: int) -> None:
        missing = [s for s in shapes if s not in self._ready]
        with concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="qoq-jax-warmup") as pool:
            for shape, program in zip(missing, pool.map(self._compile, missing)):
                with self._lock:
                    self._ready[shape] = program

    def get(self, shape: StepShape):
        program = self._ready.get(shape)
        if program is not None:
            return shape, program
        with self._lock:
            covering = [s for s in self._ready if s.covers(shape)]
            if shape not in self._queued and covering and self._in_background:
                self._queued[shape] = self._background.submit(self._compile_in_background, shape)
        if not covering:
            log.info("compiling the engine step for %s while serving", shape)
            program = self._compile(shape)
            with self._lock:
                self._ready[shape] = program
            return shape, program
        best = min(covering, key=lambda s: s.cost(self._row_tokens))
        return best, self._ready[best]

    @property
    def num_compiling(self) -> int:
        return sum(not future.done() for future in list(self._queued.values()))

    def wait(self) -> None:
        """Until the background compilations queued so far are done."""
        concurrent.futures.wait(list(self._queued.values()))

    def _compile_in_background(self, shape: StepShape) -> None:
        try:
            program = self._compile(shape)
        except Exception:  # noqa: BLE001 - the covering program keeps serving this shape
            log.exception("compiling the engine step for %s failed; its steps keep running in a larger one", shape)
            return
        with self._lock:
            self._ready[shape] = program


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range((limit - 1).bit_length() + 1)]


def _bucket(size: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= size)
