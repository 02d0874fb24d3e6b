"""The KV cache the model attends through: paged pools of KV4 / KV8 / KV16 pages, and its memory budget.

The model calls `cache.attend(layer, q, k, v, positions, valid)` once per layer with post-RoPE queries, keys and
values (SmoothAttention is folded into the q/k weights), so how K/V are stored and read is the cache's business:

* `PagedKVCache` (prefill, decode, generation): per layer a K and a V `KVPool` of pages in the layout of
  `pallas_kernels.paged_attention`, shared by all sequences through block tables. Every token is quantized
  per KV head on write. A prompt attends over its own unquantized q/k/v (as QServe does); a decode step
  attends over the pages with the Pallas decode kernel on GPU and its jnp reference elsewhere.
* `NoKVCache` (`forward`, calibration): attention within the chunk, storing nothing.

Caches are pytrees updated functionally; the step functions donate them so XLA writes the pages in place.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import paged_attention
from qoq_jax.config import ModelConfig
from qoq_jax.quant import fake_quantize_kv, quantize_kv, use_pallas

DEFAULT_PAGE_SIZE = 64
_SCALE_ZERO_BYTES = 4  # fp16 scale + fp16 zero per token per KV head

KVBits = int | Sequence[int]
"""Bits of every layer's K and V pages, or one entry per layer (mixed precision: `QuantFormat.layer_kv_bits`)."""
KVClip = Sequence[tuple[float, float]] | None
"""Per layer (K, V) clip ratios of the quantized range (`QuantFormat.kv_clip`); None keeps the full range."""


def layer_kv_settings(num_layers: int, kv_bits: KVBits, kv_clip: KVClip = None) -> tuple[tuple, tuple]:
    """(bits per layer, (K clip, V clip) per layer) from a uniform or per-layer description, checked."""
    bits = (kv_bits,) * num_layers if isinstance(kv_bits, int) else tuple(kv_bits)
    clip = ((1.0, 1.0),) * num_layers if kv_clip is None else tuple(tuple(pair) for pair in kv_clip)
    if len(bits) != num_layers or len(clip) != num_layers:
        raise ValueError(f"per-layer KV settings need {num_layers} entries; got {len(bits)} bits, {len(clip)} clips")
    return bits, clip


class KVCache(abc.ABC):
    @abc.abstractmethod
    def attend(self, layer: int, q_bthd, k_bthd, v_bthd, positions_bt, valid_bt) -> tuple[jax.Array, "KVCache"]:
        """Stores the new tokens' keys and values (invalid ones are dropped) and returns the causal attention
        of the new queries [B, T, Hq, D], in q's dtype, with the updated cache."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NoKVCache(KVCache):
    """Attention within one chunk of right-padded tokens starting at position 0; nothing is kept.

    With kv_bits < 16 the chunk's K/V pass through their quantization round trip first, so `forward` (and
    perplexity) measure what KV4/KV8 attention sees, the protocol of the QoQ paper's accuracy numbers."""

    kv_bits: int | tuple[int, ...] = dataclasses.field(default=16, metadata=dict(static=True))
    kv_clip: tuple[tuple[float, float], ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    def attend(self, layer, q_bthd, k_bthd, v_bthd, positions_bt, valid_bt):
        bits = self.kv_bits if isinstance(self.kv_bits, int) else self.kv_bits[layer]
        k_clip, v_clip = (1.0, 1.0) if self.kv_clip is None else self.kv_clip[layer]
        k_bthd, v_bthd = fake_quantize_kv(k_bthd, bits, k_clip), fake_quantize_kv(v_bthd, bits, v_clip)
        return prompt_attention(q_bthd, k_bthd, v_bthd, jnp.sum(valid_bt, axis=1, dtype=jnp.int32)), self


def prompt_attention(q_bthd, k_bthd, v_bthd, lengths_b) -> jax.Array:
    """Causal GQA attention of right-padded prompts starting at position 0 (rows past a length give zeros).

    cuDNN flash attention on GPU for fp16/bf16; plain XLA otherwise and wherever cuDNN refuses the shapes
    (jax's own XLA path asks for fp16 dot algorithms the CPU lacks)."""
    if jax.default_backend() == "gpu" and q_bthd.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(
                q_bthd,
                k_bthd,
                v_bthd,
                is_causal=True,
                query_seq_lengths=lengths_b,
                key_value_seq_lengths=lengths_b,
                implementation="cudnn",
            )
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    positions = jnp.arange(q_bthd.shape[1])
    causal = positions[None, :] <= positions[:, None]
    valid_query = positions[None, :] < lengths_b[:, None]
    return grouped_attention(q_bthd, k_bthd, v_bthd, causal[None] & valid_query[:, :, None])


def grouped_attention(q_bthd, k_bshd, v_bshd, mask_bts) -> jax.Array:
    """GQA softmax attention (query head h reads KV head h // (Hq / Hkv)); fully masked rows give zeros."""
    batch, length, num_heads, head_dim = q_bthd.shape
    num_kv_heads = k_bshd.shape[2]
    q = q_bthd.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    # Matmuls in the model dtype (as transformers does), softmax in float32.
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k_bshd).astype(jnp.float32) * (1.0 / head_dim**0.5)
    mask = mask_bts[:, None, None]
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_bshd.dtype), v_bshd)
    return out.reshape(batch, length, num_heads, head_dim).astype(q_bthd.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVPool:
    """One layer's keys or values for every page: codes [Hkv, pages, page_size, D/2 (KV4) or D] (uint8, or the
    model dtype at 16 bits) and, below 16 bits, fp16 scale and zero [Hkv, pages, page_size]. Writes keep
    `clip` of each token-head's range (`quantize_kv`)."""

    codes: jax.Array
    scale: jax.Array | None
    zero: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    clip: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    @classmethod
    def zeros(
        cls, num_kv_heads: int, num_pages: int, page_size: int, head_dim: int, *, bits: int, dtype, clip: float = 1.0
    ):
        if bits not in paged_attention.KV_BITS:
            raise ValueError(f"kv_bits must be one of {paged_attention.KV_BITS}; got {bits}")
        shape = (num_kv_heads, num_pages, page_size)
        codes = jnp.zeros((*shape, paged_attention.code_width(head_dim, bits)), jnp.uint8 if bits < 16 else dtype)
        if bits == 16:
            return cls(codes, None, None, bits, clip)
        return cls(codes, jnp.zeros(shape, jnp.float16), jnp.zeros(shape, jnp.float16), bits, clip)

    @property
    def num_pages(self) -> int:
        return self.codes.shape[1]

    def write(self, pages_bt, slots_bt, x_bthd) -> "KVPool":
        """Quantizes x [B, T, Hkv, D] per token-head into (page, slot) [B, T]; out-of-range pages are dropped."""
        x_hbtd = jnp.moveaxis(x_bthd, 2, 0)
        if self.bits == 16:
            codes = self.codes.at[:, pages_bt, slots_bt].set(x_hbtd.astype(self.codes.dtype), mode="drop")
            return dataclasses.replace(self, codes=codes)
        codes, scale, zero = quantize_kv(x_hbtd, self.bits, self.clip)
        if self.bits == 4:
            codes = paged_attention.pack_kv_codes(codes)
        return dataclasses.replace(
            self,
            codes=self.codes.at[:, pages_bt, slots_bt].set(codes, mode="drop"),
            scale=self.scale.at[:, pages_bt, slots_bt].set(scale, mode="drop"),
            zero=self.zero.at[:, pages_bt, slots_bt].set(zero, mode="drop"),
        )

    def read(self, block_tables) -> jax.Array:
        """The values the pages of each row hold, dequantized: float32 [B, Hkv, pages·page_size, D]."""
        return paged_attention.gather_kv(self.codes, self.scale, self.zero, block_tables, bits=self.bits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache(KVCache):
    """Per layer a key and a value pool, and the block tables [B, pages per row] of the batch's rows.

    Row b's token at position p lives in page block_tables[b, p // page_size], slot p % page_size. A call with
    one token per row is a decode step. A longer call is a batch of prompts starting at position 0, or, with
    `continues_prefix`, chunks of prompts whose earlier tokens are already in the pages (chunked prefill, prefix
    caching): each chunk then also attends over its row's cached tokens before its first position. A serving
    engine keeps the pools and swaps in the block tables of each step's rows."""

    keys: tuple[KVPool, ...]
    values: tuple[KVPool, ...]
    block_tables: jax.Array  # [B, pages per row] int32
    kernel: str = dataclasses.field(default="auto", metadata=dict(static=True))
    continues_prefix: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def init(
        cls,
        config: ModelConfig,
        *,
        num_pages: int,
        page_size: int,
        block_tables: jax.Array,
        dtype,
        kv_bits: KVBits,
        kernel: str = "auto",
        kv_clip: KVClip = None,
    ) -> "PagedKVCache":
        """An empty pool of `num_pages` pages per layer, read through `block_tables`; `kv_bits` and `kv_clip` are
        uniform or per layer (`Params.kv_bits`, `Params.kv_clip`)."""
        if page_size < 1:
            raise ValueError(f"page_size must be ≥ 1; got {page_size}")
        bits, clips = layer_kv_settings(config.num_layers, kv_bits, kv_clip)

        def pools(which: int):
            return tuple(
                KVPool.zeros(
                    config.num_kv_heads, num_pages, page_size, config.head_dim, bits=b, dtype=dtype, clip=c[which]
                )
                for b, c in zip(bits, clips)
            )

        return cls(keys=pools(0), values=pools(1), block_tables=jnp.asarray(block_tables, jnp.int32), kernel=kernel)

    @classmethod
    def for_batch(cls, config: ModelConfig, batch_size: int, max_length: int, *, page_size: int, **kwargs):
        """A pool holding exactly `max_length` tokens for each of `batch_size` rows, row b on its own pages."""
        pages_per_row = -(-max_length // page_size)
        tables = jnp.arange(batch_size * pages_per_row, dtype=jnp.int32).reshape(batch_size, pages_per_row)
        return cls.init(
            config, num_pages=batch_size * pages_per_row, page_size=page_size, block_tables=tables, **kwargs
        )

    @property
    def page_size(self) -> int:
        return self.keys[0].codes.shape[2]

    @property
    def max_length(self) -> int:
        """Tokens each row's block table can hold."""
        return self.block_tables.shape[1] * self.page_size

    def attend(self, layer, q_bthd, k_bthd, v_bthd, positions_bt, valid_bt):
        num_pages = self.keys[layer].num_pages
        slot_index = jnp.minimum(positions_bt // self.page_size, self.block_tables.shape[1] - 1)
        pages = jnp.take_along_axis(self.block_tables, slot_index, axis=1)
        pages = jnp.where(valid_bt & (positions_bt < self.max_length), pages, num_pages)  # num_pages: dropped
        slots = positions_bt % self.page_size
        keys, values = list(self.keys), list(self.values)
        keys[layer] = keys[layer].write(pages, slots, k_bthd)
        values[layer] = values[layer].write(pages, slots, v_bthd)
        cache = dataclasses.replace(self, keys=tuple(keys), values=tuple(values))
        if q_bthd.shape[1] > 1 and self.continues_prefix:
            return cache.chunk_attention(layer, q_bthd, k_bthd, v_bthd, positions_bt, valid_bt), cache
        if q_bthd.shape[1] > 1:
            return prompt_attention(q_bthd, k_bthd, v_bthd, jnp.sum(valid_bt, axis=1, dtype=jnp.int32)), cache
        lengths = jnp.where(valid_bt[:, 0], positions_bt[:, 0] + 1, 0)
        return cache.decode_attention(layer, q_bthd[:, 0], lengths)[:, None], cache

    def chunk_attention(self, layer: int, q_bthd, k_bthd, v_bthd, positions_bt, valid_bt) -> jax.Array:
        """Causal attention of chunks starting at positions[:, 0]: over the row's cached tokens before the chunk
        (read back from the pages, as decode sees them) and the chunk's own unquantized keys and values."""
        dtype = k_bthd.dtype
        cached_k, cached_v = (
            jnp.swapaxes(pool.read(self.block_tables), 1, 2).astype(dtype)
            for pool in (self.keys[layer], self.values[layer])
        )
        starts = positions_bt[:, :1]
        cached = jnp.arange(cached_k.shape[1])[None, :] < starts  # [B, S]
        chunk = jnp.arange(q_bthd.shape[1])
        causal = (chunk[None, :] <= chunk[:, None])[None] & valid_bt[:, None, :]  # [B, T, T]
        mask = jnp.concatenate([jnp.broadcast_to(cached[:, None, :], (*valid_bt.shape, cached.shape[1])), causal], 2)
        keys = jnp.concatenate([cached_k, k_bthd], axis=1)
        values = jnp.concatenate([cached_v, v_bthd], axis=1)
        return grouped_attention(q_bthd, keys, values, mask & valid_bt[:, :, None])

    def decode_attention(self, layer: int, q_bhd, lengths_b) -> jax.Array:
        """One query per row [B, Hq, D] over the first lengths[b] tokens of its pages. "auto" takes the jnp
        reference for shapes the kernel cannot load (e.g. head_dim 24); "pallas" insists (and raises)."""
        k, v = self.keys[layer], self.values[layer]
        supported = paged_attention.kernel_supports(self.page_size, q_bhd.shape[-1])
        if use_pallas(self.kernel) and (supported or self.kernel == "pallas"):
            attention = paged_attention.paged_decode_attention
        else:
            attention = paged_attention.paged_decode_attention_reference
        return attention(
            q_bhd, k.codes, v.codes, self.block_tables, lengths_b, k.scale, k.zero, v.scale, v.zero, bits=k.bits
        )


def kv_bytes_per_token(config: ModelConfig, kv_bits: KVBits, dtype, *, kv_shards: int = 1) -> int:
    """Exact cache bytes one token takes over all layers, K and V: codes plus fp16 scale and zero per KV head
    below 16 bits (QServe's budget counts bits as bytes and drops the scales, 8× off at KV4), summed layer by
    layer when `kv_bits` is per layer. With tensor parallelism, the bytes on each device when the KV heads are
    split over `kv_shards` devices."""
    if config.num_kv_heads % kv_shards:
        raise ValueError(f"{config.num_kv_heads} KV heads do not split over {kv_shards} devices")
    bits, _ = layer_kv_settings(config.num_layers, kv_bits)

    def per_head(layer_bits: int) -> int:
        if layer_bits == 16:
            return config.head_dim * jnp.dtype(dtype).itemsize
        return paged_attention.code_width(config.head_dim, layer_bits) + _SCALE_ZERO_BYTES

    return 2 * config.num_kv_heads // kv_shards * sum(per_head(b) for b in bits)


def kv_bytes_per_page(config: ModelConfig, page_size: int, kv_bits: KVBits, dtype, *, kv_shards: int = 1) -> int:
    return page_size * kv_bytes_per_token(config, kv_bits, dtype, kv_shards=kv_shards)


def pages_that_fit(
    config: ModelConfig,
    memory_bytes: int,
    weight_bytes: int,
    *,
    page_size: int,
    kv_bits: KVBits,
    dtype,
    reserve_bytes: int = 0,
    kv_shards: int = 1,
) -> int:
    """How many pages fit in `memory_bytes` of device memory beside the weights and a reserve (activations,
    compiled programs); 0 when nothing is left. With tensor parallelism every figure is per device."""
    free = memory_bytes - weight_bytes - reserve_bytes
    return max(0, free // kv_bytes_per_page(config, page_size, kv_bits, dtype, kv_shards=kv_shards))
