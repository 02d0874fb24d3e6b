"""Log-probabilities of chosen tokens and their most likely alternatives, computed on the device.

`token_logprobs` reduces logits [..., V] to the chosen token's log-probability and the top `MAX_LOGPROBS`
(id, log-probability) pairs, so only those leave the device; a request's own N ≤ 20 is sliced on the host.
`prompt_logprobs` does the same for every prompt position from the final hidden states, running the LM head
over blocks of positions so [B, T, V] logits never exist at once (lm-eval's loglikelihood requests are prompts
of thousands of tokens).

Which distribution: by default the model's own, log_softmax of its logits (`logprobs_mode="raw"`), which is
what OpenAI's API and vLLM (its default raw_logprobs) report: independent of temperature, penalties and bias,
so scores are comparable across sampling settings. "processed" gives vLLM's processed_logprobs: the
distribution the token was drawn from, after bias, min_tokens, penalties, temperature, top-k and top-p (tokens
filtered out have -inf; the host drops them from the alternatives).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qoq_jax.params import Params
from qoq_jax.steps import lm_head

MAX_LOGPROBS = 20
"""The most alternatives a request may ask for (OpenAI's top_logprobs limit, vLLM's default max_logprobs)."""

_PROMPT_BLOCK_TOKENS = 128  # positions per LM-head call in `prompt_logprobs`: [128, V] float32 logits at a time


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenLogprobs:
    """Device arrays over any leading shape [...]."""

    logprobs: jax.Array  # [...] float32: the chosen token's
    top_ids: jax.Array  # [..., K] int32: the K = min(MAX_LOGPROBS, V) most likely tokens, most likely first
    top_logprobs: jax.Array  # [..., K] float32


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> TokenLogprobs:
    """log_softmax of float32 logits [..., V] at `tokens` [...], and its top K."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, _top_count(logits.shape[-1]))
    return TokenLogprobs(chosen, top_ids.astype(jnp.int32), top_logprobs)


def no_logprobs(shape: tuple[int, ...], vocab: int) -> TokenLogprobs:
    """The zeros `token_logprobs` would fill, for a branch where no row asked for any."""
    k = _top_count(vocab)
    return TokenLogprobs(
        jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, k), jnp.int32), jnp.zeros((*shape, k), jnp.float32)
    )


def _top_count(vocab: int) -> int:
    return min(MAX_LOGPROBS, vocab)


def prompt_logprobs(params: Params, hidden_btd: jax.Array, targets_bt: jax.Array) -> TokenLogprobs:
    """TokenLogprobs [B, T] of `targets_bt[b, t]` (the token after position t) from the final hidden states
    [B, T, D] (`prefill_hidden`), the LM head run over `_PROMPT_BLOCK_TOKENS` positions at a time."""
    batch, length, dim = hidden_btd.shape
    total = batch * length
    blocks = math.ceil(total / _PROMPT_BLOCK_TOKENS)
    pad = blocks * _PROMPT_BLOCK_TOKENS - total
    hidden = jnp.pad(hidden_btd.reshape(total, dim), ((0, pad), (0, 0))).reshape(blocks, -1, dim)
    targets = jnp.pad(targets_bt.reshape(total), (0, pad)).reshape(blocks, -1)
    out = jax.lax.map(lambda block: token_logprobs(lm_head(params, block[0]), block[1]), (hidden, targets))

    def unblock(x):  # [blocks, block tokens, ...] -> [B, T, ...]
        return x.reshape(-1, *x.shape[2:])[:total].reshape(batch, length, *x.shape[2:])

    return jax.tree.map(unblock, out)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position, most likely first (up to
    the number asked for; tokens of probability 0 under "processed" logprobs are left out)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def host_logprobs(token_ids, logprobs: TokenLogprobs, num_top: int) -> list[TokenLogprob]:
    """TokenLogprob per token of `token_ids` [N] from a host copy (numpy arrays) of their TokenLogprobs [N]."""
    out = []
    rows = zip(token_ids, logprobs.logprobs, logprobs.top_ids, logprobs.top_logprobs)
    for token, logprob, ids, values in rows:
        top = tuple((int(i), float(v)) for i, v in zip(ids[:num_top], values[:num_top]) if np.isfinite(v))
        out.append(TokenLogprob(int(token), float(logprob), top))
    return out
