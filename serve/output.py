"""Output processing: each sampled token through the stop rules into the text it adds, streamed as deltas
(vLLM v1's output processor and incremental detokenizer).

A sequence's `Continuation` (shared with `qoq_jax.generate`) decodes incrementally and checks EOS, stop ids, stop
strings (on the new tail only) and max_tokens, so each token costs O(1). Text that could still turn out to be the
start of a stop string (its last len(longest stop) − 1 characters) is held back until it cannot; the token ids go
out at once, each with its TokenLogprob when the request asked for logprobs. The one output per request that
carries a finish reason has everything not yet sent. Prompt log-probabilities arrive chunk by chunk (again, for
the positions a preempted request recomputes: the first are kept) and go out once, with the first output.
"""

from __future__ import annotations

import dataclasses

import jax

from qoq_jax.generate import Continuation
from qoq_jax.logprobs import TokenLogprob, TokenLogprobs, host_logprobs
from serve.request import Request, RequestOutput


@dataclasses.dataclass(eq=False)
class OutputState:
    """What one request has generated and what of it was sent."""

    continuation: Continuation
    holdback: int  # characters kept back while unfinished
    num_prompt_tokens: int
    unsent: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # of the tokens kept, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # of prompt tokens 1.., when asked; None: not yet
    prompt_logprobs_sent: bool = False


class OutputProcessor:
    """Turns sampled tokens into `RequestOutput`s; one `OutputState` per request."""

    def __init__(self, tokenizer, eos_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def start(self, request: Request) -> OutputState:
        stop_ids = frozenset(request.stop_token_ids) | (frozenset() if request.ignore_eos else self.eos_ids)
        continuation = Continuation(
            list(request.prompt_token_ids),
            max_new_tokens=request.max_tokens,
            stop_ids=stop_ids,
            stop=request.stop,
            tokenizer=self.tokenizer,
            is_text=self.tokenizer is not None,
            min_tokens=request.sampling.min_tokens,
        )
        holdback = max((len(s) for s in request.stop), default=1) - 1
        state = OutputState(continuation, holdback, len(request.prompt_token_ids))
        if request.sampling.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * (len(request.prompt_token_ids) - 1)
        return state

    def add_prompt_logprobs(self, request: Request, state: OutputState, start: int, scored: TokenLogprobs) -> None:
        """Log-probabilities [T] of one chunk row from position `start` on (position p scores prompt token p + 1);
        positions past the prompt, or already scored, are skipped."""
        prompt, known = request.prompt_token_ids, state.prompt_logprobs
        positions = range(start, min(start + len(scored.logprobs), len(prompt) - 1))
        fresh = [p for p in positions if known[p] is None]
        if fresh:
            rows = [p - start for p in fresh]
            scored = jax.tree.map(lambda x: x[rows], scored)
            entries = host_logprobs([prompt[p + 1] for p in fresh], scored, request.sampling.prompt_logprobs)
            for p, entry in zip(fresh, entries):
                known[p] = entry

    def append(self, request: Request, state: OutputState, token: int, logprob: TokenLogprob | None = None):
        """The output one sampled token (with its TokenLogprob, when asked) makes; `finished` once the stop rules
        end the request. (Called for every running sequence at every step: kept to plain attribute work.)"""
        continuation = state.continuation
        kept = len(continuation.tokens)
        piece = continuation.append(token)
        if logprob is not None and len(continuation.tokens) > kept:
            state.logprobs.append(logprob)
        if continuation.finish_reason is not None:
            return self.finish(request, state, continuation.finish_reason)
        if state.holdback:
            state.unsent += piece
            ready = len(state.unsent) - state.holdback
            piece = ""
            if ready > 0:
                piece, state.unsent = state.unsent[:ready], state.unsent[ready:]
        state.sent_chars += len(piece)
        if logprob is None and state.prompt_logprobs is None:  # the common case, without `_output`'s slicing
            state.sent_tokens += 1
            return RequestOutput(request.request_id, (token,), piece, state.num_prompt_tokens, state.sent_tokens)
        return self._output(request, state, piece, None)

    def finish(self, request: Request, state: OutputState, reason: str, error: str | None = None) -> RequestOutput:
        """The last output: whatever was held back (cut before a stop string) and the finish reason."""
        text = ""
        if self.tokenizer is not None and reason in ("stop", "length"):
            text = state.continuation.text[state.sent_chars :]
        return self._output(request, state, text, reason, error)

    @staticmethod
    def _output(request, state, text, reason, error=None) -> RequestOutput:
        tokens = state.continuation.tokens
        new_tokens = tuple(tokens[state.sent_tokens :])
        new_logprobs = tuple(state.logprobs[state.sent_tokens : len(tokens)])
        prompt_logprobs = None
        if state.prompt_logprobs is not None and not state.prompt_logprobs_sent:
            prompt_logprobs, state.prompt_logprobs_sent = tuple(state.prompt_logprobs), True
        state.sent_tokens = len(tokens)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens,
            new_text=text,
            num_prompt_tokens=state.num_prompt_tokens,
            num_generated_tokens=len(tokens),
            finish_reason=reason,
            error=error,
            new_logprobs=new_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
