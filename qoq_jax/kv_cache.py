"""The KV cache interface the model talks to, and the simple dense cache behind it.

The model only calls `write` then `attend` once per layer, so a paged, quantized cache can replace
`DenseKVCache` without the model changing. Every cache is a pytree and is updated functionally: the step
functions donate it so XLA writes in place.

Positions are absolute token indices per sequence. A query at position p attends over the cached keys at
positions 0..p of its own sequence; padded tokens (valid=False) are never written.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from qoq_jax.config import ModelConfig
from qoq_jax.quant import fake_quantize_kv


class KVCache(abc.ABC):
    """init / write / attend: all a cache must provide."""

    @classmethod
    @abc.abstractmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int, dtype, *, kv_bits: int = 16) -> "KVCache":
        """An empty cache for `batch_size` sequences of up to `max_length` tokens, storing K/V at `kv_bits`."""

    @property
    @abc.abstractmethod
    def max_length(self) -> int:
        """Tokens each sequence can hold."""

    @abc.abstractmethod
    def write(self, layer: int, k_bthd, v_bthd, positions_bt, valid_bt) -> "KVCache":
        """Stores post-RoPE keys and values of new tokens at their positions; invalid tokens are dropped."""

    @abc.abstractmethod
    def attend(self, layer: int, q_bthd, positions_bt) -> jnp.ndarray:
        """Causal attention of new queries [B, T, Hq, D] over the cache, in the query dtype."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseKVCache(KVCache):
    """Per layer, keys and values as [batch, kv_heads, max_length, head_dim] arrays in the model dtype.

    Heads before positions, so attention's batched matmuls read the cache without transposing it. With
    kv_bits < 16 each token-head is stored after its quantization round trip, so attention sees exactly the
    values a KV4/KV8 cache holds (what evaluation must measure); the paged cache stores the codes themselves."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    kv_bits: int = dataclasses.field(default=16, metadata=dict(static=True))

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int, dtype, *, kv_bits: int = 16) -> "DenseKVCache":
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)

        def per_layer_zeros():
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))

        return cls(keys=per_layer_zeros(), values=per_layer_zeros(), kv_bits=kv_bits)

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def write(self, layer, k_bthd, v_bthd, positions_bt, valid_bt) -> "DenseKVCache":
        batch = jnp.arange(k_bthd.shape[0])[:, None]
        slots = jnp.where(valid_bt, positions_bt, self.max_length)  # out of range: dropped
        keys = list(self.keys)
        values = list(self.values)
        k_bthd, v_bthd = (fake_quantize_kv(x.astype(keys[layer].dtype), self.kv_bits) for x in (k_bthd, v_bthd))
        keys[layer] = keys[layer].at[batch, :, slots].set(k_bthd, mode="drop")
        values[layer] = values[layer].at[batch, :, slots].set(v_bthd, mode="drop")
        return dataclasses.replace(self, keys=tuple(keys), values=tuple(values))

    def attend(self, layer, q_bthd, positions_bt) -> jnp.ndarray:
        key_positions = jnp.arange(self.max_length)
        mask_bts = key_positions[None, None, :] <= positions_bt[:, :, None]
        return grouped_attention(q_bthd, self.keys[layer], self.values[layer], mask_bts)


def grouped_attention(q_bthd, k_bksd, v_bksd, mask_bts) -> jnp.ndarray:
    """GQA softmax attention; query head h reads KV head h // (Hq / Hkv)."""
    batch, length, num_heads, head_dim = q_bthd.shape
    num_kv_heads = k_bksd.shape[1]
    q = q_bthd.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    # Matmuls in the model dtype (as transformers does), softmax in float32.
    logits = jnp.einsum("btkgd,bksd->bkgts", q, k_bksd).astype(jnp.float32) * (1.0 / head_dim**0.5)
    logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bksd.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_bksd)
    return out.reshape(batch, length, num_heads, head_dim).astype(q_bthd.dtype)
