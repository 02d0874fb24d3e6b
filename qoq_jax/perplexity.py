"""Perplexity in the reference's protocol (GPTQ-style, ../shared/spec/qoq-algorithm.md §5).

One tokenization of the whole text (one BOS at the start, as the tokenizer adds it), cut into ⌊n/L⌋
non-overlapping L-token chunks with the tail dropped; each chunk's loss is the mean cross-entropy of
logits[:-1] against ids[1:]; perplexity = exp(mean chunk loss). It runs `qoq_jax.forward`, so a quantized
model's attention reads K/V after their KV4/KV8 round trip and the number includes the cost of KV4.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qoq_jax.errors import PromptTooLongError
from qoq_jax.params import Params
from qoq_jax.steps import forward


@dataclasses.dataclass(frozen=True)
class Perplexity:
    perplexity: float
    seq_len: int
    num_chunks: int
    num_tokens: int  # tokens of the whole text, tail included


def perplexity(
    params: Params, text: str, *, seq_len: int = 512, batch_size: int = 4, progress: bool = False
) -> Perplexity:
    """Perplexity of `params` on `text` in non-overlapping `seq_len`-token chunks."""
    if params.tokenizer is None:
        raise ValueError("perplexity needs a model loaded with its tokenizer")
    if seq_len > params.config.max_context:
        raise PromptTooLongError(
            f"seq_len {seq_len} exceeds the model's context of {params.config.max_context} "
            f"({params.config.context_limit_reason})"
        )
    ids = np.asarray(params.tokenizer(text).input_ids, np.int32)
    num_chunks = len(ids) // seq_len
    if num_chunks == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one {seq_len}-token chunk")
    chunks = ids[: num_chunks * seq_len].reshape(num_chunks, seq_len)
    batch_size = min(batch_size, num_chunks)
    # The last batch is padded with repeats of the first chunk (losses dropped): one compiled shape.
    padded = np.concatenate([chunks, np.repeat(chunks[:1], -num_chunks % batch_size, axis=0)])
    losses = []
    for start in tqdm(range(0, num_chunks, batch_size), desc="perplexity", disable=not progress):
        losses.append(np.asarray(_chunk_losses(params, jnp.asarray(padded[start : start + batch_size]))))
    mean_loss = float(np.mean(np.concatenate(losses)[:num_chunks]))
    return Perplexity(math.exp(mean_loss), seq_len, num_chunks, len(ids))


@jax.jit
def _chunk_losses(params: Params, chunk_ids: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of each chunk [B, L] → [B]."""
    logits = forward(params, chunk_ids)[:, :-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, chunk_ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(picked, axis=-1)
