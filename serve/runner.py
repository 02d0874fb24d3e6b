"""The model runner: the device state, shape buckets, compiled programs and one device call per step.

Device state lives between steps and is changed only by the steps themselves (vLLM's persistent InputBatch):

    pool        the paged KV pool (donated into every step, updated in place)
    DeviceBatch per slot (one per running sequence, plus a padding slot): its block table at full width, its
                last sampled token (the next decode input), its sampling parameters (penalties and logit bias
                too), prompt length and stop ids (held back under min_tokens), and its token history (per-token
                counts of what it generated and a mask of its prompt, for the penalties)

A step's host inputs are small: decode rows (slot, position), prompt-chunk rows (tokens, slot, start, length),
and the block-table entries that changed since the last step. One jitted program per step

    tables ← tables + updates
    decode rows:  decode_step over tables[slots, :width]    → sample → tokens[slot]
    chunk rows:   prefill(start_positions) over the same pool → sample at each chunk's end → tokens[slot]
                  (and, when a row asks, the log-probabilities of its prompt tokens from every position)

returns the sampled tokens (with their log-probabilities where asked), which the host starts copying back at once and reads one step later, after it has
dispatched the next step: the device never waits on the host's bookkeeping. Sampled tokens feed the next decode
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
from qoq_jax.logits_processors import TokenHistory
from qoq_jax.logprobs import TokenLogprobs, no_logprobs, prompt_logprobs
from qoq_jax.params import Params
from qoq_jax.sampling import SampledTokens, SamplingBatch, SamplingParams, sample_next
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeRows:
    slots: jax.Array  # [B] int32; padding rows: the padding slot
    positions: jax.Array  # [B] int32: tokens already in the cache; padding rows: 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ChunkRows:
    tokens: jax.Array  # [R, T] int32
    slots: jax.Array  # [R] int32
    starts: jax.Array  # [R] int32
    lengths: jax.Array  # [R] int32; padding rows: 0
    samples: jax.Array  # [R] bool: the row ends its sequence's chunk and its token is kept
    sampling: SamplingBatch  # [R]: written into the rows' slots, with the next three
    prompt_lengths: jax.Array  # [R] int32
    stop_ids: jax.Array  # [R, MAX_HELD_STOP_IDS] int32
    targets: jax.Array  # [R, T] int32: the token after each position (prompt log-probabilities)
    wants_prompt_logprobs: jax.Array  # [R] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    table_updates: jax.Array  # [K, 3] int32 (slot, index, page); padding: slot out of range, dropped
    decode: DecodeRows | None
    chunks: ChunkRows | None


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    """A compiled program's shape: padded decode rows, chunk rows (0: none) and block-table width in pages."""

    decode_rows: int
    chunk_rows: int
    width: int

    def covers(self, other: "StepShape") -> bool:
        return self.decode_rows >= other.decode_rows and self.chunk_rows >= other.chunk_rows and self.width >= other.width

    def cost(self, row_tokens: int) -> tuple[int, int]:
        """Tokens computed, then width: the order in which a fallback program is preferred."""
        return self.decode_rows + self.chunk_rows * row_tokens, self.width


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    """The tokens one step sampled: one per decode row, and one per chunk row (kept only where it samples); their
    log-probabilities (TokenLogprobs of numpy arrays) when a row of the step asked, else None; and the prompt
    log-probabilities [R, T] of the chunk rows (position t scores the token after it) when one asked."""

    decode_token_ids: np.ndarray
    chunk_token_ids: np.ndarray
    decode_logprobs: TokenLogprobs | None = None
    chunk_logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None


class InFlightStep:
    """A dispatched step: what it was asked to do, and its sampled tokens (and the log-probabilities its
    requests asked for) on their way to the host."""

    def __init__(self, scheduled: SchedulerOutput, epochs: tuple[int, ...], outputs, index: int):
        self.scheduled = scheduled
        self.epochs = epochs  # of decode rows, then chunks, when planned
        self.index = index
        decode, chunk, prompt = outputs  # SampledTokens, SampledTokens, TokenLogprobs; None where absent
        sequences = list(scheduled.decode) + [c.seq for c in scheduled.chunks]
        wants = any(s.request.sampling.logprobs is not None for s in sequences)
        wants_prompt = any(c.seq.request.sampling.prompt_logprobs is not None for c in scheduled.chunks)
        self._arrays = [
            None if decode is None else decode.tokens,
            None if chunk is None else chunk.tokens,
            None if decode is None or not wants else decode.logprobs,
            None if chunk is None or not wants else chunk.logprobs,
            prompt if wants_prompt else None,
        ]
        for array in jax.tree.leaves(self._arrays):
            array.copy_to_host_async()

    def result(self) -> RunnerOutput:
        """Blocks until the step has run."""
        decode, chunk, *logprobs = jax.tree.map(np.asarray, self._arrays)
        decode = np.zeros((0,), np.int32) if decode is None else decode
        chunk = np.zeros((0,), np.int32) if chunk is None else chunk
        return RunnerOutput(decode[: len(self.scheduled.decode)], chunk, *logprobs)


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
        min_width = -(-prefill_row_tokens // page_size)  # a chunk's rows fit its table
        self.width_buckets = sorted({min(max(w, min_width), pages_per_seq) for w in _powers_of_two(pages_per_seq)})
        # Entries a step can add: a page per decode row; a whole table per admitted sequence (one per row at most).
        self.max_table_updates = max_num_seqs + max_prefill_rows * (pages_per_seq + 1)
        self.num_dispatched = 0
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
        """The widest rows at every width: any step has a compiled program that covers it."""
        d, c = self.decode_buckets[-1], self.chunk_buckets[-1]
        return [StepShape(*rows, w) for w in self.width_buckets for rows in ((d, 0), (0, c), (d, c))]

    def warmup(self, mode: str, threads: int = 1) -> None:
        if mode not in WARMUP_MODES:
            raise ValueError(f"warmup must be one of {WARMUP_MODES}; got {mode!r}")
        if mode != "none":
            self._programs.compile_all(self.all_shapes() if mode == "all" else self.cover_shapes(), threads)

    def _compile(self, shape: StepShape):
        inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._inputs(None, shape))
        return _step.lower(self.params, *self._abstract_state, inputs, width=shape.width).compile()

    # --- one step ---------------------------------------------------------------------------------------------

    def dispatch(self, scheduled: SchedulerOutput) -> InFlightStep:
        """Runs `scheduled` on the device without waiting for it."""
        shape, program = self._programs.get(self.shape_of(scheduled))
        inputs = self._inputs(scheduled, shape)
        epochs = tuple(s.epoch for s in scheduled.decode) + tuple(c.seq.epoch for c in scheduled.chunks)
        self.pool, self.batch, *outputs = program(self.params, self.pool, self.batch, inputs)
        self.num_dispatched += 1
        return InFlightStep(scheduled, epochs, outputs, self.num_dispatched)

    def shape_of(self, scheduled: SchedulerOutput) -> StepShape:
        """The smallest buckets holding the step: rows, and pages of its longest sequence."""
        rows = sum(-(-c.num_tokens // self.row_tokens) for c in scheduled.chunks)
        longest = max(
            [p + 1 for p in scheduled.decode_positions] + [c.start + c.num_tokens for c in scheduled.chunks]
        )
        return StepShape(
            _bucket(len(scheduled.decode), self.decode_buckets),
            _bucket(rows, self.chunk_buckets),
            _bucket(-(-longest // self.page_size), self.width_buckets),
        )

    def _inputs(self, scheduled: SchedulerOutput | None, shape: StepShape) -> StepInputs:
        """Host arrays of `shape` holding `scheduled` (None: all padding, for compiling)."""
        padding, dropped = self.num_slots, self.num_slots + 1
        updates = np.full((self.max_table_updates, 3), (dropped, 0, 0), np.int32)
        decode = chunks = None
        if shape.decode_rows:
            slots = np.full((shape.decode_rows,), padding, np.int32)
            positions = np.zeros((shape.decode_rows,), np.int32)
            if scheduled is not None and scheduled.decode:
                count = len(scheduled.decode)
                slots[:count] = [s.slot for s in scheduled.decode]
                positions[:count] = scheduled.decode_positions
            decode = DecodeRows(slots, positions)
        if shape.chunk_rows:
            rows = shape.chunk_rows
            tokens = np.zeros((rows, self.row_tokens), np.int32)
            targets = np.zeros((rows, self.row_tokens), np.int32)
            meta = np.zeros((6, rows), np.int32)  # slot, start, length, samples, prompt length, wants prompt logprobs
            meta[0] = padding
            stop_ids = np.full((rows, MAX_HELD_STOP_IDS), -1, np.int32)
            sampling = [SamplingParams()] * rows
            row = 0
            for chunk in () if scheduled is None else scheduled.chunks:
                seq = chunk.seq
                request = seq.request
                for start in range(chunk.start, chunk.start + chunk.num_tokens, self.row_tokens):
                    length = min(self.row_tokens, chunk.start + chunk.num_tokens - start)
                    tokens[row, :length] = seq.token_ids[start : start + length]
                    following = seq.token_ids[start + 1 : start + length + 1]
                    targets[row, : len(following)] = following
                    wants_prompt = request.sampling.prompt_logprobs is not None
                    meta[:, row] = seq.slot, start, length, 0, len(request.prompt_token_ids), wants_prompt
                    stop_ids[row, : len(seq.held_stop_ids)] = seq.held_stop_ids
                    sampling[row] = request.sampling
                    row += 1
                meta[3, row - 1] = chunk.samples
            chunks = ChunkRows(
                tokens, meta[0], meta[1], meta[2], meta[3].astype(bool),
                SamplingBatch.stack(sampling, logit_bias_width=MAX_LOGIT_BIAS),
                meta[4], stop_ids, targets, meta[5].astype(bool),
            )  # fmt: skip
        if scheduled is not None:
            entries = [
                (update.slot, update.first_index + i, page)
                for update in scheduled.table_updates
                for i, page in enumerate(update.pages)
            ]
            if len(entries) > self.max_table_updates:
                raise RuntimeError(f"{len(entries)} block-table entries in one step; at most {self.max_table_updates}")
            if entries:
                updates[: len(entries)] = entries
        return StepInputs(updates, decode, chunks)

    def chunk_rows(self, scheduled: SchedulerOutput) -> list[range]:
        """The step's chunk rows holding each chunk, in order (its last one samples)."""
        ends = list(itertools.accumulate(-(-c.num_tokens // self.row_tokens) for c in scheduled.chunks))
        return [range(start, end) for start, end in zip([0] + ends, ends)]


@functools.partial(jax.jit, static_argnames=("width",), donate_argnames=("pool", "batch"))
def _step(params: Params, pool: PagedKVCache, batch: DeviceBatch, inputs: StepInputs, *, width: int):
    """One engine step: decode rows and prompt-chunk rows over the one pool, sampling on the device.

    Returns the pool, the batch, the decode rows' and the chunk rows' SampledTokens (None where the step has no
    such rows) and the chunk rows' prompt TokenLogprobs [R, T] (None without chunk rows)."""
    dropped = batch.tokens.shape[0]  # one past the padding slot: scatters there are dropped
    slots, indices, pages = inputs.table_updates.T
    tables = batch.tables.at[slots, indices].set(pages, mode="drop")
    tokens, sampling, prompt_lengths, stop_ids, history = (
        batch.tokens, batch.sampling, batch.prompt_lengths, batch.stop_ids, batch.history
    )  # fmt: skip
    decoded = sampled_chunks = prompt = None
    chunks = inputs.chunks
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
    if inputs.decode is not None:
        rows = inputs.decode
        cache = dataclasses.replace(pool, block_tables=tables[rows.slots, :width])
        state, logits = decode_step(params, DecodeState(cache=cache, lengths=rows.positions), tokens[rows.slots])
        decoded, history = _sample(logits, rows.slots, state.lengths, sampling, prompt_lengths, stop_ids, history)
        tokens = tokens.at[jnp.where(rows.slots < dropped - 1, rows.slots, dropped)].set(decoded.tokens, mode="drop")
        pool = state.cache
    if chunks is not None:
        cache = dataclasses.replace(pool, block_tables=tables[chunks.slots, :width])
        state, hidden = prefill_hidden(
            params, chunks.tokens, chunks.lengths, cache=cache, start_positions=chunks.starts
        )
        logits = lm_head(params, last_positions(hidden, chunks.lengths))
        sampling_slots = jnp.where(chunks.samples, chunks.slots, dropped)
        sampled_chunks, history = _sample(
            logits, sampling_slots, state.lengths, sampling, prompt_lengths, stop_ids, history
        )
        tokens = tokens.at[sampling_slots].set(sampled_chunks.tokens, mode="drop")
        prompt = jax.lax.cond(
            jnp.any(chunks.wants_prompt_logprobs),
            lambda: prompt_logprobs(params, hidden, chunks.targets),
            lambda: no_logprobs(chunks.tokens.shape, params.config.vocab_size),
        )
        pool = state.cache
    pool = dataclasses.replace(pool, block_tables=jnp.zeros((1, 1), jnp.int32))
    batch = DeviceBatch(tables, tokens, sampling, prompt_lengths, stop_ids, history)
    return pool, batch, decoded, sampled_chunks, prompt


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
    return sampled, history.record(slots, sampled.tokens[:, None], True, True)


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
