"""The KV cache the model attends through: paged pools of KV4 / KV8 / KV16 pages, and its memory budget.

The model calls `cache.attend(layer, q, k, v, positions, valid, attention)` once per layer with post-RoPE queries,
keys and values (SmoothAttention is folded into the q/k weights) and the layer's `LayerAttention` (its scale,
soft-cap and sliding window), so how K/V are stored and read is the cache's business.
Every attention reads keys and values exactly as the cache holds them (the quantize → dequantize round trip at
KV4/KV8), so one-shot prefill, chunked prefill, a prefix-cache hit, a recompute and `forward` agree:

* `PagedKVCache` (prefill, decode, generation): per layer a K and a V `KVPool` of pages in the layout of
  `pallas_kernels.paged_attention`, shared by all sequences through block tables. Every token is quantized
  per KV head on write. Prompts with nothing cached attend over their own round-tripped K/V (cuDNN flash
  attention on GPU); chunks continuing cached sequences attend over the pages with the Pallas prefill kernel;
  a decode step attends over the pages with the Pallas decode kernel (the jnp references off GPU).
* `NoKVCache` (`forward`, calibration): attention within the chunk, storing nothing.

`attention_implementations` says which of these runs for a model, and why where it falls back (each fallback is
logged once at warning level). Caches are pytrees updated functionally; the step functions donate them so XLA
writes the pages in place.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import paged_attention, paged_prefill_attention
from qoq_jax.config import ModelConfig
from qoq_jax.quant import fake_quantize_kv, quantize_kv, use_pallas

log = logging.getLogger(__name__)

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


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention does beyond causal GQA softmax(q·k / √head_dim): its own logit `scale`
    (Gemma's query_pre_attn_scalar^−½), soft-capping `softcap`·tanh(logits / softcap) (Gemma 2), and a sliding
    `window`: a query at position p sees positions p − window + 1 … p (Mistral, Qwen, Gemma's local layers, Phi-3).
    Static (hashable): it is part of each layer's compiled attention."""

    scale: float | None = None
    softcap: float | None = None
    window: int | None = None

    @classmethod
    def of_layer(cls, config: ModelConfig, layer: int) -> "LayerAttention":
        scale = None if config.query_pre_attn_scalar is None else config.attention_scale
        return cls(scale=scale, softcap=config.attn_logit_softcap, window=config.layer_window(layer))

    def kernel_options(self) -> dict:
        """The keyword arguments of the paged kernels and their references."""
        return dict(sm_scale=self.scale, softcap=self.softcap, window=self.window)


FULL_ATTENTION = LayerAttention()


class KVCache(abc.ABC):
    @abc.abstractmethod
    def attend(
        self, layer: int, q_bthd, k_bthd, v_bthd, positions_bt, valid_bt, attention: LayerAttention = FULL_ATTENTION
    ) -> tuple[jax.Array, "KVCache"]:
        """Stores the new tokens' keys and values (invalid ones are dropped) and returns the causal attention
        of the new queries [B, T, Hq, D], in q's dtype, with the updated cache."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NoKVCache(KVCache):
    """Attention within one chunk of right-padded tokens starting at position 0; nothing is kept.

    With kv_bits < 16 the chunk's K/V pass through their quantization round trip first, so `forward` (and
    perplexity) measure what KV4/KV8 attention sees, the protocol of the QoQ paper's accuracy numbers, and agree
    with `prefill` to float rounding."""

    kv_bits: int | tuple[int, ...] = dataclasses.field(default=16, metadata=dict(static=True))
    kv_clip: tuple[tuple[float, float], ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    kv_range_search: bool = dataclasses.field(default=False, metadata=dict(static=True))
    kernel: str = dataclasses.field(default="auto", metadata=dict(static=True))

    def attend(self, layer, q_bthd, k_bthd, v_bthd, positions_bt, valid_bt, attention=FULL_ATTENTION):
        bits = self.kv_bits if isinstance(self.kv_bits, int) else self.kv_bits[layer]
        clip = (1.0, 1.0) if self.kv_clip is None else self.kv_clip[layer]
        options = dict(bits=bits, clip=clip, search=self.kv_range_search, kernel=self.kernel)
        out = round_trip_attention(q_bthd, k_bthd, v_bthd, valid_bt, attention, **options)
        return out, self


def round_trip_attention(
    q_bthd,
    k_bthd,
    v_bthd,
    valid_bt,
    attention: LayerAttention,
    *,
    bits: int,
    clip: tuple[float, float],
    search: bool,
    kernel: str,
) -> jax.Array:
    """Causal attention of right-padded prompts starting at position 0 over their own keys and values as
    `bits`-bit pages with (K, V) `clip` ratios and range `search` hold them (`quantize_kv` then dequantized, in
    the model dtype): what a later chunk or decode step reads back from the pages."""
    k_bthd, v_bthd = (fake_quantize_kv(x, bits, c, search) for x, c in ((k_bthd, clip[0]), (v_bthd, clip[1])))
    lengths = jnp.sum(valid_bt, axis=1, dtype=jnp.int32)
    return prompt_attention(q_bthd, k_bthd, v_bthd, lengths, attention, kernel=kernel)


def prompt_attention(
    q_bthd, k_bthd, v_bthd, lengths_b, attention: LayerAttention = FULL_ATTENTION, *, kernel: str = "auto"
) -> jax.Array:
    """Causal GQA attention of right-padded prompts starting at position 0 (rows past a length give zeros):
    cuDNN flash attention or XLA's, as `prefill_implementation` decides."""
    _, length, num_heads, head_dim = q_bthd.shape
    softcapped = attention.softcap is not None
    implementation, _ = prefill_implementation(
        num_heads, k_bthd.shape[2], head_dim, q_bthd.dtype, kernel, softcapped, attention.window
    )
    positions = jnp.arange(length)
    valid_query = positions[None, :] < lengths_b[:, None]
    if implementation == "cudnn":
        out = jax.nn.dot_product_attention(
            q_bthd,
            k_bthd,
            v_bthd,
            scale=attention.scale,
            is_causal=True,
            query_seq_lengths=lengths_b,
            key_value_seq_lengths=lengths_b,
            local_window_size=None if attention.window is None else (attention.window - 1, 0),
            implementation="cudnn",
        )
        return jnp.where(valid_query[:, :, None, None], out, jnp.zeros_like(out))  # padding rows: zeros, never NaN
    causal = positions[None, :] <= positions[:, None]
    if attention.window is not None:
        causal &= positions[None, :] > positions[:, None] - attention.window
    return grouped_attention(q_bthd, k_bthd, v_bthd, causal[None] & valid_query[:, :, None], attention)


def grouped_attention(q_bthd, k_bshd, v_bshd, mask_bts, attention: LayerAttention = FULL_ATTENTION) -> jax.Array:
    """GQA softmax attention (query head h reads KV head h // (Hq / Hkv)) with the layer's scale and soft-cap;
    fully masked rows give zeros."""
    batch, length, num_heads, head_dim = q_bthd.shape
    num_kv_heads = k_bshd.shape[2]
    q = q_bthd.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    # Matmuls in the model dtype (as transformers does), softmax in float32.
    scale = head_dim**-0.5 if attention.scale is None else attention.scale
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k_bshd).astype(jnp.float32) * scale
    if attention.softcap is not None:
        logits = attention.softcap * jnp.tanh(logits / attention.softcap)
    mask = mask_bts[:, None, None]
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_bshd.dtype), v_bshd)
    return out.reshape(batch, length, num_heads, head_dim).astype(q_bthd.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVPool:
    """One layer's keys or values for every page: codes [Hkv, pages, page_size, D/2 (KV4) or D] (uint8, or at 16 bits
    the model dtype or its bits) and, below 16 bits, fp16 scale and zero [Hkv, pages, page_size]. Writes keep
    `clip` of each token-head's range (`quantize_kv`).

    A 16-bit float pool may hold its values' bit patterns (uint16 codes, `bits_of` their dtype): XLA:CPU runs a
    scatter into a bfloat16 or float16 array in float32, converting the whole pool there and back on every
    write (2 ms per layer and step for SmolLM2's 512 bfloat16 pages, against 0.01 ms for their bits), while a
    gather reads the bits back as floats for free. `pages` is what attention reads."""

    codes: jax.Array
    scale: jax.Array | None
    zero: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    clip: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    search: bool = dataclasses.field(default=False, metadata=dict(static=True))
    bits_of: jnp.dtype | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def zeros(
        cls,
        num_kv_heads: int,
        num_pages: int,
        page_size: int,
        head_dim: int,
        *,
        bits: int,
        dtype,
        clip: float = 1.0,
        search: bool = False,
        half_as_bits: bool = False,
    ):
        """half_as_bits: a 16-bit float pool at 16 bits holds its values' bit patterns (see the class)."""
        if bits not in paged_attention.KV_BITS:
            raise ValueError(f"kv_bits must be one of {paged_attention.KV_BITS}; got {bits}")
        shape = (num_kv_heads, num_pages, page_size)
        width = paged_attention.code_width(head_dim, bits)
        if bits < 16:
            codes = jnp.zeros((*shape, width), jnp.uint8)
            return cls(codes, jnp.zeros(shape, jnp.float16), jnp.zeros(shape, jnp.float16), bits, clip, search)
        dtype = jnp.dtype(dtype)
        bits_of = dtype if half_as_bits and dtype.itemsize == 2 else None
        codes = jnp.zeros((*shape, width), jnp.uint16 if bits_of else dtype)
        return cls(codes, None, None, bits, clip, search, bits_of)

    @property
    def num_pages(self) -> int:
        return self.codes.shape[1]

    @property
    def pages(self) -> jax.Array:
        """The codes as attention reads them: the values themselves where the pool holds their bits."""
        return self.codes if self.bits_of is None else jax.lax.bitcast_convert_type(self.codes, self.bits_of)

    def write(self, pages_bt, slots_bt, x_bthd) -> "KVPool":
        """Quantizes x [B, T, Hkv, D] per token-head into (page, slot) [B, T]; out-of-range pages are dropped."""
        x_hbtd = jnp.moveaxis(x_bthd, 2, 0)
        if self.bits == 16:
            if self.bits_of is None:
                new = x_hbtd.astype(self.codes.dtype)
            else:
                new = jax.lax.bitcast_convert_type(x_hbtd.astype(self.bits_of), self.codes.dtype)
            codes = self.codes.at[:, pages_bt, slots_bt].set(new, mode="drop")
            return dataclasses.replace(self, codes=codes)
        codes, scale, zero = quantize_kv(x_hbtd, self.bits, self.clip, self.search)
        if self.bits == 4:
            codes = paged_attention.pack_kv_codes(codes)
        return dataclasses.replace(
            self,
            codes=self.codes.at[:, pages_bt, slots_bt].set(codes, mode="drop"),
            scale=self.scale.at[:, pages_bt, slots_bt].set(scale, mode="drop"),
            zero=self.zero.at[:, pages_bt, slots_bt].set(zero, mode="drop"),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache(KVCache):
    """Per layer a key and a value pool, and the block tables [B, pages per row] of the batch's rows.

    Row b's token at position p lives in page block_tables[b, p // page_size], slot p % page_size. A call with
    one token per row is a decode step. A longer call is a batch of prompts starting at position 0, or, with
    `continues_prefix`, chunks of prompts whose earlier tokens are already in the pages (chunked prefill, prefix
    caching): each chunk then also attends over its row's cached tokens before its first position. A serving
    engine keeps the pools and swaps in the block tables of each step's rows.

    Tables may be any width (an engine narrows them to the pages its step's longest row needs): attention reads
    a row's pages only up to the ones its length needs, and a token at a position past the table is not stored.
    An entry `num_pages` (out of range) is no page: writes to it are dropped and it holds no token, so a padding
    row (table filled with `num_pages`, length 0) writes nothing, reads nothing and gets finite outputs."""

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
        kv_range_search: bool = False,
    ) -> "PagedKVCache":
        """An empty pool of `num_pages` pages per layer, read through `block_tables`; `kv_bits` and `kv_clip` are
        uniform or per layer (`Params.kv_bits`, `Params.kv_clip`), `kv_range_search` for all."""
        if page_size < 1:
            raise ValueError(f"page_size must be ≥ 1; got {page_size}")
        bits, clips = layer_kv_settings(config.num_layers, kv_bits, kv_clip)
        # The jnp path reads pages through gathers, which view the bits back for free; the kernels read floats.
        half_as_bits = paged_implementation(kernel, page_size, config.head_dim)[0] == "reference"

        def pools(which: int):
            return tuple(
                KVPool.zeros(
                    config.num_kv_heads,
                    num_pages,
                    page_size,
                    config.head_dim,
                    bits=b,
                    dtype=dtype,
                    clip=c[which],
                    search=kv_range_search,
                    half_as_bits=half_as_bits,
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

    def attend(self, layer, q_bthd, k_bthd, v_bthd, positions_bt, valid_bt, attention=FULL_ATTENTION):
        num_pages = self.keys[layer].num_pages
        slot_index = jnp.minimum(positions_bt // self.page_size, self.block_tables.shape[1] - 1)
        pages = jnp.take_along_axis(self.block_tables, slot_index, axis=1)
        pages = jnp.where(valid_bt & (positions_bt < self.max_length), pages, num_pages)  # num_pages: dropped
        slots = positions_bt % self.page_size
        keys, values = list(self.keys), list(self.values)
        keys[layer] = keys[layer].write(pages, slots, k_bthd)
        values[layer] = values[layer].write(pages, slots, v_bthd)
        cache = dataclasses.replace(self, keys=tuple(keys), values=tuple(values))
        if q_bthd.shape[1] == 1:
            lengths = jnp.where(valid_bt[:, 0], positions_bt[:, 0] + 1, 0)
            return cache.decode_attention(layer, q_bthd[:, 0], lengths, attention)[:, None], cache
        if self.continues_prefix:
            lengths = jnp.sum(valid_bt, axis=1, dtype=jnp.int32)
            return cache.extend_attention(layer, q_bthd, positions_bt[:, 0], lengths, attention), cache
        key_pool, value_pool = self.keys[layer], self.values[layer]
        options = dict(bits=key_pool.bits, clip=(key_pool.clip, value_pool.clip), search=key_pool.search)
        out = round_trip_attention(q_bthd, k_bthd, v_bthd, valid_bt, attention, **options, kernel=self.kernel)
        return out, cache

    def extend_attention(self, layer: int, q_bthd, starts_b, lengths_b, attention=FULL_ATTENTION) -> jax.Array:
        """Causal attention of chunks [B, T, Hq, D] at positions starts..starts+lengths−1 over their rows' pages,
        which already hold the chunks: the cached prefix and the chunk read back exactly as decode sees them."""
        prefill = paged_prefill_attention
        kernels = prefill.paged_prefill_attention, prefill.paged_prefill_attention_reference
        return self._over_pages(layer, q_bthd, kernels, attention, starts_b, lengths_b)

    def decode_attention(self, layer: int, q_bhd, lengths_b, attention=FULL_ATTENTION) -> jax.Array:
        """One query per row [B, Hq, D] over the first lengths[b] tokens of its pages (the last `window` of them
        in a sliding-window layer: earlier pages are not read)."""
        kernels = paged_attention.paged_decode_attention, paged_attention.paged_decode_attention_reference
        return self._over_pages(layer, q_bhd, kernels, attention, lengths_b)

    def _over_pages(self, layer: int, q, kernels, attention: LayerAttention, *row_arrays) -> jax.Array:
        """Runs the (Pallas kernel, jnp reference) pair's choice over a layer's pools and the block tables."""
        implementation, _ = paged_implementation(self.kernel, self.page_size, q.shape[-1])
        run = kernels[0] if implementation == "pallas" else kernels[1]
        k, v = self.keys[layer], self.values[layer]
        pools = (k.pages, v.pages, self.block_tables, *row_arrays, k.scale, k.zero, v.scale, v.zero)
        return run(q, *pools, bits=k.bits, **attention.kernel_options())


@dataclasses.dataclass(frozen=True)
class AttentionImplementations:
    """What runs each attention of a model on this backend (for an engine's start-up line and metrics), and
    why, where one is a fallback from the fast path."""

    decode: str  # one query per row over the pages: "pallas" (paged_decode_attention) or "reference" (jnp)
    extend: str  # prompt chunks over cached pages: "pallas" (paged_prefill_attention) or "reference" (jnp)
    prefill: str  # prompts with nothing cached, and `forward`: "cudnn" (flash attention) or "xla"
    fallbacks: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"decode={self.decode} extend={self.extend} prefill={self.prefill}"


def attention_implementations(config: ModelConfig, *, page_size: int, dtype, kernel: str = "auto"):
    """The implementations `PagedKVCache` and `NoKVCache` pick for this model, page size, dtype and kernel choice
    (a model's `params.kernel`) on the default backend: the same functions decide both, so this is what runs."""
    paged, paged_reason = paged_implementation(kernel, page_size, config.head_dim)
    softcapped = config.attn_logit_softcap is not None
    prefill, prefill_reason = prefill_implementation(
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        jnp.dtype(dtype),
        kernel,
        softcapped,
        config.sliding_window,
    )
    reasons = tuple(reason for reason in (paged_reason, prefill_reason) if reason)
    return AttentionImplementations(decode=paged, extend=paged, prefill=prefill, fallbacks=reasons)


@functools.cache
def paged_implementation(kernel: str, page_size: int, head_dim: int) -> tuple[str, str | None]:
    """Decode and extend attention over the pages: ("pallas" | "reference", why it fell back or None).

    "auto" takes the Pallas kernels on GPU where they can load the shapes and otherwise the jnp reference, with
    a warning (logged once); "pallas" insists (the kernels raise on shapes they cannot take); "reference" is the
    user's choice, no fallback."""
    if not use_pallas(kernel):
        return "reference", None
    if kernel == "pallas" or paged_attention.kernel_supports(page_size, head_dim):
        return "pallas", None
    reason = (
        f"paged attention runs the jnp reference on {jax.default_backend()}: the Pallas kernels need a "
        f"power-of-two page_size ≥ 8 and head_dim ≥ 32, got page_size {page_size} and head_dim {head_dim}"
    )
    log.warning(reason)
    return "reference", reason


@functools.cache
def prefill_implementation(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    kernel: str,
    softcapped: bool = False,
    window: int | None = None,
):
    """Attention of prompts with nothing cached: ("cudnn" | "xla", why it fell back or None).

    cuDNN flash attention on GPU when cuDNN takes the shapes, dtype and window, decided once by tracing it on
    abstract inputs (its own checks: fp16/bf16, head_dim); otherwise XLA's attention with a warning (logged once):
    always for soft-capped logits (Gemma 2), which jax's cuDNN attention does not offer. Off GPU, and with
    kernel="reference" (no vendor or Pallas kernels at all), XLA's attention is the choice, not a fallback."""
    if kernel == "reference" or jax.default_backend() != "gpu":
        return "xla", None
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        refusal = f"cuDNN flash attention needs float16 or bfloat16, the model computes in {dtype}"
    elif softcapped:
        refusal = "jax's cuDNN flash attention has no logit soft-capping"
    else:
        refusal = _cudnn_refusal(num_heads, num_kv_heads, head_dim, dtype, window)
    if refusal is None:
        return "cudnn", None
    reason = f"prefill attention runs XLA's attention instead of cuDNN's: {refusal}"
    log.warning(reason)
    return "xla", reason


def _cudnn_refusal(num_heads: int, num_kv_heads: int, head_dim: int, dtype, window: int | None) -> str | None:
    """Why cuDNN refuses causal (sliding-window) attention of these heads (its trace-time checks), or None."""
    q = jax.ShapeDtypeStruct((1, 64, num_heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, 64, num_kv_heads, head_dim), dtype)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    attention = functools.partial(
        jax.nn.dot_product_attention,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )
    try:
        jax.eval_shape(
            lambda q, k, v, n: attention(q, k, v, query_seq_lengths=n, key_value_seq_lengths=n), q, kv, kv, lengths
        )
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


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
