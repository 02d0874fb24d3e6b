"""What crosses the boundary between the HTTP layer and the engine: requests in, per-step outputs and stats out."""

from __future__ import annotations

import dataclasses

from qoq_jax.errors import InvalidRequestError, QoQError
from qoq_jax.logprobs import TokenLogprob
from qoq_jax.sampling import SamplingParams
from qoq_jax.validation import INT32_MAX, check_integer, check_integers, check_text


class OverloadedError(QoQError):
    """The waiting queue is full; the HTTP layer answers 503 and the client may retry."""


class RequestFailedError(QoQError):
    """The engine could not serve this request (its step failed on the device); others go on. HTTP: 500."""


class EngineDeadError(QoQError):
    """The engine stopped: its steps kept failing for every request. HTTP: 503, and /health fails."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, already tokenized. max_tokens ≥ 1; stop strings are cut from the text.

    Built only from values the engine's int32 arrays and the tokenizer can take (else `InvalidRequestError`); the
    engine checks what depends on the model (the vocabulary, the context) when the request is added."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {self.request_id!r}")
        check_text("request_id", self.request_id)
        prompt = check_integers("prompt_token_ids", self.prompt_token_ids, 0, INT32_MAX)
        if not prompt:
            raise InvalidRequestError("prompt_token_ids: the prompt is empty")
        check_integer("max_tokens", self.max_tokens, 1, INT32_MAX)
        if not isinstance(self.sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be SamplingParams, got {type(self.sampling).__name__}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for i, text in enumerate(stop):
            check_text(f"stop[{i}]", text)
        object.__setattr__(self, "prompt_token_ids", prompt)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", check_integers("stop_token_ids", self.stop_token_ids, 0, INT32_MAX))


@dataclasses.dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request: the new tokens and the text they add (text that could
    start a stop string is held back until it cannot), and, on the last output, why the request finished.

    Not frozen: the engine builds one per running sequence per step, and a frozen dataclass's `__init__` (a call
    of object.__setattr__ per field) costs five times as much (1.0 µs against 0.2). Treat it as read-only."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" once finished
    error: str | None = None  # why, when finish_reason is "error"
    new_logprobs: tuple[TokenLogprob, ...] = ()  # one per new token, when the request asked for logprobs
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # prompt tokens 1.. (asked for), on the first output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics: gauges of the moment and counters since start."""

    waiting_requests: int
    running_requests: int
    kv_pages_used: int
    kv_pages_free: int
    kv_pages_total: int
    prompt_tokens_total: int  # prompt tokens computed (prefix-cache hits excluded)
    generation_tokens_total: int
    prefix_cache_hit_tokens_total: int
    preemptions_total: int
    requests_failed_total: int  # ended by an error in their step, while the others went on
    engine_restarts_total: int  # steps whose failure lost the device state: every running request recomputed
    step_programs_compiling: int  # step shapes compiling in the background (their steps run in larger ones)
    steps_in_larger_program_total: int  # steps run in a covering program, their own not compiled yet
