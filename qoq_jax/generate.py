"""Batched generation: `complete` returns `Completion`s, `generate` the plain texts or token lists.

Each prompt gives n completions (best_of candidates, the n with the highest mean log-probability kept), with
the sampling of `SamplingParams` (penalties, min_tokens, logit bias) and, when asked, the log-probabilities of
the generated and the prompt tokens, computed on the device (`qoq_jax.logprobs`).

Shapes are bucketed (batch to a power of two, prompt block and cache length to powers of two within the
context), so a new prompt length or token count does not recompile. Decoding runs up to `decode_chunk` steps
per compiled call in a `lax.while_loop` that ends once every row has hit a stop token or its length, and the
host reads each chunk (and checks stop strings) while the device already runs the next.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tokenizers.decoders import DecodeStream

from qoq_jax.errors import InvalidRequestError, PromptTooLongError
from qoq_jax.logits_processors import TokenHistory
from qoq_jax.logprobs import TokenLogprob, host_logprobs, no_logprobs, prompt_logprobs
from qoq_jax.params import Params, shard_params
from qoq_jax.sampling import SampledTokens, SamplingBatch, SamplingParams, choice_seed, sample_next
from qoq_jax.steps import DecodeState, decode_step, last_positions, lm_head, prefill_hidden
from qoq_jax.validation import INT32_MAX, check_integer, check_integers, check_text, is_integer

Message = dict
Prompt = Union[str, Sequence[int], Sequence[Message]]

_MIN_PROMPT_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Completion:
    """One completion of a prompt. `text` is None for token-id prompts; finish_reason is "stop" or "length";
    `index` is which of the prompt's n completions it is. `logprobs` has one TokenLogprob per generated token
    and `prompt_logprobs` one per prompt token after the first (which has none), when asked for."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


def generate(params: Params, prompts: Sequence[Prompt], **kwargs) -> list[str] | list[list[int]]:
    """String (or chat) prompts give continuation strings; token-id prompts give lists of new token ids.

    Keywords are those of `complete`.
    """
    completions = complete(params, prompts, **kwargs)
    return [c.token_ids if c.text is None else c.text for c in completions]


def complete(
    params: Params,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    chat: bool = False,
    n: int = 1,
    best_of: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    min_tokens: int = 0,
    logit_bias: Mapping[int, float] | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    logprobs_mode: str = "raw",
    decode_chunk: int = 16,
    mesh: Mesh | None = None,
) -> list[Completion]:
    """Generates for a batch of prompts of any lengths; returns n completions per prompt, prompt after prompt.

    Greedy unless temperature > 0. `seed` is one int (prompt i uses seed + i) or one per prompt; a prompt's
    j-th completion samples with `choice_seed(seed, j)`. With `best_of` > n, best_of completions are sampled and
    the n of highest mean log-probability per token are returned, best first. Generation of a completion stops
    at the model's EOS (unless `ignore_eos`), at any of `stop_token_ids`, or when the text contains one of the
    `stop` strings (cut before it), none of which count before `min_tokens` tokens, and after
    `max_new_tokens` tokens otherwise (0: only the prompt is run, for its `prompt_logprobs`). The penalties,
    logit bias and log-probabilities are those of `SamplingParams`. With `chat=True` string prompts are user
    messages; lists of {"role", "content"} dicts always go through the chat template. With `mesh` the model
    runs split over its "tensor" axis (see `qoq_jax.make_mesh`).
    """
    if isinstance(prompts, str) or not len(prompts):
        raise InvalidRequestError("prompts must be a non-empty list of prompts")
    if isinstance(stop, str):
        stop = [stop]
    stop = [check_text(f"stop[{i}]", s) for i, s in enumerate(stop or []) if s]
    check_integer("max_new_tokens", max_new_tokens, 0, INT32_MAX)
    check_integer("decode_chunk", decode_chunk, 1, params.config.max_context)
    stop_token_ids = check_integers("stop_token_ids", stop_token_ids, 0, INT32_MAX)
    check_integer("n", n, 1, INT32_MAX)
    if best_of is not None:
        check_integer("best_of", best_of, n, INT32_MAX)
    check_integer("min_tokens", min_tokens, 0, max_new_tokens)
    params = shard_params(params, mesh)
    tokenizer = params.tokenizer
    if stop and tokenizer is None:
        raise InvalidRequestError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise InvalidRequestError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    candidates = best_of or n
    options = dict(
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        min_tokens=min_tokens,
        logit_bias=logit_bias or (),
        # best_of ranks by the generated tokens' log-probabilities: computed even when not returned
        logprobs=0 if logprobs is None and candidates > n else logprobs,
        prompt_logprobs=prompt_logprobs,
        logprobs_mode=logprobs_mode,
    )
    per_prompt = [SamplingParams(temperature, top_k, top_p, s, **options) for s in seeds]
    _check_token_ids(params, "logit_bias", [token for token, _ in per_prompt[0].logit_bias])
    sampling = [dataclasses.replace(p, seed=choice_seed(p.seed, j)) for p in per_prompt for j in range(candidates)]

    encoded = [encode_prompt(params, p, chat, name=f"prompts[{i}]") for i, p in enumerate(prompts)]
    for ids, _ in encoded:
        _check_prompt(params, ids, max_new_tokens)
    stop_ids = frozenset(stop_token_ids) | (frozenset() if ignore_eos else eos_ids(params))

    rows = [
        Continuation(
            list(ids), max_new_tokens=max_new_tokens, stop_ids=stop_ids, stop=stop, tokenizer=tokenizer,
            is_text=is_text, min_tokens=min_tokens,
        )
        for ids, is_text in encoded
        for _ in range(candidates)
    ]
    results = _run(params, rows, sampling, stop_ids, decode_chunk)
    completions = []
    for first in range(0, len(rows), candidates):
        chosen = list(range(first, first + candidates))
        if candidates > n:
            chosen = sorted(chosen, key=lambda i: -_mean_logprob(results[i].logprobs))[:n]
        for index, i in enumerate(chosen):
            row, result = rows[i], results[i]
            completion = row.completion()
            completions.append(
                dataclasses.replace(
                    completion,
                    index=index,
                    logprobs=None if logprobs is None else result.logprobs,
                    prompt_logprobs=result.prompt_logprobs,
                )
            )
    return completions


def _mean_logprob(logprobs: list[TokenLogprob]) -> float:
    """best_of's score: the mean log-probability per generated token (OpenAI's rule); 0 for none."""
    return sum(t.logprob for t in logprobs) / max(len(logprobs), 1)


def _check_token_ids(params: Params, name: str, ids: Sequence[int]) -> None:
    vocab = params.config.vocab_size
    outside = [t for t in ids if not 0 <= t < vocab]
    if outside:
        raise InvalidRequestError(f"{name}: token ids must be in [0, {vocab}), got {outside[0]}")


class Continuation:
    """One prompt's generated tokens under the stop rules (stop ids, stop strings, max_new_tokens); `generate` and
    the serving engine feed it tokens as they are sampled.

    Text is decoded incrementally: one `tokenizers` streaming decoder per sequence turns each token into the text
    it adds (holding back bytes of a character split over tokens), and stop strings are searched only in the new
    text plus the few characters before it that a stop string could start in, so each token costs O(1) however
    long the continuation. The token that completes a stop string is dropped and the text is cut before it."""

    def __init__(
        self,
        prompt: list[int],
        *,
        max_new_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
        stop: Sequence[str] = (),
        tokenizer=None,
        is_text: bool = True,
        min_tokens: int = 0,
    ):
        self.prompt = prompt
        self.is_text = is_text
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.stop = tuple(s for s in stop if s)
        self.min_tokens = min_tokens  # stop strings count only after this many tokens (stop ids: on the device)
        self.tokens: list[int] = []
        self.finish_reason: str | None = "length" if max_new_tokens == 0 else None
        self._tokenizer = tokenizer if (is_text or self.stop) else None
        self._stream = None if self._tokenizer is None else DecodeStream(skip_special_tokens=True)
        self._backend = None if self._tokenizer is None else self._tokenizer.backend_tokenizer
        self._pieces: list[str] = []
        self._window = max((len(s) for s in self.stop), default=1) - 1  # chars a stop string can reach back
        self._tail = ""  # the last `_window` characters of the text
        self._held = False  # the decoder holds tokens back (an incomplete character)
        self._cut = False  # the text ends where a stop string began

    def append(self, token: int) -> str:
        """Applies the stop rules to one sampled token; returns the text it adds (possibly "")."""
        if self.finish_reason is not None:
            return ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return ""
        self.tokens.append(token)
        piece = ""
        if self._stream is not None:
            piece = self._stream.step(self._backend, token) or ""
            self._held = not piece
            if piece and self.stop and self._cut_at_stop_string(piece):
                return ""  # finished: `text` holds the text cut before the stop string
            self._pieces.append(piece)
        if len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return piece

    def extend(self, tokens) -> None:
        for token in tokens:
            if self.finish_reason is not None:
                return
            self.append(int(token))

    def _cut_at_stop_string(self, piece: str) -> bool:
        window = self._tail + piece
        first = -1
        for stop in self.stop:
            at = window.find(stop)
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first < 0 or len(self.tokens) <= self.min_tokens:
            self._tail = window[-self._window :] if self._window else ""
            return False
        cut = first - len(self._tail)  # where the stop string starts, relative to this piece (may be < 0)
        if cut < 0:  # it began in text already appended: shorten that
            text = "".join(self._pieces)
            self._pieces = [text[: len(text) + cut]]
        else:
            self._pieces.append(piece[:cut])
        self.tokens.pop()  # the token that completed the stop string
        self.finish_reason = "stop"
        self._cut = True
        return True

    @property
    def text(self) -> str:
        """The text so far; once finished, with any character the decoder still held back."""
        text = "".join(self._pieces)
        if self._held and self.finish_reason is not None and not self._cut:
            text = self._tokenizer.decode(self.tokens, skip_special_tokens=True)  # once, at the end
        return text

    def completion(self) -> Completion:
        text = self.text if self.is_text else None
        return Completion(list(self.prompt), list(self.tokens), text, self.finish_reason or "length")


@dataclasses.dataclass
class _RowLogprobs:
    """What a row's SamplingParams asked for, collected as its tokens are kept."""

    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


def _run(params: Params, rows: list[Continuation], sampling, stop_ids, decode_chunk: int) -> list[_RowLogprobs]:
    """Prefills the padded batch, then decodes chunk by chunk until every row has finished."""
    config = params.config
    batch = _power_of_two(len(rows))
    longest = max(len(r.prompt) for r in rows)
    block = min(_power_of_two(max(longest, _MIN_PROMPT_BLOCK)), config.max_context)
    max_new = max(r.max_new_tokens for r in rows)
    cache_length = min(max(_power_of_two(longest + max_new), block), config.max_context)

    tokens = np.zeros((batch, block), np.int32)
    lengths = np.ones((batch,), np.int32)  # padding rows: one token, never read
    limits = np.zeros((batch,), np.int32)  # padding rows: done at once
    for i, row in enumerate(rows):
        tokens[i, : len(row.prompt)] = row.prompt
        lengths[i] = len(row.prompt)
        limits[i] = len(row.prompt) + row.max_new_tokens - 1
    padding = [SamplingParams()] * (batch - len(rows))
    stopping = _Stopping(
        sampling=SamplingBatch.stack(list(sampling) + padding),
        stop_ids=jnp.asarray(_padded(sorted(stop_ids)), jnp.int32),
        limits=jnp.asarray(limits),
        prompt_lengths=jnp.asarray(lengths),
    )
    results = [_RowLogprobs() for _ in rows]

    wants_prompt = np.asarray([p.prompt_logprobs is not None for p in sampling] + [False] * len(padding))
    state, history, first, done, prompt = _prefill_and_sample(
        params, tokens, lengths, stopping, wants_prompt, max_length=cache_length
    )
    if wants_prompt.any():
        prompt = jax.tree.map(np.asarray, prompt)
        for i, (row, p) in enumerate(zip(rows, sampling)):
            if p.prompt_logprobs is not None:
                given = jax.tree.map(lambda x: x[i, : len(row.prompt) - 1], prompt)
                results[i].prompt_logprobs = host_logprobs(row.prompt[1:], given, p.prompt_logprobs)
    if max_new == 0:
        return results
    last = first.tokens
    pending = jax.tree.map(lambda x: x[None], first)  # SampledTokens [steps, B] not yet read back
    pending_steps = 1
    steps_dispatched = 1
    any_logprobs = any(p.logprobs is not None for p in sampling)
    while True:
        chunk = None
        if steps_dispatched < max_new:  # dispatch the next chunk before reading this one
            state, history, last, done, chunk, chunk_steps = _decode_chunk(
                params, state, history, last, done, stopping, num_steps=decode_chunk
            )
            steps_dispatched += decode_chunk
        steps = int(pending_steps)
        host_tokens = np.asarray(pending.tokens)[:steps]
        host = jax.tree.map(lambda x: np.asarray(x)[:steps], pending.logprobs) if any_logprobs else None
        for i, row in enumerate(rows):
            before = len(row.tokens)
            row.extend(host_tokens[:, i])
            if sampling[i].logprobs is not None and len(row.tokens) > before:
                kept = slice(0, len(row.tokens) - before)  # extend keeps a prefix of the chunk's tokens
                column = jax.tree.map(lambda x: x[kept, i], host)
                results[i].logprobs += host_logprobs(row.tokens[before:], column, sampling[i].logprobs)
        if chunk is None or all(row.finish_reason is not None for row in rows):
            return results
        pending, pending_steps = chunk, chunk_steps


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Stopping:
    """Per-row sampling and the device's own stop rule (stop ids, last position), so a chunk ends early."""

    sampling: SamplingBatch
    stop_ids: jax.Array  # [S] int32, padded with -1
    limits: jax.Array  # [B] int32: a row is done once its cache holds this many tokens
    prompt_lengths: jax.Array  # [B] int32

    def is_done(self, tokens, lengths):
        return jnp.isin(tokens, self.stop_ids) | (lengths >= self.limits)

    def sample(self, logits, history: TokenHistory, positions):
        """The rows' next tokens, recorded in their history."""
        stop_ids = jnp.broadcast_to(self.stop_ids, (positions.shape[0], self.stop_ids.shape[0]))
        generated = positions - self.prompt_lengths
        sampled = sample_next(logits, self.sampling, history, positions, generated, stop_ids)
        rows = jnp.arange(positions.shape[0])
        history = history.record_sampled(rows, sampled.tokens)
        return sampled, history


@functools.partial(jax.jit, static_argnames=("max_length",))
def _prefill_and_sample(params, tokens, lengths, stopping: _Stopping, wants_prompt_logprobs, *, max_length):
    """The decode state, the token history, the first SampledTokens, the done flags, and the prompt
    log-probabilities (TokenLogprobs [B, T]: position t scores token t + 1) when a row asks for them."""
    state, hidden = prefill_hidden(params, tokens, lengths, max_length=max_length)
    batch, block = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(block), tokens.shape)
    history = TokenHistory.empty(batch, params.config.vocab_size)
    history = history.record(jnp.arange(batch), tokens, False, positions < lengths[:, None])
    first, history = stopping.sample(lm_head(params, last_positions(hidden, lengths)), history, state.lengths)
    done = stopping.is_done(first.tokens, state.lengths)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    prompt = jax.lax.cond(
        jnp.any(wants_prompt_logprobs),
        lambda: prompt_logprobs(params, hidden, targets),
        lambda: no_logprobs(tokens.shape, params.config.vocab_size),
    )
    return state, history, first, done, prompt


@functools.partial(jax.jit, static_argnames=("num_steps",), donate_argnames=("state", "history"))
def _decode_chunk(params, state: DecodeState, history: TokenHistory, tokens, done, stopping: _Stopping, *, num_steps):
    """Up to `num_steps` decode steps in one program, ending early once every row is done.

    Returns the state, the history, the last tokens, the done flags, the SampledTokens [num_steps, B] and how
    many steps ran.
    """

    def not_finished(carry):
        step, _, _, _, done, _ = carry
        return (step < num_steps) & ~jnp.all(done)

    def decode(carry):
        step, state, history, tokens, done, generated = carry
        state, logits = decode_step(params, state, tokens)
        sampled, history = stopping.sample(logits, history, state.lengths)
        done = done | stopping.is_done(sampled.tokens, state.lengths)
        generated = jax.tree.map(lambda all_steps, new: all_steps.at[step].set(new), generated, sampled)
        return step + 1, state, history, sampled.tokens, done, generated

    batch = tokens.shape[0]
    vocab = params.config.vocab_size
    generated = SampledTokens(jnp.zeros((num_steps, batch), jnp.int32), no_logprobs((num_steps, batch), vocab))
    steps, state, history, tokens, done, generated = jax.lax.while_loop(
        not_finished, decode, (jnp.int32(0), state, history, tokens, done, generated)
    )
    return state, history, tokens, done, generated, steps


def _padded(ids: list[int], multiple: int = 8) -> list[int]:
    """Pads to a non-zero multiple of `multiple` with -1 (never a token), so new stop lists rarely recompile."""
    size = max(multiple, -(-len(ids) // multiple) * multiple)
    return ids + [-1] * (size - len(ids))


def encode_prompt(params: Params, prompt: Prompt, chat: bool, *, name: str = "prompt") -> tuple[list[int], bool]:
    """Token ids of a prompt and whether its result is text; a prompt that cannot be encoded raises
    `InvalidRequestError` starting with `name`."""
    tokenizer = params.tokenizer
    is_messages = not isinstance(prompt, str) and len(prompt) and isinstance(prompt[0], dict)
    if isinstance(prompt, str) or is_messages:
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass prompts as lists of token ids")
        if isinstance(prompt, str):
            check_text(name, prompt)
        if chat or is_messages:
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidRequestError("the tokenizer has no chat template")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return _encode_chat(tokenizer, messages, name), True
        return list(tokenizer(prompt).input_ids), True
    vocab = params.config.vocab_size
    if not all(is_integer(t) for t in prompt):
        raise InvalidRequestError(f"{name}: token ids must be integers, got {list(prompt)[:8]!r}")
    ids = [int(t) for t in prompt]
    outside = [t for t in ids if not 0 <= t < vocab]
    if outside:
        raise InvalidRequestError(f"{name}: token ids must be in [0, {vocab}), got {outside[0]}")
    return ids, False


def _encode_chat(tokenizer, messages: list, name: str) -> list[int]:
    """The chat template's token ids; messages it refuses (an unknown role, roles that do not alternate, which
    templates raise on) are the caller's error, not ours."""
    from jinja2 import TemplateError

    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise InvalidRequestError(f"{name}[{i}] must be a dict with 'role' and 'content'")
        for key in ("role", "content"):
            check_text(f"{name}[{i}].{key}", message[key])
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:
        raise InvalidRequestError(f"{name}: the chat template refused the messages: {err}") from err
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _check_prompt(params: Params, ids: list[int], max_new_tokens: int) -> None:
    if not ids:
        raise InvalidRequestError("empty prompt")
    config = params.config
    if len(ids) + max_new_tokens > config.max_context:
        raise PromptTooLongError(
            f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{config.max_context} tokens ({config.context_limit_reason})"
        )


def eos_ids(params: Params) -> frozenset[int]:
    ids = set(params.config.eos_token_ids)
    tokenizer_eos = getattr(params.tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return frozenset(ids)


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
