"""Per-sequence sampling: greedy, temperature, top-k, top-p, seeded; logit bias, min_tokens and the repetition,
frequency and presence penalties before it (`qoq_jax.logits_processors`); log-probabilities after it
(`qoq_jax.logprobs`).

Sampling parameters are arrays with one row per sequence, never static arguments, so requests with different
settings share one compiled step. Each row's randomness depends only on its seed and the token position, so a
request samples the same tokens whatever batch it runs in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qoq_jax.errors import InvalidSamplingError
from qoq_jax.logits_processors import NO_TOKEN, TokenHistory, changes_logits, process_logits
from qoq_jax.logprobs import MAX_LOGPROBS, TokenLogprobs, no_logprobs, token_logprobs
from qoq_jax.validation import FLOAT32_MAX, INT32_MAX, UINT32_MAX, check_float32, check_integer, is_real

LOGPROBS_MODES = ("raw", "processed")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Every value must fit the array it
    becomes (float32 temperature and top_p, int32 top_k, uint32 seed): a value that would overflow is refused, not
    wrapped or turned into infinity.

    The penalties follow OpenAI and vLLM: `presence_penalty` and `frequency_penalty` (in [-2, 2]) subtract from
    the logit of every token generated so far, once and once per occurrence; `repetition_penalty` (> 0, 1 is
    off; transformers' and vLLM's extension) divides the positive logits of every token in the prompt or the
    output and multiplies the negative ones. `min_tokens`: the stop tokens cannot be sampled before that many
    tokens were generated. `logit_bias` maps token ids to a bias in [-100, 100] added to their logits (a dict or
    (id, bias) pairs; kept as sorted pairs). `logprobs` / `prompt_logprobs`: return each generated / prompt
    token's log-probability and its `n` most likely alternatives (n in [0, 20]; None: none), from the model's
    own distribution (`logprobs_mode="raw"`, as OpenAI and vLLM report them) or from the one sampled from,
    after bias, penalties, temperature, top-k and top-p (`"processed"`, vLLM's processed_logprobs)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw"

    def __post_init__(self):
        check_float32("temperature", self.temperature, 0.0, InvalidSamplingError)
        check_integer("top_k", self.top_k, 0, INT32_MAX, InvalidSamplingError)
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_integer("seed", self.seed, 0, UINT32_MAX, InvalidSamplingError)
        self._check_logit_processing()

    def _check_logit_processing(self):
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_real(value) or not -2.0 <= value <= 2.0:  # NaN fails the comparison
                raise InvalidSamplingError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not is_real(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= FLOAT32_MAX:
            raise InvalidSamplingError(
                f"repetition_penalty must be a finite float32 > 0 (1 is off), got {self.repetition_penalty!r}"
            )
        check_integer("min_tokens", self.min_tokens, 0, INT32_MAX, InvalidSamplingError)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), 0, MAX_LOGPROBS, InvalidSamplingError)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise InvalidSamplingError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        try:
            pairs = sorted((token, bias) for token, bias in pairs)
        except (TypeError, ValueError):
            raise InvalidSamplingError("logit_bias must map token ids to numbers") from None
        for token, bias in pairs:
            check_integer("logit_bias token id", token, 0, NO_TOKEN - 1, InvalidSamplingError)
            if not is_real(bias) or not -100.0 <= bias <= 100.0:
                raise InvalidSamplingError(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}")
        if len({token for token, _ in pairs}) != len(pairs):
            raise InvalidSamplingError("logit_bias names a token id twice")
        object.__setattr__(self, "logit_bias", tuple((int(token), float(bias)) for token, bias in pairs))

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def choice_seed(seed: int, index: int) -> int:
    """The seed of a prompt's `index`-th sampled choice (n > 1, best_of): choice 0 keeps the prompt's seed, the
    others step through the uint32 seeds by the golden ratio, far from the neighbouring prompts' seed + i."""
    return (seed + index * 0x9E3779B9) % 2**32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """SamplingParams stacked per sequence: float32 / int32 / uint32 / bool arrays of shape [B], the logit bias
    as [B, K] token ids (padded with `NO_TOKEN`) and biases; `stack` makes host (numpy) arrays."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    min_tokens: jax.Array
    logit_bias_ids: jax.Array  # [B, K] int32
    logit_bias: jax.Array  # [B, K] float32
    wants_logprobs: jax.Array  # [B] bool: logprobs is not None
    processed_logprobs: jax.Array  # [B] bool: logprobs_mode == "processed"

    @classmethod
    def stack(cls, params: list[SamplingParams], logit_bias_width: int | None = None) -> "SamplingBatch":
        """`logit_bias_width` (K) is fixed by a caller that keeps one compiled shape (the engine); by default
        the longest bias rounded up to a power of two, at least 8, so new requests rarely change the shape."""
        longest = max((len(p.logit_bias) for p in params), default=0)
        width = max(8, 1 << max(longest - 1, 0).bit_length()) if logit_bias_width is None else logit_bias_width
        if longest > width:
            raise InvalidSamplingError(f"logit_bias has {longest} entries; at most {width} are supported")
        bias_ids = np.full((len(params), width), NO_TOKEN, np.int32)
        bias = np.zeros((len(params), width), np.float32)
        for row, p in enumerate(params):
            if p.logit_bias:
                bias_ids[row, : len(p.logit_bias)], bias[row, : len(p.logit_bias)] = zip(*p.logit_bias)

        def column(name, dtype):
            return np.asarray([getattr(p, name) for p in params], dtype)

        return cls(
            temperature=column("temperature", jnp.float32),
            top_k=column("top_k", jnp.int32),
            top_p=column("top_p", jnp.float32),
            seed=column("seed", jnp.uint32),
            presence_penalty=column("presence_penalty", jnp.float32),
            frequency_penalty=column("frequency_penalty", jnp.float32),
            repetition_penalty=column("repetition_penalty", jnp.float32),
            min_tokens=column("min_tokens", jnp.int32),
            logit_bias_ids=bias_ids,
            logit_bias=bias,
            wants_logprobs=np.asarray([p.logprobs is not None for p in params]),
            processed_logprobs=np.asarray([p.logprobs_mode == "processed" for p in params]),
        )


def sample(logits_bv: jax.Array, sampling: SamplingBatch, positions_b: jax.Array) -> jax.Array:
    """Next tokens [B] int32 from float32 logits [B, V]; `positions_b` is the position the token will take."""
    greedy = greedy_tokens(logits_bv)
    stochastic = sampling.temperature > 0
    drawn = jax.lax.cond(jnp.any(stochastic), lambda: _draw(logits_bv, sampling, positions_b), lambda: greedy)
    return jnp.where(stochastic, drawn, greedy)


def greedy_tokens(logits_bv: jax.Array) -> jax.Array:
    """`argmax` over the vocabulary (the first maximum), in two short passes: the maxima of blocks of logits,
    then the winning block. XLA's CPU argmax is a scalar loop (180 ms for 256 × 49152 logits on two cores,
    against 7 ms this way), and it is the sampler's most common call."""
    blocks = _blocks(logits_bv, -jnp.inf)
    best_block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    within = jnp.take_along_axis(blocks, best_block[:, None, None], axis=1)[:, 0]
    return (best_block * _BLOCK + jnp.argmax(within, axis=-1)).astype(jnp.int32)


_BLOCK = 128


def _blocks(x_bv: jax.Array, fill) -> jax.Array:
    """[B, V] → [B, ceil(V / 128), 128], padded with `fill`."""
    batch, vocab = x_bv.shape
    padded = -(-vocab // _BLOCK) * _BLOCK
    return jnp.pad(x_bv, ((0, 0), (0, padded - vocab)), constant_values=fill).reshape(batch, -1, _BLOCK)


def _draw(logits_bv, sampling: SamplingBatch, positions_b):
    """Temperature, then top-k and top-p when a row asks for them, then one draw per row by inverse CDF."""
    scaled = logits_bv / jnp.maximum(sampling.temperature, 1e-6)[:, None]
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(sampling.seed, positions_b)
    uniform = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys)
    return jax.lax.cond(  # the draw inside both branches: a cond handing [B, V] logits out copies them
        jnp.any(_filters(sampling)),
        lambda: _inverse_cdf(_top_k_top_p(scaled, sampling), uniform),
        lambda: _inverse_cdf(scaled, uniform),
    )


def _filters(sampling: SamplingBatch) -> jax.Array:
    return (sampling.top_k > 0) | (sampling.top_p < 1.0)


def _filtered(scaled, sampling: SamplingBatch):
    return jax.lax.cond(jnp.any(_filters(sampling)), lambda: _top_k_top_p(scaled, sampling), lambda: scaled)


def _top_k_top_p(scaled, sampling: SamplingBatch):
    """Logits outside each row's top-k, then outside its top-p of the renormalised top-k (transformers' order),
    set to -inf; the sort this takes is the sampler's costliest step, so rows without filters skip it."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    top_k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab)[None, :] < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & (mass_before < sampling.top_p[:, None])
    num_kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _inverse_cdf(logits_bv, uniform_b):
    """The first token whose cumulative softmax mass exceeds u · total, found block by block (a cumulative sum
    over the blocks' masses, then within the chosen block) so no pass runs over the whole vocabulary serially.
    Tokens of zero mass (filtered out) are never chosen."""
    probs = _blocks(jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True)), 0.0)
    block_mass = jnp.sum(probs, axis=-1)
    cumulative = jnp.cumsum(block_mass, axis=-1)
    target = uniform_b * cumulative[:, -1]
    last = probs.shape[1] - 1
    block = jnp.minimum(jnp.sum(cumulative <= target[:, None], axis=-1), last)
    within = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(cumulative - block_mass, block[:, None], axis=1)
    index = jnp.sum(before + jnp.cumsum(within, axis=-1) <= target[:, None], axis=-1)
    last_positive = jnp.max(jnp.where(within > 0, jnp.arange(_BLOCK), 0), axis=-1)  # float rounding at the end
    return (block * _BLOCK + jnp.minimum(index, last_positive)).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampledTokens:
    tokens: jax.Array  # [B] int32
    logprobs: TokenLogprobs  # [B]; zeros unless some row asked for logprobs


def sample_next(
    logits_bv: jax.Array,
    sampling: SamplingBatch,
    history: TokenHistory,
    positions_b: jax.Array,
    generated_b: jax.Array,
    stop_ids_bs: jax.Array,
    history_rows_b: jax.Array | None = None,
) -> SampledTokens:
    """The next token of each row from the model's float32 logits [B, V]: logit bias, min_tokens (`generated_b`
    tokens generated so far; the row's stop ids [B, S], padded with any id < 0 or >= V, held back until then)
    and penalties over `history` (its rows `history_rows_b`, default the batch's), then `sample`; and, when a row
    asks for them, the log-probabilities (`SamplingParams`).

    `positions_b` is the position each new token will take; the caller records kept tokens in the history."""

    def draw(processed):
        tokens = sample(processed, sampling, positions_b)

        def logprobs():
            processed_rows = sampling.wants_logprobs & sampling.processed_logprobs
            return jax.lax.cond(
                jnp.any(processed_rows),
                lambda: token_logprobs(
                    jnp.where(processed_rows[:, None], _sampled_distribution(processed, sampling), logits_bv), tokens
                ),
                lambda: token_logprobs(logits_bv, tokens),
            )

        empty = no_logprobs(tokens.shape, logits_bv.shape[-1])
        return SampledTokens(tokens, jax.lax.cond(jnp.any(sampling.wants_logprobs), logprobs, lambda: empty))

    # Each cond here holds the work that follows it: one that handed [B, V] logits out would copy them.
    return jax.lax.cond(
        changes_logits(sampling, generated_b, stop_ids_bs, logits_bv.shape[-1]),
        lambda: draw(process_logits(logits_bv, sampling, history, generated_b, stop_ids_bs, history_rows_b)),
        lambda: draw(logits_bv),
    )


def _sampled_distribution(processed_bv, sampling: SamplingBatch):
    """The logits a row's token is drawn from: after temperature, top-k and top-p where it samples, and as
    processed where it is greedy (vLLM's processed logprobs)."""
    stochastic = sampling.temperature > 0
    scaled = processed_bv / jnp.where(stochastic, sampling.temperature, 1.0)[:, None]
    return jnp.where(stochastic[:, None], _filtered(scaled, sampling), processed_bv)
