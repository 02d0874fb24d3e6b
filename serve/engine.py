"""The serving engine: continuous batching over the paged KV cache, composed of vLLM v1's four parts.

    add_request ─> Scheduler ──SchedulerOutput──> ModelRunner ──InFlightStep──> OutputProcessor ─> RequestOutputs
                   (host: budget, pages,          (device: pool, slots,         (stop rules, incremental
                    preemption, prefix cache)      one program per step)         detokenization, deltas)

`Engine.step()` plans step N+1, dispatches it, and only then reads step N's sampled tokens and turns them into
outputs, so the host's work for step N (outputs, detokenizing, streaming, planning N+2) runs while the device
computes N+1 (see `serve.scheduler` for what that means for stop rules and pages).

Failures stay with the request that caused them. A step that raises is dropped and undone, and its sequences
recomputed. When exactly one of them is new (in its first step), or the step held only one, that request ends
with an error (finish_reason "error"): inputs that fail, fail at once. When several are new, they become
suspects, each admitted later as the only new sequence of its step, so the guilty one fails alone. A failure with
no new request (one that shows only later in a request's decoding) counts against every request in the step, and
one in three such steps is ended.
A failure while the step ran on the device, or one that lost the device state, also restarts the device state:
a fresh pool, every running request recomputed (counted and logged). Four failed steps in a row, whoever was
blamed, mean the device is gone: the engine stops (`EngineDeadError`), which makes /health fail.

`AsyncEngine` runs the steps in a background thread and hands outputs to asyncio consumers, one wake-up of the
event loop per step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

import jax
from jax.sharding import Mesh

from qoq_jax.errors import InvalidRequestError, InvalidSamplingError, PromptTooLongError
from qoq_jax.generate import eos_ids
from qoq_jax.kv_cache import AttentionImplementations, attention_implementations, kv_bytes_per_page, pages_that_fit
from qoq_jax.params import Params, shard_params
from qoq_jax.logprobs import TokenLogprob, host_logprobs
from serve.kv_cache_manager import KVCacheManager
from serve.output import OutputProcessor
from serve.request import EngineDeadError, EngineStats, OverloadedError, Request, RequestFailedError, RequestOutput
from serve.runner import MAX_HELD_STOP_IDS, MAX_LOGIT_BIAS, WARMUP_MODES, InFlightStep, ModelRunner, RunnerOutput
from serve.scheduler import Scheduler, SchedulerOutput, Sequence

log = logging.getLogger(__name__)

_DEVICE_MEMORY_FRACTION = 0.9  # of the device's memory for weights + KV pages; the rest for activations
_CPU_KV_MEMORY_BYTES = 4 << 30  # the KV pool on a CPU without a budget (vLLM's CPU default KV space)
_MAX_DEFAULT_SEQS = 256  # QServe's and vLLM's large-batch operating point
_TYPICAL_SEQUENCE = 2048  # tokens a sequence is assumed to reach when sizing max_num_seqs from the pool
_DEFAULT_PROMPT_TOKENS_PER_STEP = 512
_MAX_CONSECUTIVE_FAILURES = 4  # steps failing in a row, whoever is blamed: the device is gone
_FAILURES_TO_BLAME = 3  # failed steps a request was in, none with a single new request to blame


@dataclasses.dataclass
class StepTimes:
    """Host seconds spent in each part of `step()` since the engine started: planning (inbox and scheduler),
    preparing and dispatching the device call, output processing, as wall time and as this thread's CPU time
    (on a CPU device the host's wall time stretches while the step computes on the same cores), and the wall
    time spent waiting for the previous step's tokens."""

    steps: int = 0
    schedule: float = 0.0
    prepare: float = 0.0
    outputs: float = 0.0
    schedule_cpu: float = 0.0
    prepare_cpu: float = 0.0
    outputs_cpu: float = 0.0
    wait: float = 0.0


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Capacity, budget and shapes; None means "size it from the KV memory budget" (see `build_engine`)."""

    max_num_seqs: int | None = None  # sequences decoded together; default from the pool, ≤ 256
    max_model_len: int | None = None  # prompt + generated tokens; default min(model context, 4096)
    page_size: int = 64
    num_pages: int | None = None  # default: kv_memory_bytes' worth, else what fits in device memory
    kv_memory_bytes: int | None = None  # KV pool bytes on each device
    max_num_batched_tokens: int | None = None  # decode + prompt tokens per step; default max_num_seqs + 512
    prefill_row_tokens: int | None = None  # tokens per prompt-chunk row (default page_size)
    max_prefill_rows: int | None = None  # chunk rows per step (default: the budget's worth)
    max_waiting: int = 4096
    prefix_caching: bool = True
    warmup: str | bool = "cover"  # "all" programs before serving, a "cover"ing set, or "none"
    compile_in_background: bool = True  # a step's own program, while a larger one runs it
    compile_threads: int | None = None  # warm-up compilations at once (default: half the host's cores)

    def __post_init__(self):
        for name in ("max_num_seqs", "page_size", "max_num_batched_tokens", "prefill_row_tokens",
                     "max_prefill_rows", "max_waiting", "num_pages", "max_model_len", "compile_threads"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1; got {value}")
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(f"warmup must be one of {WARMUP_MODES} (or a bool); got {self.warmup!r}")

    @property
    def warmup_mode(self) -> str:
        return {True: "all", False: "none"}.get(self.warmup, self.warmup)


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
        self.model_name = model_name
        self.tokenizer = params.tokenizer
        if self.tokenizer is not None and not hasattr(self.tokenizer, "backend_tokenizer"):
            raise ValueError("the engine detokenizes with the `tokenizers` library: it needs a fast tokenizer")
        model_config = params.config
        self.max_model_len = min(config.max_model_len or min(model_config.max_context, 4096), model_config.max_context)
        self.pages_per_seq = -(-self.max_model_len // config.page_size)
        self.config = config = _sized(config, self._num_pages(config), self.pages_per_seq)
        if config.num_pages < self.pages_per_seq:
            raise ValueError(
                f"the KV pool has {config.num_pages} pages of {config.page_size} tokens, fewer than one sequence of "
                f"max_model_len={self.max_model_len} needs ({self.pages_per_seq}); give it more memory or lower "
                "max_model_len"
            )
        scheduling = dict(
            max_num_seqs=config.max_num_seqs,
            max_prefill_rows=config.max_prefill_rows,
            prefill_row_tokens=config.prefill_row_tokens,
        )
        self.scheduler = Scheduler(
            KVCacheManager(config.num_pages, config.page_size),
            max_num_batched_tokens=config.max_num_batched_tokens,
            prefix_caching=config.prefix_caching,
            **scheduling,
        )
        self.runner = ModelRunner(
            params, num_pages=config.num_pages, page_size=config.page_size, pages_per_seq=self.pages_per_seq,
            compile_in_background=config.compile_in_background, **scheduling,
        )  # fmt: skip
        self.outputs = OutputProcessor(self.tokenizer, eos_ids(params))
        self.attention: AttentionImplementations = attention_implementations(
            model_config, page_size=config.page_size, dtype=params.dtype, kernel=params.kernel
        )
        self._in_flight: InFlightStep | None = None
        self._sequences: dict[str, Sequence] = {}
        self._added: collections.deque[tuple[Request, tuple[int, ...]]] = collections.deque()
        self._aborted: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._arrivals = itertools.count()
        self._failures_in_a_row = 0
        self.work_available = threading.Event()
        self._counters = collections.Counter()
        self._generated = 0  # tokens emitted (one per sampled token a live request kept)
        self._page_size = config.page_size
        self.step_times = StepTimes()
        self.warmup()

    def _num_pages(self, config: EngineConfig) -> int:
        """Pages per pool; with tensor parallelism every device holds each page's share of the KV heads, and
        the budget (kv_memory_bytes, device memory) is per device."""
        params = self.params
        if config.num_pages is not None:
            return config.num_pages
        parallel = params.parallel
        budget = {
            "page_size": config.page_size,
            "kv_bits": params.kv_bits,
            "dtype": params.dtype,
            "kv_shards": 1 if parallel is None else parallel.kv_shards,
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
        # A CPU: every seat at full length when the seats are given, else a fixed budget of host memory.
        if config.max_num_seqs is not None:
            return config.max_num_seqs * self.pages_per_seq
        pages = pages_that_fit(params.config, _CPU_KV_MEMORY_BYTES, 0, **budget)
        return min(pages, _MAX_DEFAULT_SEQS * self.pages_per_seq)

    def warmup(self) -> None:
        """Compiles the step programs the config's warm-up mode asks for (see `serve.runner`)."""
        threads = self.config.compile_threads or max(1, (os.cpu_count() or 2) // 2)
        self.runner.warmup(self.config.warmup_mode, threads)

    @property
    def kv_cache(self) -> KVCacheManager:
        return self.scheduler.kv_cache

    def describe(self) -> str:
        """The start-up line: capacity, budget and what runs attention."""
        config, params = self.config, self.params
        kv_shards = 1 if params.parallel is None else params.parallel.kv_shards
        page_bytes = kv_bytes_per_page(
            params.config, config.page_size, params.kv_bits, params.dtype, kv_shards=kv_shards
        )
        return (
            f"KV{params.kv_bits} pool of {config.num_pages} pages × {config.page_size} tokens "
            f"({config.num_pages * page_bytes / 2**30:.2f} GiB per device), max_num_seqs {config.max_num_seqs}, "
            f"{config.max_num_batched_tokens} tokens per step, max_model_len {self.max_model_len}; "
            f"attention {self.attention.describe()}"
        )

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
        held_stop_ids = self._check_sampling(request)
        with self._lock:
            if request.request_id in self._sequences or any(r.request_id == request.request_id for r, _ in self._added):
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            if len(self._sequences) + len(self._added) >= self.config.max_waiting + self.config.max_num_seqs:
                raise OverloadedError(f"{self.config.max_waiting} requests are already waiting; retry later")
            self._added.append((request, held_stop_ids))
        self.work_available.set()

    def _check_sampling(self, request: Request) -> tuple[int, ...]:
        """What the device batch cannot hold is refused (naming the field); returns the stop ids held back
        under min_tokens."""
        sampling, vocab = request.sampling, self.params.config.vocab_size
        bias_ids = [token for token, _ in sampling.logit_bias]
        if len(bias_ids) > MAX_LOGIT_BIAS or any(token >= vocab for token in bias_ids):
            raise InvalidSamplingError(
                f"logit_bias takes at most {MAX_LOGIT_BIAS} token ids in [0, {vocab}); got {len(bias_ids)}, "
                f"the largest {max(bias_ids)}"
            )
        if not sampling.min_tokens:
            return ()
        held = sorted(set(request.stop_token_ids) | (set() if request.ignore_eos else self.outputs.eos_ids))
        if len(held) > MAX_HELD_STOP_IDS:
            raise InvalidRequestError(
                f"stop_token_ids: with min_tokens at most {MAX_HELD_STOP_IDS} stop ids (EOS included); got {len(held)}"
            )
        return tuple(held)

    def abort(self, request_id: str) -> None:
        """Stops a request at the next step; its pages are freed and it ends with finish_reason "abort"."""
        self._aborted.append(request_id)
        self.work_available.set()

    def has_work(self) -> bool:
        return bool(self._added or self._aborted or self.scheduler.has_work() or self._in_flight is not None)

    def stats(self) -> EngineStats:
        kv_cache, scheduler = self.kv_cache, self.scheduler
        return EngineStats(
            waiting_requests=len(scheduler.waiting) + len(self._added),
            running_requests=len(scheduler.running),
            kv_pages_used=kv_cache.num_used_pages,
            kv_pages_free=kv_cache.num_free_pages,
            kv_pages_total=kv_cache.num_pages,
            prompt_tokens_total=self._counters["prompt_tokens"],
            generation_tokens_total=self._generated,
            prefix_cache_hit_tokens_total=scheduler.num_prefix_hit_tokens,
            preemptions_total=scheduler.num_preemptions,
            requests_failed_total=self._counters["requests_failed"],
            engine_restarts_total=self._counters["restarts"],
            step_programs_compiling=self.runner.num_compiling,
            steps_in_larger_program_total=self.runner.num_steps_in_larger_program,
        )

    # --- one iteration (the engine thread) ---------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Plans and dispatches the next step, then turns the previous step's tokens into outputs."""
        times, started, started_cpu = self.step_times, time.perf_counter(), time.thread_time()
        outputs = self._take_inbox()
        scheduled = self.scheduler.schedule()
        planned, planned_cpu = time.perf_counter(), time.thread_time()
        launched = refused = None
        if not scheduled.empty:
            try:
                launched = self.runner.dispatch(scheduled)
            except Exception as error:  # noqa: BLE001 - contained: see _recover, after the step before it
                refused = error
        dispatched = waited = time.perf_counter()
        dispatched_cpu = waited_cpu = time.thread_time()
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            try:
                result = previous.result()
            except Exception as error:  # noqa: BLE001 - the step failed while running
                dropped = [previous.scheduled] + ([launched.scheduled] if launched is not None else [])
                launched = None  # it ran on the failed step's outputs
                outputs += self._recover(dropped, error, ran=True)
            else:
                waited, waited_cpu = time.perf_counter(), time.thread_time()
                outputs += self._process(previous, result)
        if refused is not None:
            outputs += self._recover([scheduled], refused, ran=False)
        self._in_flight = launched
        ended, ended_cpu = time.perf_counter(), time.thread_time()
        times.steps += 1
        times.schedule += planned - started
        times.prepare += dispatched - planned
        times.wait += waited - dispatched
        times.outputs += ended - waited
        times.schedule_cpu += planned_cpu - started_cpu
        times.prepare_cpu += dispatched_cpu - planned_cpu
        times.outputs_cpu += ended_cpu - waited_cpu
        return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            while self._added:
                request, held_stop_ids = self._added.popleft()
                sampling = request.sampling
                seq = Sequence(
                    request=request,
                    order=next(self._arrivals),
                    max_num_tokens=len(request.prompt_token_ids) + request.max_tokens,
                    token_ids=list(request.prompt_token_ids),
                    held_stop_ids=held_stop_ids,
                    shares_prefix=not sampling.has_penalties and sampling.prompt_logprobs is None,
                )
                seq.state = self.outputs.start(request)
                self._sequences[request.request_id] = seq
                self.scheduler.add(seq)
        while self._aborted:
            seq = self._sequences.get(self._aborted.popleft())
            if seq is not None:
                outputs.append(self._end(seq, "abort"))
        return outputs

    def _process(self, step: InFlightStep, result: RunnerOutput) -> list[RequestOutput]:
        """Step N's sampled tokens through the stop rules; each row's failure stays with its request."""
        scheduled, outputs = step.scheduled, []
        decode_epochs = step.epochs[: len(scheduled.decode)]
        rows = zip(scheduled.decode, decode_epochs, scheduled.decode_positions, result.decode_token_ids.tolist())
        logprobs = result.decode_logprobs  # None unless a request of the step asked
        for row, (seq, epoch, position, token) in enumerate(rows):
            logprob = None if logprobs is None else _token_logprob(token, logprobs, row, seq)
            self._accept(seq, epoch, position + 1, token, outputs, logprob)
        chunk_tokens = result.chunk_token_ids.tolist()
        chunk_epochs = step.epochs[len(scheduled.decode) :]
        for chunk, epoch, rows in zip(scheduled.chunks, chunk_epochs, self.runner.chunk_rows(scheduled)):
            self._counters["prompt_tokens"] += chunk.num_tokens
            seq = chunk.seq
            if result.prompt_logprobs is not None and seq.request.sampling.prompt_logprobs is not None:
                for row, start in zip(rows, range(chunk.start, chunk.start + chunk.num_tokens, self.runner.row_tokens)):
                    scored = jax.tree.map(lambda x: x[row], result.prompt_logprobs)
                    self.outputs.add_prompt_logprobs(seq.request, seq.state, start, scored)
            token = logprob = None
            if chunk.samples:
                token = chunk_tokens[rows[-1]]
                logprob = _token_logprob(token, result.chunk_logprobs, rows[-1], seq)
            self._accept(seq, epoch, chunk.start + chunk.num_tokens, token, outputs, logprob)
        self._failures_in_a_row = 0
        return outputs

    def _accept(
        self, seq: Sequence, epoch: int, num_computed: int, token: int | None, outputs: list, logprob=None
    ) -> None:
        """One row's result (the hot path: once per running sequence per step): `token` sampled for seq at this
        step (None: a chunk that samples none), with its TokenLogprob when the request asked."""
        if seq.finished:
            return  # it stopped one step earlier: this row's token is past its end
        seq.proven = True
        try:
            if num_computed >= seq.cached_through + self._page_size:
                self.scheduler.cache_prefix(seq, epoch, num_computed)
            if token is None:
                return
            seq.num_pending -= 1
            seq.token_ids.append(token)
            self._generated += 1
            output = self.outputs.append(seq.request, seq.state, token, logprob)
        except Exception as error:  # noqa: BLE001 - one request's bad state must not stop the others
            log.exception("request %s failed while its output was processed", seq.request_id)
            outputs.append(self._end(seq, "error", f"{type(error).__name__}: {error}"))
            return
        if output.finish_reason is not None:
            self._release(seq)
        outputs.append(output)

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        self._release(seq)
        if reason == "error":
            self._counters["requests_failed"] += 1
        return self.outputs.finish(seq.request, seq.state, reason, error)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        with self._lock:
            self._sequences.pop(seq.request_id, None)

    # --- failures ----------------------------------------------------------------------------------------------

    def _recover(self, dropped: list[SchedulerOutput], error: Exception, *, ran: bool) -> list[RequestOutput]:
        """Undoes steps that failed (the first raised; any after it ran on its outputs) and decides who pays (see
        the module docstring)."""
        for scheduled in dropped:
            for seq in scheduled.decode:
                seq.num_pending -= 1
            for chunk in scheduled.chunks:
                chunk.seq.num_pending -= chunk.samples
        failed = [s for s in _sequences_of(dropped[0]) if not s.finished]
        new = [s for s in failed if not s.proven]
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= _MAX_CONSECUTIVE_FAILURES:
            raise EngineDeadError(f"{self._failures_in_a_row} steps in a row failed: {error!r}") from error
        if len(new) == 1 or len(failed) == 1:
            blamed = new or failed
        else:
            for seq in new or failed:
                seq.suspect = True
                seq.failures += 1
            blamed = [s for s in failed if s.failures >= _FAILURES_TO_BLAME]
        verdict = f"blaming {[s.request_id for s in blamed]}" if blamed else f"{len(new or failed)} suspects"
        log.warning("a step of %d requests failed (%r); %s", len(failed), error, verdict)
        message = f"the request's step failed on the device: {type(error).__name__}: {error}"
        outputs = [self._end(seq, "error", message) for seq in blamed]
        for scheduled in dropped:  # their planned tokens never happened: recompute them
            for seq in _sequences_of(scheduled):
                if seq.slot is not None:
                    self.scheduler.preempt(seq)
        if ran or self.runner.state_lost or not new:
            self._restart()
        return outputs

    def _restart(self) -> None:
        """A fresh pool and prefix cache; every running request is recomputed from its tokens."""
        scheduler = self.scheduler
        log.warning("restarting the engine's device state; %d running requests recompute", len(scheduler.running))
        self._counters["restarts"] += 1
        for seq in list(reversed(scheduler.running)):
            scheduler.preempt(seq)
        scheduler.kv_cache = KVCacheManager(self.config.num_pages, self.config.page_size)
        self.runner.reset()


def _sequences_of(scheduled: SchedulerOutput) -> list[Sequence]:
    return list(scheduled.decode) + [chunk.seq for chunk in scheduled.chunks]


def _token_logprob(token: int, logprobs, row: int, seq: Sequence) -> TokenLogprob | None:
    """A row's TokenLogprob when its request asked (`logprobs`: the step's rows', None when none asked)."""
    num_top = seq.request.sampling.logprobs
    if num_top is None or logprobs is None:
        return None
    [entry] = host_logprobs([token], jax.tree.map(lambda x: x[row : row + 1], logprobs), num_top)
    return entry


def _sized(config: EngineConfig, num_pages: int, pages_per_seq: int) -> EngineConfig:
    """Fills the defaults from the pool, as vLLM sizes its batch: as many sequences of a typical length (up to
    2048 tokens) as the pages hold, a power of two up to 256 (256 for an 8B W4A8KV4 model on an 80–141 GB GPU);
    a token budget of every decode plus 512 prompt tokens; chunk rows of one page."""
    page_size = config.page_size
    typical_pages = min(pages_per_seq, -(-_TYPICAL_SEQUENCE // page_size))
    seats = max(1, min(_MAX_DEFAULT_SEQS, num_pages // typical_pages))
    max_num_seqs = config.max_num_seqs or 1 << (seats.bit_length() - 1)
    budget = config.max_num_batched_tokens or max_num_seqs + _DEFAULT_PROMPT_TOKENS_PER_STEP
    row_tokens = min(config.prefill_row_tokens or page_size, pages_per_seq * page_size)
    rows = config.max_prefill_rows or -(-min(budget, _DEFAULT_PROMPT_TOKENS_PER_STEP) // row_tokens)
    return dataclasses.replace(
        config,
        num_pages=num_pages,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        prefill_row_tokens=row_tokens,
        max_prefill_rows=rows,
    )


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

    @property
    def attention(self) -> AttentionImplementations:
        return self.engine.attention

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
        """The request's outputs until it finishes. Invalid requests raise before the first output, a request
        the engine failed raises `RequestFailedError`; a consumer that stops early (a client gone) aborts the
        request, which frees its pages."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running{f': {self.error!r}' if self.error else ''}")
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
                    raise EngineDeadError("the engine stopped") from output
                finished = output.finished
                if output.finish_reason == "error":
                    raise RequestFailedError(output.error or "the engine could not serve this request")
                yield output
        finally:
            self._queues.pop(request.request_id, None)
            if added and not finished:
                self.engine.abort(request.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping.is_set():
                if not engine.has_work():
                    engine.work_available.wait(timeout=0.5)
                    engine.work_available.clear()
                    continue
                outputs = engine.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as error:  # the loop is dead: /health fails and every waiting consumer learns it
            log.exception("the engine loop failed")
            self.error = error
            for queue in list(self._queues.values()):
                self._loop.call_soon_threadsafe(queue.put_nowait, error)


def build_engine(params: Params, *, model_name: str = "qoq-jax", mesh: Mesh | None = None, **options) -> Engine:
    """An `Engine` over `params` (split over `mesh`'s "tensor" axis when given) with `EngineConfig` options:
    max_num_seqs (default: as many sequences of up to 2048 tokens as the KV pool holds, a power of two ≤ 256),
    max_num_batched_tokens (default max_num_seqs + 512), max_model_len, page_size, num_pages or kv_memory_bytes
    per device (default: 90% of the device's memory beside the weights; 4 GiB on a CPU), warmup ("cover" by
    default: a covering set of step programs before serving, the rest compiled in the background as needed)."""
    return Engine(params, EngineConfig(**options), model_name=model_name, mesh=mesh)
