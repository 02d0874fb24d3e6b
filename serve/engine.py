"""The serving engine: continuous batching over the paged KV cache.

`Engine.step()` is one scheduling iteration:

1. Requests added or aborted since the last step are taken in (thread-safe inboxes).
2. Schedule. Every running sequence in decode gets one token; when the pool has no page for it, the youngest
   running sequence is preempted: its pages are freed and it goes back to the front of the queue, to be
   recomputed (prompt plus what it generated) later, never dropped. Prompt chunks fill the rest of the step's
   token budget: running sequences still in prefill first, then waiting requests admitted while seats, rows and
   pages last. A new request first takes the cached pages of its longest cached prefix (prefix caching).
3. Run: one decode call for the decode batch and one prefill call for the chunks, each padded to a bucket that
   warm-up compiled, sampling on the device.
4. Outputs: each new token passes the stop rules (EOS, stop ids, stop strings, max_tokens, max_model_len); the
   text it adds is streamed (held back while it could still become a stop string); finished sequences free
   their pages, keeping their full pages findable in the prefix cache.

`AsyncEngine` runs the steps in a background thread and hands outputs to asyncio consumers.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import threading
from collections.abc import AsyncIterator

import jax
import jax.numpy as jnp
import numpy as np

from qoq_jax.errors import InvalidRequestError, PromptTooLongError
from qoq_jax.generate import Continuation, eos_ids
from jax.sharding import Mesh

from qoq_jax.kv_cache import PagedKVCache, pages_that_fit
from qoq_jax.page_allocator import PageAllocator
from qoq_jax.params import Params, shard_params
from qoq_jax.sampling import SamplingBatch, SamplingParams, sample
from qoq_jax.steps import DecodeState, decode_step, prefill
from serve.request import EngineStats, OverloadedError, Request, RequestOutput

log = logging.getLogger(__name__)

_MIN_PREFILL_BLOCK = 16
_DEVICE_MEMORY_FRACTION = 0.9  # of the device's memory for weights + KV pages; the rest for activations


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Capacity and shape buckets. Decode batches are padded to powers of two up to max_num_seqs, prefill
    chunks to (rows, block) powers of two up to (max_prefill_rows, max_prefill_chunk); every bucket is compiled
    at warm-up."""

    max_num_seqs: int = 32
    max_model_len: int | None = None  # prompt + generated tokens; default min(model context, 4096)
    page_size: int = 64
    num_pages: int | None = None  # default: kv_memory_bytes' worth, else what fits in device memory
    kv_memory_bytes: int | None = None  # KV pool bytes on each device
    max_num_batched_tokens: int = 512  # decode tokens + prompt chunk tokens per step
    max_prefill_chunk: int = 256
    max_prefill_rows: int = 4
    max_waiting: int = 1024
    prefix_caching: bool = True
    warmup: bool = True

    def __post_init__(self):
        for name in ("max_num_seqs", "page_size", "max_num_batched_tokens", "max_prefill_rows", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1; got {getattr(self, name)}")
        if self.max_prefill_chunk < _MIN_PREFILL_BLOCK:
            raise ValueError(f"max_prefill_chunk must be ≥ {_MIN_PREFILL_BLOCK}; got {self.max_prefill_chunk}")


@dataclasses.dataclass(eq=False)
class _Sequence:
    request: Request
    continuation: Continuation
    order: int  # arrival order: the largest is the youngest, preempted first
    stop_ids: frozenset[int]  # the request's stop token ids, and EOS unless it ignores it
    num_computed: int = 0  # tokens whose keys and values are in the pages
    prefilled: bool = False  # every token but the last sampled one is computed: decode feeds that one
    emitted_text: int = 0
    emitted_tokens: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        """The tokens the model consumes: prompt, then every sampled token kept."""
        return self.continuation.prompt + self.continuation.tokens


class Engine:
    """Continuous batching of `Request`s over one paged KV pool; `step()` runs one iteration."""

    def __init__(
        self,
        params: Params,
        config: EngineConfig = EngineConfig(),
        *,
        model_name: str = "qoq-jax",
        mesh: Mesh | None = None,
    ):
        """`mesh`: serve over its "tensor" axis (tensor parallelism); params already split keep their mesh."""
        params = shard_params(params, mesh)
        self.params = params
        self.config = config
        self.model_name = model_name
        self.tokenizer = params.tokenizer
        model_config = params.config
        self.max_model_len = min(config.max_model_len or min(model_config.max_context, 4096), model_config.max_context)
        self.pages_per_seq = -(-self.max_model_len // config.page_size)
        num_pages = self._num_pages()
        if num_pages < self.pages_per_seq:
            raise ValueError(
                f"the KV pool has {num_pages} pages of {config.page_size} tokens, fewer than one sequence of "
                f"max_model_len={self.max_model_len} needs ({self.pages_per_seq}); give it more memory or lower "
                "max_model_len"
            )
        self.allocator = PageAllocator(num_pages, config.page_size)

        def empty_pool():
            return PagedKVCache.init(
                model_config,
                num_pages=num_pages,
                page_size=config.page_size,
                block_tables=jnp.zeros((1, self.pages_per_seq), jnp.int32),
                dtype=params.dtype,
                kv_bits=params.kv_bits,
                kernel=params.kernel,
                kv_clip=params.kv_clip,
            )

        self._pool = empty_pool() if params.parallel is None else params.parallel.build(empty_pool)
        self._eos_ids = frozenset(eos_ids(params))
        self.decode_buckets = _powers_of_two(config.max_num_seqs)
        self.prefill_row_buckets = _powers_of_two(config.max_prefill_rows)
        capacity = self.pages_per_seq * config.page_size
        blocks = {min(b, capacity) for b in _powers_of_two(config.max_prefill_chunk) if b >= _MIN_PREFILL_BLOCK}
        self.prefill_block_buckets = sorted(blocks)  # never longer than a row's block table
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.running: list[_Sequence] = []
        self._added: collections.deque[Request] = collections.deque()
        self._aborted: collections.deque[str] = collections.deque()
        self._active_ids: set[str] = set()
        self._lock = threading.Lock()
        self._arrivals = itertools.count()
        self.work_available = threading.Event()
        self._counters = collections.Counter()
        if config.warmup:
            self.warmup()

    def _num_pages(self) -> int:
        """Pages per pool; with tensor parallelism every device holds each page's share of the KV heads, and
        the budget (kv_memory_bytes, device memory) is per device."""
        config, params = self.config, self.params
        if config.num_pages is not None:
            return config.num_pages
        parallel = params.parallel
        kv_shards = 1 if parallel is None else parallel.kv_shards
        budget = {
            "page_size": config.page_size,
            "kv_bits": params.kv_bits,
            "dtype": params.dtype,
            "kv_shards": kv_shards,
        }
        if config.kv_memory_bytes is not None:
            return pages_that_fit(params.config, config.kv_memory_bytes, 0, **budget)
        devices = [jax.devices()[0]] if parallel is None else list(parallel.mesh.devices.flat)
        memories = [device.memory_stats() or {} for device in devices]
        if all("bytes_limit" in memory for memory in memories):  # weights are already resident: in use is theirs
            return min(
                pages_that_fit(
                    params.config,
                    int(memory["bytes_limit"] * _DEVICE_MEMORY_FRACTION),
                    int(memory.get("bytes_in_use", 0)),
                    **budget,
                )
                for memory in memories
            )
        return config.max_num_seqs * self.pages_per_seq  # CPU: every seat at full length

    # --- requests (any thread) ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queues a request after checking it can ever be served; raises the error the client should see."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.params.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        if request.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be ≥ 1; got {request.max_tokens}")
        if request.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        if len(prompt) + request.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {request.max_tokens}: together more than "
                f"this server's context of {self.max_model_len} tokens"
            )
        with self._lock:
            if request.request_id in self._active_ids:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            if len(self.waiting) + len(self._added) >= self.config.max_waiting:
                raise OverloadedError(f"{self.config.max_waiting} requests are already waiting; retry later")
            self._active_ids.add(request.request_id)
            self._added.append(request)
        self.work_available.set()

    def abort(self, request_id: str) -> None:
        """Stops a request at the next step; its pages are freed and it ends with finish_reason "abort"."""
        self._aborted.append(request_id)
        self.work_available.set()

    def has_work(self) -> bool:
        return bool(self._added or self._aborted or self.waiting or self.running)

    def stats(self) -> EngineStats:
        allocator = self.allocator
        return EngineStats(
            waiting_requests=len(self.waiting) + len(self._added),
            running_requests=len(self.running),
            kv_pages_used=allocator.num_used_pages,
            kv_pages_free=allocator.num_free_pages,
            kv_pages_total=allocator.num_pages,
            prompt_tokens_total=self._counters["prompt_tokens"],
            generation_tokens_total=self._counters["generation_tokens"],
            prefix_cache_hit_tokens_total=self._counters["prefix_cache_hit_tokens"],
            preemptions_total=self._counters["preemptions"],
        )

    # --- one iteration (the engine thread) ---------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs = self._take_inbox()
        decode, chunks = self._schedule()
        if chunks:
            outputs += self._run_prefill(chunks)
        if decode:
            outputs += self._run_decode(decode)
        return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            while self._added:
                request = self._added.popleft()
                continuation = Continuation(
                    list(request.prompt_token_ids), self.tokenizer is not None, request.max_tokens
                )
                stop_ids = frozenset(request.stop_token_ids) | (frozenset() if request.ignore_eos else self._eos_ids)
                self.waiting.append(_Sequence(request, continuation, next(self._arrivals), stop_ids))
        while self._aborted:
            request_id = self._aborted.popleft()
            for queue in (self.waiting, self.running):
                for seq in [s for s in queue if s.request_id == request_id]:
                    queue.remove(seq)
                    seq.continuation.finish_reason = "abort"
                    outputs.append(self._finish(seq))
        return outputs

    def _schedule(self) -> tuple[list[_Sequence], list[tuple[_Sequence, int]]]:
        """The decode batch and the prompt chunks (sequence, tokens) of this step."""
        budget = self.config.max_num_batched_tokens
        decode = []
        for seq in list(self.running):
            if seq.prefilled and seq in self.running and len(decode) < budget and self._reserve(seq, 1):
                decode.append(seq)
        decode = [s for s in decode if s in self.running]  # a later reservation may have preempted one
        budget -= len(decode)
        chunks = []
        for seq in list(self.running):
            if seq.prefilled or seq not in self.running or budget < 1 or len(chunks) >= self.config.max_prefill_rows:
                continue
            size = self._chunk_size(seq, budget)
            if self._reserve(seq, size):
                chunks.append((seq, size))
                budget -= size
        while (
            self.waiting
            and budget >= 1
            and len(self.running) < self.config.max_num_seqs
            and len(chunks) < self.config.max_prefill_rows
        ):
            seq = self.waiting[0]
            if self.config.prefix_caching and seq.request_id not in self.allocator:
                seq.num_computed = self.allocator.share_prefix(seq.request_id, seq.tokens)
            size = self._chunk_size(seq, budget)
            if not self.allocator.can_allocate(seq.request_id, seq.num_computed + size):
                if seq.request_id in self.allocator:  # a waiting sequence holds no pages, shared ones included
                    self.allocator.release(seq.request_id)
                seq.num_computed = 0
                break  # admission never preempts; it waits for pages
            self.allocator.allocate(seq.request_id, seq.num_computed + size)
            self._counters["prefix_cache_hit_tokens"] += seq.num_computed
            self.waiting.popleft()
            self.running.append(seq)
            chunks.append((seq, size))
            budget -= size
        decode = [s for s in decode if s in self.running]
        chunks = [(s, n) for s, n in chunks if s in self.running]
        return decode, chunks

    def _chunk_size(self, seq: _Sequence, budget: int) -> int:
        return min(len(seq.tokens) - seq.num_computed, budget, self.prefill_block_buckets[-1])

    def _reserve(self, seq: _Sequence, num_tokens: int) -> bool:
        """Pages for seq's next `num_tokens` tokens, preempting the youngest running sequences (possibly seq
        itself, which then returns False) until they fit."""
        needed = seq.num_computed + num_tokens
        while not self.allocator.can_allocate(seq.request_id, needed):
            victim = max(self.running, key=lambda s: s.order)
            self._preempt(victim)
            if victim is seq:
                return False
        self.allocator.allocate(seq.request_id, needed)
        return True

    def _preempt(self, seq: _Sequence) -> None:
        self.allocator.release(seq.request_id)
        self.running.remove(seq)
        seq.num_computed, seq.prefilled = 0, False
        self.waiting.appendleft(seq)
        self._counters["preemptions"] += 1

    # --- running the model ---------------------------------------------------------------------------------

    def _run_prefill(self, chunks: list[tuple[_Sequence, int]]) -> list[RequestOutput]:
        rows = _bucket(len(chunks), self.prefill_row_buckets)
        block = _bucket(max(n for _, n in chunks), self.prefill_block_buckets)
        tokens = np.zeros((rows, block), np.int32)
        starts = np.zeros((rows,), np.int32)
        lengths = np.zeros((rows,), np.int32)
        for row, (seq, size) in enumerate(chunks):
            tokens[row, :size] = seq.tokens[seq.num_computed : seq.num_computed + size]
            starts[row], lengths[row] = seq.num_computed, size
        tables = self._tables([seq for seq, _ in chunks], rows)
        sampling = self._sampling([seq for seq, _ in chunks], rows)
        cache = dataclasses.replace(self._pool, block_tables=tables)
        cache, sampled = _prefill_and_sample(self.params, cache, tokens, starts, lengths, sampling)
        self._pool = cache
        sampled = np.asarray(sampled)
        outputs = []
        for row, (seq, size) in enumerate(chunks):
            seq.num_computed += size
            self._counters["prompt_tokens"] += size
            self._cache_prefix(seq)
            if seq.num_computed == len(seq.tokens):
                seq.prefilled = True
                outputs.append(self._append(seq, int(sampled[row])))
        return [o for o in outputs if o is not None]

    def _run_decode(self, decode: list[_Sequence]) -> list[RequestOutput]:
        rows = _bucket(len(decode), self.decode_buckets)
        tokens = np.zeros((rows,), np.int32)
        lengths = np.full((rows,), self.pages_per_seq * self.config.page_size, np.int32)  # padding: writes dropped
        for row, seq in enumerate(decode):
            tokens[row], lengths[row] = seq.tokens[-1], seq.num_computed
        cache = dataclasses.replace(self._pool, block_tables=self._tables(decode, rows))
        cache, sampled = _decode_and_sample(self.params, cache, tokens, lengths, self._sampling(decode, rows))
        self._pool = cache
        sampled = np.asarray(sampled)
        outputs = []
        for row, seq in enumerate(decode):
            seq.num_computed += 1
            self._cache_prefix(seq)
            outputs.append(self._append(seq, int(sampled[row])))
        return [o for o in outputs if o is not None]

    def _tables(self, seqs: list[_Sequence], rows: int) -> np.ndarray:
        tables = np.zeros((rows, self.pages_per_seq), np.int32)
        tables[: len(seqs)] = self.allocator.block_tables([s.request_id for s in seqs], self.pages_per_seq)
        return tables

    def _sampling(self, seqs: list[_Sequence], rows: int) -> SamplingBatch:
        return SamplingBatch.stack([s.request.sampling for s in seqs] + [SamplingParams()] * (rows - len(seqs)))

    def _cache_prefix(self, seq: _Sequence) -> None:
        if self.config.prefix_caching:
            self.allocator.cache_prefix(seq.request_id, seq.tokens[: seq.num_computed])

    # --- outputs ---------------------------------------------------------------------------------------------

    def _append(self, seq: _Sequence, token: int) -> RequestOutput | None:
        """Feeds one sampled token through the stop rules; the output it produces, if any."""
        request = seq.request
        seq.continuation.extend([token], seq.stop_ids, request.stop, self.tokenizer)
        self._counters["generation_tokens"] += 1
        if seq.continuation.finish_reason is None and len(seq.tokens) >= self.max_model_len:
            seq.continuation.finish_reason = "length"
        if seq.continuation.finish_reason is not None:
            self.running.remove(seq)
            return self._finish(seq)
        return self._output(seq)

    def _finish(self, seq: _Sequence) -> RequestOutput:
        if seq.request_id in self.allocator:
            self.allocator.release(seq.request_id)
        with self._lock:
            self._active_ids.discard(seq.request_id)
        return self._output(seq)

    def _output(self, seq: _Sequence) -> RequestOutput | None:
        """The tokens and text not yet emitted; text that may still turn into a stop string (or ends in an
        incomplete character) waits for the next token unless the sequence is finished."""
        continuation = seq.continuation
        finished = continuation.finish_reason is not None
        text = ""
        if self.tokenizer is not None:
            full = continuation.text
            if full is None:
                full = self.tokenizer.decode(continuation.tokens, skip_special_tokens=True)
            ready = len(full)
            if not finished:
                ready -= max((len(s) for s in seq.request.stop), default=1) - 1
                while ready > seq.emitted_text and full[ready - 1] == "\ufffd":
                    ready -= 1
            text = full[seq.emitted_text : max(ready, seq.emitted_text)]
            seq.emitted_text = max(ready, seq.emitted_text)
        new_tokens = tuple(continuation.tokens[seq.emitted_tokens :])
        seq.emitted_tokens = len(continuation.tokens)
        if not new_tokens and not text and not finished:
            return None
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            new_text=text,
            num_prompt_tokens=len(continuation.prompt),
            num_generated_tokens=len(continuation.tokens),
            finish_reason=continuation.finish_reason,
        )

    # --- compilation --------------------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compiles every decode and prefill bucket on inputs that write nothing, so serving never compiles."""
        capacity = self.pages_per_seq * self.config.page_size
        for rows in self.decode_buckets:
            cache = dataclasses.replace(self._pool, block_tables=np.zeros((rows, self.pages_per_seq), np.int32))
            lengths = np.full((rows,), capacity, np.int32)
            cache, tokens = _decode_and_sample(
                self.params, cache, np.zeros((rows,), np.int32), lengths, self._sampling([], rows)
            )
            self._pool = cache
        for rows in self.prefill_row_buckets:
            zeros = np.zeros((rows,), np.int32)
            for block in self.prefill_block_buckets:
                cache = dataclasses.replace(self._pool, block_tables=np.zeros((rows, self.pages_per_seq), np.int32))
                tokens = np.zeros((rows, block), np.int32)
                cache, _ = _prefill_and_sample(self.params, cache, tokens, zeros, zeros, self._sampling([], rows))
                self._pool = cache
        jax.block_until_ready(self._pool)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _decode_and_sample(params, cache, tokens, lengths, sampling):
    state, logits = decode_step(params, DecodeState(cache=cache, lengths=lengths), tokens)
    return state.cache, sample(logits, sampling, state.lengths)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _prefill_and_sample(params, cache, tokens, starts, lengths, sampling):
    state, logits = prefill(params, tokens, lengths, cache=cache, start_positions=starts)
    return state.cache, sample(logits, sampling, state.lengths)


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range((limit - 1).bit_length() + 1)]


def _bucket(size: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= size)


class AsyncEngine:
    """Steps an `Engine` in a background thread; `generate` streams a request's outputs to asyncio code."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def params(self) -> Params:
        return self.engine.params

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="qoq-jax-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping.set()
        self.engine.work_available.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes. Invalid requests raise before the first output; a consumer
        that stops early (a client gone) aborts the request, which frees its pages."""
        if not self.alive:
            raise RuntimeError(f"the engine is not running{f': {self.error!r}' if self.error else ''}")
        if request.request_id in self._queues:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue  # before the engine can produce its first output
        added = finished = False
        try:
            self.engine.add_request(request)
            added = True
            while not finished:
                output = await queue.get()
                if isinstance(output, BaseException):
                    raise RuntimeError("the engine stopped") from output
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request.request_id, None)
            if added and not finished:
                self.engine.abort(request.request_id)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping.is_set():
                if not engine.has_work():
                    engine.work_available.wait(timeout=0.5)
                    engine.work_available.clear()
                    continue
                for output in engine.step():
                    queue = self._queues.get(output.request_id)
                    if queue is not None:
                        self._loop.call_soon_threadsafe(queue.put_nowait, output)
        except BaseException as error:  # the loop is dead: every waiting consumer must learn it
            log.exception("the engine loop failed")
            self.error = error
            for queue in list(self._queues.values()):
                self._loop.call_soon_threadsafe(queue.put_nowait, error)


def build_engine(params: Params, *, model_name: str = "qoq-jax", mesh: Mesh | None = None, **options) -> Engine:
    """An `Engine` over `params` (split over `mesh`'s "tensor" axis when given) with `EngineConfig` options
    (max_num_seqs, max_model_len, page_size, num_pages, kv_memory_bytes per device, ...); warm-up compiles every
    bucket unless warmup=False."""
    return Engine(params, EngineConfig(**options), model_name=model_name, mesh=mesh)
