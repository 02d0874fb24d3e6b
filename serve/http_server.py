"""An OpenAI-compatible HTTP API over the engine: /v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics, /openapi.json.

    app = create_app(async_engine, model_name="smollm2-g128", api_key=None)
    run(app, host="127.0.0.1", port=8000)

The app starts and shuts down the engine in its lifespan. Requests are tokenized here (the engine takes token
ids); streamed answers are server-sent events in OpenAI's chunk shapes, ending with `data: [DONE]`. Errors use
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for bad requests (malformed JSON, wrong
types, invalid sampling values, prompts that do not fit the context), 401 for a missing or wrong API key, 404
for an unknown model, 503 when the engine's queue is full or the engine has stopped, 500 for a request the engine
could not serve (its step failed; the others go on), or an error event when that happens mid-stream. A client
that goes away, mid-stream or while waiting for a whole answer, has its request aborted and its KV pages freed.

Both endpoints take OpenAI's `n`, `presence_penalty`, `frequency_penalty`, `logit_bias` (token ids as strings)
and `seed`, and vLLM's extensions `repetition_penalty`, `min_tokens`, `top_k`, `stop_token_ids`, `ignore_eos`.
/v1/completions takes `logprobs` (0-20 alternatives per token), `echo` (the prompt before the completion, with its
log-probabilities when `logprobs` is set; with `max_tokens: 0` nothing is generated: lm-eval's loglikelihood
requests) and `best_of` (that many sampled, the `n` of highest mean log-probability per token returned; not with
`stream`); /v1/chat/completions takes `logprobs: true` and `top_logprobs` (0-20). Log-probabilities are the model's
own distribution (as OpenAI and vLLM report them), or with `logprobs_mode="processed"` the one sampled from.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import re
import secrets
import sys
import time
import uuid
from typing import Annotated, Any, AsyncIterator

import anyio
from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from qoq_jax.errors import InvalidRequestError, PromptTooLongError
from qoq_jax.generate import encode_prompt
from qoq_jax.logprobs import MAX_LOGPROBS, TokenLogprob
from qoq_jax.sampling import LOGPROBS_MODES, SamplingParams, choice_seed
from qoq_jax.validation import FLOAT32_MAX, INT32_MAX, UINT32_MAX, unicode_problem
from serve.request import EngineDeadError, OverloadedError, Request, RequestFailedError, RequestOutput

_THROUGHPUT_WINDOW_S = 10.0
_DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
_MAX_CHOICES = 128  # n and best_of: completions one request may ask for
_LOWEST_LOGPROB = -9999.0  # JSON has no -inf; vLLM's floor for a logprob in an answer


# ----------------------------------------------------------------------------------------------- request bodies
# Every number is bounded by the array it becomes (int32 token ids, top_k and max_tokens, uint32 seeds, finite
# float32 temperature and top_p) and every string must be valid Unicode, so nothing the engine cannot take gets
# past the body's validation (a 400 naming the field); the bounds are in the OpenAPI schema too.


def _valid_unicode(text: str) -> str:
    problem = unicode_problem(text)
    if problem:
        raise ValueError(problem)
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Float32 = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
Penalty = Annotated[float, Field(allow_inf_nan=False, ge=-2, le=2)]
Choices = Annotated[int, Field(ge=1, le=_MAX_CHOICES)]
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's API tolerates them."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: Float32 | None = Field(default=None, ge=0)  # None: 1.0, OpenAI's default
    top_p: Float32 | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)  # extension; -1 or 0 disable it
    seed: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None  # extension
    ignore_eos: bool | None = False  # extension
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Choices | None = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Float32 | None = Field(default=None, gt=0)  # extension; 1 is off
    min_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)  # extension
    logit_bias: dict[Text, Annotated[float, Field(allow_inf_nan=False, ge=-100, le=100)]] | None = None
    user: Text | None = None


class CompletionBody(_Body):
    prompt: Text | list[TokenId] | list[Text | list[TokenId]]
    max_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)  # 0: nothing generated (with echo: scoring)
    echo: bool | None = False
    logprobs: NumLogprobs | None = None
    best_of: Choices | None = None
    suffix: Text | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Text
    content: Text | list[_TextPart] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool | None = None
    top_logprobs: NumLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(_error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def _error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape; text echoed from a request that is not valid Unicode is escaped, so the answer
    can always be encoded."""
    return {"error": {"message": _printable(message), "type": type, "param": _printable(param), "code": code}}


def _printable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, type="invalid_request_error", param=param, code=code)


_BODY_FIELDS = frozenset(CompletionBody.model_fields) | frozenset(ChatBody.model_fields)


def _api_error(err: BaseException, prompt_field: str) -> APIError:
    """The HTTP answer to an exception from validation or the engine."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, OverloadedError):
        return APIError(
            503, str(err) or "the server is overloaded; retry later", type="server_error", code="overloaded"
        )
    if isinstance(err, EngineDeadError):
        return APIError(503, str(err), type="server_error", code="engine_dead")
    if isinstance(err, RequestFailedError):
        return APIError(500, str(err), type="server_error", code="request_failed")
    if isinstance(err, PromptTooLongError):
        return _bad_request(str(err), param=prompt_field, code="context_length_exceeded")
    if isinstance(err, InvalidRequestError):  # its message starts with the field's name, where it has one
        field = re.match(r"[a-z_]+", str(err))
        return _bad_request(str(err), param=field[0] if field and field[0] in _BODY_FIELDS else None)
    return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error")


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ---------------------------------------------------------------------------------------------------- metrics


class _Throughput:
    """Prompt and generation tokens/s over the last ~10 s, from samples of the engine's counters."""

    def __init__(self, window_s: float = _THROUGHPUT_WINDOW_S):
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def sample(self, stats) -> None:
        now = time.monotonic()
        self._samples.append((now, stats.prompt_tokens_total, stats.generation_tokens_total))
        # Keep the newest sample at least a window old as the baseline.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, p0, g0), (t1, p1, g1) = self._samples[0], self._samples[-1]
        seconds = t1 - t0
        if seconds <= 0:
            return 0.0, 0.0
        return (p1 - p0) / seconds, (g1 - g0) / seconds


class _EngineCollector:
    """Reads the engine's gauges and counters at each scrape."""

    def __init__(self, engine, throughput: _Throughput):
        self._engine, self._throughput = engine, throughput

    def collect(self):
        stats = self._engine.stats()
        self._throughput.sample(stats)
        prompt_rate, generation_rate = self._throughput.rates()
        gauges = [
            ("qoq_requests_waiting", "Requests waiting to be scheduled.", stats.waiting_requests),
            ("qoq_requests_running", "Requests being prefilled or decoded.", stats.running_requests),
            ("qoq_kv_pages_used", "KV cache pages in use.", stats.kv_pages_used),
            ("qoq_kv_pages_free", "KV cache pages free.", stats.kv_pages_free),
            ("qoq_kv_pages_total", "KV cache pages in the pool.", stats.kv_pages_total),
            ("qoq_step_programs_compiling", "Step shapes compiling in the background.", stats.step_programs_compiling),
            ("qoq_prompt_throughput_tokens_per_second", "Prompt tokens/s over the last 10 s.", prompt_rate),
            ("qoq_generation_throughput_tokens_per_second", "Generated tokens/s over the last 10 s.", generation_rate),
        ]
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)
        counters = [
            ("qoq_prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", stats.prompt_tokens_total),
            ("qoq_generation_tokens", "Tokens generated.", stats.generation_tokens_total),
            (
                "qoq_prefix_cache_hit_tokens",
                "Prompt tokens served from the prefix cache.",
                stats.prefix_cache_hit_tokens_total,
            ),
            ("qoq_preemptions", "Requests preempted to free KV pages.", stats.preemptions_total),
            ("qoq_requests_failed", "Requests ended by a failure of their step (the others went on).",
             stats.requests_failed_total),
            ("qoq_engine_restarts", "Failed steps that cost the device state: running requests recomputed.",
             stats.engine_restarts_total),
            ("qoq_steps_in_larger_program", "Steps run in a covering program while their own compiled.",
             stats.steps_in_larger_program_total),
        ]  # fmt: skip
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        attention = getattr(self._engine, "attention", None)
        if attention is not None:
            info = GaugeMetricFamily(
                "qoq_attention_implementation",
                "What runs each attention (1 for the one in use).",
                labels=["phase", "implementation"],
            )
            for phase in ("decode", "extend", "prefill"):
                info.add_metric([phase, getattr(attention, phase)], 1)
            yield info


class _Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=False)
        self.throughput = _Throughput()
        self.registry.register(_EngineCollector(engine, self.throughput))
        self.requests_finished = Counter(
            "qoq_requests_finished",
            "Requests finished, by reason (abort: the client went away; error: its step failed).",
            ["finish_reason"],
            registry=self.registry,
        )
        for reason in ("stop", "length", "abort", "error"):
            self.requests_finished.labels(reason)
        self.time_to_first_token = Histogram(
            "qoq_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80),
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "qoq_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first.",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5),
            registry=self.registry,
        )


# -------------------------------------------------------------------------------------------- running requests


class _Batch:
    """The engine requests of one HTTP request (one per prompt), each pumped by a task into one queue.

    `start` waits for every request's first output, so validation errors (which the engine raises before any
    output) surface before an answer is begun. `close` cancels whatever still runs, which aborts those requests
    in the engine and frees their pages.
    """

    def __init__(self, engine, requests: list[Request], metrics: _Metrics, arrived: float):
        self._engine, self._metrics, self._arrived = engine, metrics, arrived
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: collections.deque = collections.deque()
        self._first_token_at: list[float | None] = [None] * len(requests)
        self.finished = [False] * len(requests)
        self._tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(requests)]

    async def _pump(self, index: int, request: Request) -> None:
        stream = self._engine.generate(request)
        try:
            async for output in stream:
                self._observe(index, output)
                self._queue.put_nowait((index, output))
                if output.finished:
                    return
            self._queue.put_nowait((index, RuntimeError("the engine ended a request without a finish reason")))
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            if isinstance(err, RequestFailedError):  # the engine ended it: finished, with an error
                self.finished[index] = True
                self._metrics.requests_finished.labels("error").inc()
            self._queue.put_nowait((index, err))
        finally:
            await stream.aclose()

    def _observe(self, index: int, output: RequestOutput) -> None:
        now = time.monotonic()
        if output.new_token_ids and self._first_token_at[index] is None:
            self._first_token_at[index] = now
            self._metrics.time_to_first_token.observe(now - self._arrived)
        if output.finished:
            self.finished[index] = True
            self._metrics.requests_finished.labels(output.finish_reason).inc()
            first = self._first_token_at[index]
            if first is not None and output.num_generated_tokens > 1:
                self._metrics.time_per_output_token.observe((now - first) / (output.num_generated_tokens - 1))

    async def _get(self) -> tuple[int, RequestOutput]:
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return index, item

    async def start(self) -> None:
        waiting = set(range(len(self._tasks)))
        while waiting:
            index, output = await self._get()
            waiting.discard(index)
            self._buffer.append((index, output))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output, as (prompt index, output), until all have finished."""
        running = len(self._tasks)
        while running:
            index, output = self._buffer.popleft() if self._buffer else await self._get()
            running -= output.finished
            yield index, output

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for index, finished in enumerate(self.finished):
            if not finished:
                self.finished[index] = True
                self._metrics.requests_finished.labels("abort").inc()


async def _until_disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: HTTPRequest, awaitable):
    """Awaits `awaitable`, or cancels it and raises _ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
            raise _ClientGone()
    return task.result()


class _SSEResponse(StreamingResponse):
    """A stream whose body iterator is always closed, whether it ends, fails or the client goes away."""

    def __init__(self, content, **kwargs):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _sse(data: dict | str) -> str:
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


# ------------------------------------------------------------------------------------------------------ the app


class _Server:
    def __init__(self, engine, model_name: str, api_key: str | None, logprobs_mode: str):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.logprobs_mode = logprobs_mode
        self.created = int(time.time())
        self.metrics = _Metrics(engine)
        self._token_texts: dict[int, str] = {}

    # ---- validation shared by both endpoints

    def check_auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key (Authorization: Bearer KEY)",
                type="invalid_request_error",
                code="invalid_api_key",
            )

    def check_common(self, body: _Body) -> None:
        if body.model != self.model_name:
            raise APIError(
                404,
                f"the model `{body.model}` does not exist; this server serves `{self.model_name}`",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    def sampling(self, body: _Body, *, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        temperature = 1.0 if body.temperature is None else body.temperature
        top_k = 0 if body.top_k is None or body.top_k == -1 else body.top_k
        top_p = 1.0 if body.top_p is None else body.top_p
        seed = secrets.randbits(32) if body.seed is None else body.seed
        return SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            min_tokens=body.min_tokens or 0,
            logit_bias=self.logit_bias(body.logit_bias),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logprobs_mode=self.logprobs_mode,
        )

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        """OpenAI's {"token id": bias}, the ids checked against the vocabulary."""
        vocab = self.engine.params.config.vocab_size
        parsed = {}
        for key, value in (bias or {}).items():
            if not re.fullmatch(r"\d{1,10}", key.strip()) or int(key) >= vocab:
                raise _bad_request(f"logit_bias: keys must be token ids in [0, {vocab}), got {key!r}", "logit_bias")
            parsed[int(key)] = value
        return parsed

    def encode(self, prompt, *, chat: bool) -> list[int]:
        ids, _ = encode_prompt(self.engine.params, prompt, chat, name="messages" if chat else "prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    def requests(
        self, base_id: str, prompts: list[list[int]], body: _Body, max_tokens: int | None, sampling: SamplingParams,
        choices: int,
    ) -> list[Request]:
        """`choices` requests per prompt, prompt after prompt; choice j samples with `choice_seed(seed, j)`."""
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        limit = self.engine.max_model_len
        if max_tokens is not None and sampling.min_tokens > max_tokens:
            raise _bad_request(f"min_tokens ({sampling.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
        requests = []
        for i, ids in enumerate(prompts):
            tokens = max_tokens if max_tokens is not None else limit - len(ids)
            if len(ids) + max(tokens, 1) > limit:
                raise PromptTooLongError(
                    f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} tokens and "
                    f"{max(tokens, 1)} more were requested ({len(ids) + max(tokens, 1)} in all)"
                )
            for j in range(choices):
                suffix = "".join(f"-{k}" for k, many in ((i, len(prompts) > 1), (j, choices > 1)) if many)
                requests.append(
                    Request(
                        request_id=base_id + suffix,
                        prompt_token_ids=tuple(ids),
                        max_tokens=tokens,
                        sampling=dataclasses.replace(sampling, seed=choice_seed(sampling.seed, j)),
                        stop=tuple(s for s in stop if s),
                        stop_token_ids=tuple(body.stop_token_ids or ()),
                        ignore_eos=bool(body.ignore_eos),
                    )
                )
        return requests

    def token_text(self, token_id: int) -> str:
        """A token as logprobs show it: its own decoded text."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.engine.params.tokenizer.decode([token_id])
        return text

    def completion_logprobs(self, token_ids, entries, num_top: int, offset: int) -> dict:
        """The legacy completions shape for tokens and their TokenLogprob (None: the prompt's first token);
        `offset` is where the first token starts in the choice's text. As vLLM does, each position's top
        alternatives include the chosen token (lm-eval's is_greedy compares the two)."""
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self.token_text(token_id)
            tokens.append(text)
            text_offset.append(offset)
            offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_json_logprob(entry.logprob))
            top = {self.token_text(t): _json_logprob(v) for t, v in entry.top[:num_top]}
            top.setdefault(text, _json_logprob(entry.logprob))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}  # fmt: skip

    def chat_logprobs(self, entries: list[TokenLogprob], num_top: int) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": _json_logprob(logprob), "bytes": list(text.encode())}

        content = [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top[:num_top]]} for e in entries
        ]
        return {"content": content}

    async def start(self, http_request: HTTPRequest, requests: list[Request], arrived: float) -> _Batch:
        if not _engine_alive(self.engine):
            error = getattr(self.engine, "error", None)
            raise APIError(503, f"the engine is not running{f': {error!r}' if error else ''}", type="server_error")
        batch = _Batch(self.engine, requests, self.metrics, arrived)
        try:
            await _unless_disconnected(http_request, batch.start())
        except BaseException:
            await batch.close()
            raise
        return batch

    async def collect(self, http_request: HTTPRequest, batch: _Batch, count: int) -> list[_Choice]:
        """Every request's whole answer."""
        choices = [_Choice() for _ in range(count)]

        async def consume():
            async for index, output in batch.outputs():
                choices[index].add(output)

        try:
            await _unless_disconnected(http_request, consume())
        finally:
            await batch.close()
        return choices


@dataclasses.dataclass
class _Choice:
    """One request's outputs put together."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    num_generated: int = 0

    def add(self, output: RequestOutput) -> None:
        self.text += output.new_text
        self.token_ids += output.new_token_ids
        self.logprobs += output.new_logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = list(output.prompt_logprobs)
        if output.finished:
            self.finish_reason, self.num_generated = output.finish_reason, output.num_generated_tokens

    @property
    def mean_logprob(self) -> float:
        """best_of's score (OpenAI's rule: the highest log probability per token)."""
        return sum(e.logprob for e in self.logprobs) / max(len(self.logprobs), 1)


def _best(candidates: list[_Choice], n: int) -> list[_Choice]:
    return sorted(candidates, key=lambda c: -c.mean_logprob)[:n]


def _json_logprob(value: float) -> float:
    return max(float(value), _LOWEST_LOGPROB)


def create_app(engine, *, model_name: str, api_key: str | None = None, logprobs_mode: str = "raw") -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncEngine, or a ReplicatedEngine of several) as `model_name`; it
    starts and stops the engine. `logprobs_mode` is what logprobs report: "raw" (the model's distribution) or
    "processed" (the one sampled from)."""
    server = _Server(engine, model_name, api_key, logprobs_mode)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        sampler = asyncio.create_task(_sample_throughput(engine, server.metrics.throughput))
        try:
            yield
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            await engine.shutdown()

    # The OpenAPI schema (with every bound the bodies enforce) is served for clients and fuzzers; no docs UI.
    app = FastAPI(title="qoq-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: HTTPRequest, exc: RequestValidationError):
        messages, param, seen = [], None, set()
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                messages.append(f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
                continue
            location = [str(part) for part in error.get("loc", ()) if part != "body"]
            field = location[0] if location else ""
            if field in seen:  # a union reports one error per alternative: the first says enough
                continue
            seen.add(field)
            param = param or field or None
            if field:
                messages.append(f"{'.'.join(location)}: {error['msg']}")
            else:
                messages.append(f"the body must be a JSON object (Content-Type: application/json): {error['msg']}")
        message = "; ".join(messages) or "invalid request"
        return JSONResponse(_error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(_error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error_handler(request: HTTPRequest, exc: APIError):
        return exc.response()

    def authorized(request: HTTPRequest) -> None:
        server.check_auth(request)

    @app.get("/health")
    async def health():
        if _engine_alive(engine):
            return {"status": "ok"}
        return JSONResponse({"status": "engine not running"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [_model_card(model_name, server.created)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def model(name: str):
        if name != model_name:
            raise APIError(
                404, f"the model `{name}` does not exist", type="invalid_request_error", code="model_not_found"
            )
        return _model_card(model_name, server.created)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionBody, http_request: HTTPRequest):
        arrived = time.monotonic()
        try:
            return await _completions(server, body, http_request, arrived)
        except _ClientGone:
            return Response(status_code=499)
        except Exception as err:
            return _api_error(err, "prompt").response()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatBody, http_request: HTTPRequest):
        arrived = time.monotonic()
        try:
            return await _chat_completions(server, body, http_request, arrived)
        except _ClientGone:
            return Response(status_code=499)
        except Exception as err:
            return _api_error(err, "messages").response()

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "qoq-jax"}


def _engine_alive(engine) -> bool:
    return bool(getattr(engine, "alive", True))


async def _sample_throughput(engine, throughput: _Throughput) -> None:
    while True:
        with contextlib.suppress(Exception):
            throughput.sample(engine.stats())
        await asyncio.sleep(1.0)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ------------------------------------------------------------------------------------------------- completions


def _completion_prompts(server: _Server, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [server.encode(prompt, chat=False)]
    if not prompt:
        raise _bad_request("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [server.encode(prompt, chat=False)]
    return [server.encode(p, chat=False) for p in prompt]


async def _completions(server: _Server, body: CompletionBody, http_request: HTTPRequest, arrived: float):
    server.check_common(body)
    if body.suffix:
        raise _bad_request("suffix is not supported", param="suffix")
    n = body.n or 1
    best_of = body.best_of or n
    if best_of < n:
        raise _bad_request(f"best_of ({best_of}) must be >= n ({n})", param="best_of")
    if body.stream and best_of > n:
        raise _bad_request("best_of > n cannot be streamed: the best are known only at the end", param="best_of")
    prompts = _completion_prompts(server, body.prompt)
    max_tokens = _DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    echo, num_top = bool(body.echo), body.logprobs
    sampling = server.sampling(
        body,
        logprobs=0 if num_top is None and best_of > n else num_top,  # best_of ranks by them
        prompt_logprobs=num_top if echo else None,
    )
    response_id = f"cmpl-{uuid.uuid4().hex}"
    # max_tokens 0: one token is sampled (from the prefill's own logits, no extra step) and left out, as vLLM does
    requests = server.requests(response_id, prompts, body, max(max_tokens, 1), sampling, best_of)
    batch = await server.start(http_request, requests, arrived)
    created = int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)
    head = {"id": response_id, "object": "text_completion", "created": created, "model": server.model_name}
    prompt_texts = [_prompt_text(server, body.prompt, i, ids) for i, ids in enumerate(prompts)] if echo else None

    def answer(choice: _Choice, prompt: int) -> tuple[str, dict | None]:
        """The choice's text and logprobs, the prompt's in front with echo."""
        token_ids, entries = (choice.token_ids, choice.logprobs) if max_tokens else ([], [])
        text = choice.text if max_tokens else ""
        prefix = prompt_texts[prompt] if echo else ""
        logprobs = None
        if num_top is not None:
            ids = prompts[prompt]
            if echo:
                token_ids, entries = ids + token_ids, [None, *(choice.prompt_logprobs or [])] + entries
            logprobs = server.completion_logprobs(token_ids, entries, num_top, 0)
        return prefix + text, logprobs

    if not body.stream:
        collected = await server.collect(http_request, batch, len(requests))
        choices = []
        for prompt in range(len(prompts)):
            for j, choice in enumerate(_best(collected[prompt * best_of : (prompt + 1) * best_of], n)):
                text, logprobs = answer(choice, prompt)
                choices.append({"text": text, "index": prompt * n + j, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})  # fmt: skip
        generated = sum(c.num_generated for c in collected) if max_tokens else 0
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, generated)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        generated = 0
        started = [False] * len(requests)
        offsets = [0] * len(requests)  # where each choice's next token starts in its text
        try:
            async for index, output in batch.outputs():  # index = prompt * n + choice (best_of is n here)
                delta, token_ids, entries = "", [], []
                if echo and not started[index]:  # the first output carries the prompt's logprobs
                    delta, token_ids = prompt_texts[index // n], list(prompts[index // n])
                    entries = [None, *(output.prompt_logprobs or ())]
                started[index] = True
                if max_tokens:
                    delta += output.new_text
                    token_ids, entries = token_ids + list(output.new_token_ids), entries + list(output.new_logprobs)
                logprobs = None
                if num_top is not None and token_ids:
                    logprobs = server.completion_logprobs(token_ids, entries, num_top, offsets[index])
                    offsets[index] += sum(len(token) for token in logprobs["tokens"])
                if delta or logprobs:
                    choice = {"text": delta, "index": index, "logprobs": logprobs, "finish_reason": None}
                    yield _sse({**head, "choices": [choice], **_no_usage(include_usage)})
                if output.finished:
                    generated += output.num_generated_tokens if max_tokens else 0
                    choice = {"text": "", "index": index, "logprobs": None, "finish_reason": output.finish_reason}
                    yield _sse({**head, "choices": [choice], **_no_usage(include_usage)})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, generated)})
        except Exception as err:  # noqa: BLE001 - the answer has begun: report in the stream
            yield _stream_error(err)
        finally:
            await batch.close()
        yield _sse("[DONE]")

    return _SSEResponse(events())


def _prompt_text(server: _Server, prompt, index: int, ids: list[int]) -> str:
    """What echo puts before a completion: the prompt as given, or a token-id prompt decoded."""
    given = prompt if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt[index]
    return given if isinstance(given, str) else server.engine.params.tokenizer.decode(ids)


def _no_usage(include_usage: bool) -> dict:
    return {"usage": None} if include_usage else {}


def _stream_error(err: BaseException) -> str:
    error = _api_error(err, "prompt")
    print(f"qoq-jax serve: a stream failed: {error.message}", file=sys.stderr)
    return _sse(_error_body(error.message, error.type, error.param, error.code))


# ------------------------------------------------------------------------------------------------------- chat


def _chat_messages(body: ChatBody) -> list[dict]:
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise _bad_request(
                        f"messages[{i}]: only text content parts are supported, got {part.type!r}",
                        param=f"messages.{i}.content",
                    )
            content = "".join(part.text for part in content)
        messages.append({"role": message.role, "content": content or ""})
    return messages


async def _chat_completions(server: _Server, body: ChatBody, http_request: HTTPRequest, arrived: float):
    server.check_common(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise _bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    if body.tools:
        raise _bad_request("tools are not supported", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _bad_request("only the text response_format is supported", param="response_format")
    n = body.n or 1
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    prompt = server.encode(_chat_messages(body), chat=True)
    max_tokens = body.max_completion_tokens or body.max_tokens
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    sampling = server.sampling(body, logprobs=num_top, prompt_logprobs=None)
    requests = server.requests(response_id, [prompt], body, max_tokens, sampling, n)
    batch = await server.start(http_request, requests, arrived)
    created = int(time.time())
    head = {"id": response_id, "object": "chat.completion", "created": created, "model": server.model_name}

    def logprobs(entries: list[TokenLogprob]) -> dict | None:
        return None if num_top is None else server.chat_logprobs(entries, num_top)

    if not body.stream:
        collected = await server.collect(http_request, batch, n)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason,
            }
            for i, choice in enumerate(collected)
        ]
        return {**head, "choices": choices, "usage": _usage(len(prompt), sum(c.num_generated for c in collected))}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, finish_reason: str | None = None, entries=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": entries, "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice], **_no_usage(include_usage)})

    async def events():
        generated = 0
        try:
            for index in range(n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for index, output in batch.outputs():
                if output.new_text or (num_top is not None and output.new_token_ids):
                    yield chunk(index, {"content": output.new_text}, entries=logprobs(list(output.new_logprobs)))
                if output.finished:
                    generated += output.num_generated_tokens
                    yield chunk(index, {}, output.finish_reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(len(prompt), generated)})
        except Exception as err:  # noqa: BLE001
            yield _stream_error(err)
        finally:
            await batch.close()
        yield _sse("[DONE]")

    return _SSEResponse(events())


# ------------------------------------------------------------------------------------------------------- run


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serves `app` until Ctrl-C (or SIGTERM), printing the URL once the engine has started and the port is
    bound."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))

    async def serve() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
            shown = f"[{host}]" if ":" in host else host
            print(f"qoq-jax: serving on http://{shown}:{bound}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)
        await serving

    asyncio.run(serve())


__all__ = ["create_app", "run", "APIError", "CompletionBody", "ChatBody"]
