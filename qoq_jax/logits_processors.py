"""What changes a row's next-token logits before sampling, in vLLM's order: the logit bias, then min_tokens
(the row's stop tokens held at -inf until it has generated that many), then the repetition, frequency and
presence penalties over the tokens the row has seen.

The penalties need each row's token history. It is kept on the device as per-row counts, `TokenHistory`:
`output_counts` [B, V] (how often each token was generated) and `in_prompt` [B, V] (which tokens the prompt
holds), updated by a scatter of the step's new tokens. A step then costs O(B) to record and one elementwise pass
over [B, V] (the size of the logits it already reads) to apply, whatever the sequences' lengths, and it runs only
when some row of the batch has a penalty. The alternative, a [B, L] history of token ids rebuilt into counts each
step (vLLM's way), costs an O(B·L) scatter per step that grows with every generated token; the counts trade
that for B·V·5 bytes held (257 slots of Llama-3's 128k vocabulary: 165 MB, next to gigabytes of KV pages).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from qoq_jax.sampling import SamplingBatch

NO_TOKEN = 2**31 - 1
"""Pads per-row token-id lists: past every vocabulary, so scatters (mode="drop") ignore it."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenHistory:
    """Which tokens each row's sequence holds, for the penalties: rows of a batch, or an engine's slots."""

    output_counts: jax.Array  # [B, V] int32: how often each token was generated
    in_prompt: jax.Array  # [B, V] bool: which tokens the prompt holds

    @classmethod
    def empty(cls, rows: int, vocab: int) -> "TokenHistory":
        return cls(jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), bool))

    def restart(self, rows_b: jax.Array) -> "TokenHistory":
        """Rows `rows_b` begin new sequences (rows out of range: none)."""
        return TokenHistory(
            self.output_counts.at[rows_b].set(0, mode="drop"), self.in_prompt.at[rows_b].set(False, mode="drop")
        )

    def record(self, rows_b: jax.Array, tokens_bt: jax.Array, generated_bt, valid_bt) -> "TokenHistory":
        """Adds tokens [B, T] of rows `rows_b` where `valid_bt`: to the output counts where `generated_bt` (sampled,
        or recomputed after a preemption), else to the prompt."""
        rows = jnp.broadcast_to(rows_b[:, None], tokens_bt.shape)
        generated, valid = jnp.asarray(generated_bt, bool), jnp.asarray(valid_bt, bool)
        output = jnp.where(valid & generated, tokens_bt, NO_TOKEN)
        prompt = jnp.where(valid & ~generated, tokens_bt, NO_TOKEN)
        return TokenHistory(
            self.output_counts.at[rows, output].add(1, mode="drop"),
            self.in_prompt.at[rows, prompt].set(True, mode="drop"),
        )

    def record_sampled(self, rows_b: jax.Array, tokens_b: jax.Array) -> "TokenHistory":
        """Adds one sampled token per row (rows out of range: none). Leaves the prompt marks alone, so a decode
        step does not copy them ([B, V] bytes) for a scatter that would change nothing."""
        return TokenHistory(self.output_counts.at[rows_b, tokens_b].add(1, mode="drop"), self.in_prompt)


def process_logits(
    logits_bv: jax.Array,
    sampling: "SamplingBatch",
    history: TokenHistory,
    generated_b: jax.Array,
    stop_ids_bs: jax.Array,
    history_rows_b: jax.Array | None = None,
) -> jax.Array:
    """Logits [B, V] after the rows' logit bias, min_tokens (`generated_b` tokens generated so far, stop ids
    [B, S] padded with any id < 0 or >= V) and penalties over `history` (its rows `history_rows_b`, default the
    batch's own). Rows without any of them come back bit for bit."""
    batch, vocab = logits_bv.shape
    rows = jnp.arange(batch)[:, None]
    logits = logits_bv.at[rows, sampling.logit_bias_ids].add(sampling.logit_bias, mode="drop")
    held = _held_stop_ids(sampling, generated_b, stop_ids_bs, vocab)
    logits = logits.at[rows, jnp.where(held, stop_ids_bs, NO_TOKEN)].set(-jnp.inf, mode="drop")

    def penalise():
        rows_history = history if history_rows_b is None else jax.tree.map(lambda x: x[history_rows_b], history)
        return apply_penalties(logits, sampling, rows_history)

    return jax.lax.cond(jnp.any(_penalised(sampling)), penalise, lambda: logits)


def changes_logits(sampling: "SamplingBatch", generated_b: jax.Array, stop_ids_bs: jax.Array, vocab: int):
    """Whether `process_logits` would change any row's logits (a traced bool): callers skip it when not, as it
    copies the [B, V] logits."""
    biased = jnp.any((sampling.logit_bias_ids != NO_TOKEN) & (sampling.logit_bias != 0))
    return biased | jnp.any(_held_stop_ids(sampling, generated_b, stop_ids_bs, vocab)) | jnp.any(_penalised(sampling))


def _held_stop_ids(sampling: "SamplingBatch", generated_b, stop_ids_bs, vocab: int) -> jax.Array:
    """[B, S]: the stop ids held at -inf (min_tokens not yet generated)."""
    return (generated_b < sampling.min_tokens)[:, None] & (stop_ids_bs >= 0) & (stop_ids_bs < vocab)


def _penalised(sampling: "SamplingBatch") -> jax.Array:
    penalised = sampling.presence_penalty != 0
    return penalised | (sampling.frequency_penalty != 0) | (sampling.repetition_penalty != 1)


def apply_penalties(logits_bv: jax.Array, sampling: "SamplingBatch", history: TokenHistory) -> jax.Array:
    """vLLM's (and OpenAI's) formulas: a token seen in the prompt or the output has a positive logit divided by
    the repetition penalty and a negative one multiplied by it; then c·frequency + (c > 0)·presence is
    subtracted, c the token's count in the output. Unseen tokens keep their logits exactly."""
    counts = history.output_counts
    seen = history.in_prompt | (counts > 0)
    repetition = sampling.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits_bv > 0, logits_bv / repetition, logits_bv * repetition), logits_bv)
    logits = logits - sampling.frequency_penalty[:, None] * counts.astype(jnp.float32)
    return logits - sampling.presence_penalty[:, None] * (counts > 0).astype(jnp.float32)
