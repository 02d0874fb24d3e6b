"""Quantization formats of W4A8KV4: weight pytrees, per-token activations, per-token-head KV.

One module shared by calibration (which fills the formats), the model (whose `linear` dispatcher calls
`weight.matmul`), and checkpoints (which store the pytrees' arrays). The math is
../shared/spec/qoq-algorithm.md §1.7 and §2; weights are in the model's [in, out] orientation, so groups run
along axis 0. The packed uint4 layout belongs to the GEMM kernel and is defined in `pallas_kernels.w4a8_gemm`.

* `Int4GroupWeight` — progressive g128: s1 fp16 per output channel, integer s2 and int8-domain zero per group of
  inputs, W8 = q·s2 − z ∈ [−119, 119] by the protective range P.
* `Int4ChannelWeight` — per-channel uint4 with a float scale and scaled zero.
* `Int8ChannelWeight` — W8A8 (per-channel symmetric int8), the XLA int8 baseline.
Activations entering any of them are int8, symmetric, per token, dynamic.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import w4a8_gemm

PROTECTIVE_RANGE = 119
"""Level-1 range P: every level-2 group of U ∈ [−P, P] dequantizes to int8 (spec §2.1)."""

KERNEL_CHOICES = ("auto", "pallas", "reference")
"""How a quantized matmul runs: Pallas on GPU and the jnp reference elsewhere ("auto"), or forced."""

KV_BITS = (4, 8, 16)


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=dict(static=True))


# --------------------------------------------------------------------------------------------------
# Activations and KV
# --------------------------------------------------------------------------------------------------


def quantize_activations(x: jax.Array, scale_over: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """Per-token symmetric int8: x [..., K] → (codes int8 [..., K], scale float32 [...]), x ≈ codes·scale.

    The scale stays float32 (the reference rounds it to fp16, which overflows for large bf16 activations). With
    `scale_over` x is this device's slice of K and the absmax is taken over the slices on those mesh axes, so
    every device quantizes with the scale of the whole row."""
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=-1)
    if scale_over:
        absmax = jax.lax.pmax(absmax, scale_over)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8)
    return codes, scale


KV_RANGE_CUTS = (0.0, 0.04, 0.08, 0.12)
"""The range search's candidates (`quantize_kv`): each end of a vector's [min, max] moved inward by one of these
fractions of its width, 16 ranges, the full one first (a tie keeps it)."""


def quantize_kv(
    x: jax.Array, bits: int, clip: float = 1.0, search: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric per-vector quantization along the last axis (one head of one token):
    (codes uint8, scale fp16, zero fp16) with x̂ = codes·scale − zero.

    `clip` < 1 shrinks the range to clip·[min, max] (both ends scaled about 0, as the weight clip search does)
    and values outside it saturate: a finer step for the many at the cost of the few (a calibrated ratio).
    `search` then picks each vector's range among `KV_RANGE_CUTS` by the squared error of its own round trip
    (fp16 scale and zero as stored): the same trade made per token where it pays, about 12% less error than the
    full range on Gaussian or Laplacian vectors of 64. The pages store the result like any other; readers do not
    change."""
    levels = 2**bits - 1
    x32 = x.astype(jnp.float32)
    vmax, vmin = jnp.max(x32, axis=-1) * clip, jnp.min(x32, axis=-1) * clip
    scale, zero = _searched_grid(x32, vmin, vmax, levels) if search else _kv_grid(vmin, vmax, levels)
    return _kv_codes(x32, scale, zero, levels).astype(jnp.uint8), scale, zero


def _searched_grid(x32, vmin, vmax, levels: int):
    """The (scale, zero) of least round-trip error per vector among the `KV_RANGE_CUTS` ranges: the candidates
    are one axis of a single expression (XLA fuses each vector's error into its reduction), which keeps every
    program that writes pages small to compile (unrolled per candidate, the SmolLM2 tests that compile its
    programs took 3–4× longer)."""
    cuts = jnp.asarray(KV_RANGE_CUTS, jnp.float32)
    low, high = (grid.reshape(-1) for grid in jnp.meshgrid(cuts, cuts, indexing="ij"))  # [C], the full range first
    width = (vmax - vmin)[..., None]
    scale, zero = _kv_grid(vmin[..., None] + low * width, vmax[..., None] - high * width, levels)  # [..., C]
    candidates = x32[..., None, :]
    restored = dequantize_kv(_kv_codes(candidates, scale, zero, levels), scale, zero, jnp.float32)
    error = jnp.sum(jnp.square(restored - candidates), axis=-1)
    best = jnp.argmin(error, axis=-1)[..., None]  # the first of equal errors: the full range on a tie
    return (jnp.take_along_axis(a, best, axis=-1)[..., 0] for a in (scale, zero))


def _kv_grid(vmin, vmax, levels: int):
    scale = ((vmax - vmin) / levels).astype(jnp.float16)
    return jnp.where(scale > 0, scale, jnp.float16(1)), (-vmin).astype(jnp.float16)


def _kv_codes(x32, scale, zero, levels: int):
    return jnp.clip(jnp.round((x32 + zero[..., None]) / scale[..., None]), 0, levels)


def dequantize_kv(codes: jax.Array, scale: jax.Array, zero: jax.Array, dtype) -> jax.Array:
    return (codes.astype(jnp.float32) * scale[..., None] - zero[..., None].astype(jnp.float32)).astype(dtype)


def fake_quantize_kv(x: jax.Array, bits: int, clip: float = 1.0, search: bool = False) -> jax.Array:
    """x after its round trip through `bits`-bit KV storage (16: unchanged)."""
    if bits == 16:
        return x
    return dequantize_kv(*quantize_kv(x, bits, clip, search), x.dtype)


# --------------------------------------------------------------------------------------------------
# Weight grids (shared by RTN, GPTQ and the formats)
# --------------------------------------------------------------------------------------------------


def progressive_level1(w_kn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Level 1 of g128: s1 = fp16(max|w|/P) per output channel and U = clamp(w/s1, −P, P), left unrounded."""
    w = w_kn.astype(jnp.float32)
    s1 = (jnp.max(jnp.abs(w), axis=0) / PROTECTIVE_RANGE).astype(jnp.float16)
    s1 = jnp.where(s1 > 0, s1, jnp.float16(1))
    u = jnp.clip(w / s1.astype(jnp.float32), -PROTECTIVE_RANGE, PROTECTIVE_RANGE)
    return s1, u


def progressive_level2(u_kn: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Level 2 of g128 per group of inputs: integer s2 = round((max−min)/15) (0 → 1) and int8-domain zero
    z = round(−min), both int8 [K/group_size, N].

    min is taken ≤ 0 (as QServe's converter requires): then every code 0..15, not only those the group's
    values round to, dequantizes into int8 (q·s2 − z ≤ max + 8 ≤ 127), which GPTQ needs since its error
    feedback can move a weight outside its group's original range. An all-positive group with min 113
    would otherwise give s2 = 1, z = −113 and 15·1 + 113 = 128."""
    grouped = _group_rows(u_kn.astype(jnp.float32), group_size)
    vmax, vmin = jnp.max(grouped, axis=1), jnp.minimum(jnp.min(grouped, axis=1), 0.0)
    s2 = jnp.clip(jnp.round((vmax - vmin) / 15), -127, 127)
    s2 = jnp.where(s2 == 0, 1, s2).astype(jnp.int8)
    zero = jnp.clip(jnp.round(-vmin), -128, 127).astype(jnp.int8)
    return s2, zero


def channel_grid(w_kn: jax.Array, ratio: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-channel uint4 grid of the (clipped) range r·[min, max]: scale fp16 = (max−min)/15 and the scaled
    zero fp16 = −min, both [N]."""
    w = w_kn.astype(jnp.float32)
    vmax, vmin = jnp.max(w, axis=0) * ratio, jnp.min(w, axis=0) * ratio
    scale = ((vmax - vmin) / 15).astype(jnp.float16)
    scale = jnp.where(scale > 0, scale, jnp.float16(1))
    return scale, (-vmin).astype(jnp.float16)


def round_to_grid(w_kn: jax.Array, scale_gn: jax.Array, zero_gn: jax.Array, group_size: int) -> jax.Array:
    """Round-to-nearest uint4 codes [K, N] of w on an affine grid given per (group, channel): ŵ = q·scale − zero."""
    scale = jnp.repeat(scale_gn.astype(jnp.float32), group_size, axis=0)
    zero = jnp.repeat(zero_gn.astype(jnp.float32), group_size, axis=0)
    return jnp.clip(jnp.round((w_kn.astype(jnp.float32) + zero) / scale), 0, 15).astype(jnp.uint8)


def _group_rows(x_kn: jax.Array, group_size: int) -> jax.Array:
    num_in, num_out = x_kn.shape
    if num_in % group_size:
        raise ValueError(f"{num_in} input channels do not split into groups of {group_size}")
    return x_kn.reshape(num_in // group_size, group_size, num_out)


# --------------------------------------------------------------------------------------------------
# Weight formats
# --------------------------------------------------------------------------------------------------


def use_pallas(kernel: str) -> bool:
    """Whether a kernel choice runs the Pallas kernel here: "auto" means on GPU only."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}; got {kernel!r}")
    return kernel == "pallas" or (kernel == "auto" and jax.default_backend() == "gpu")


def _flatten_tokens(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4GroupWeight:
    """Progressive-group W4 (QoQ g128): ŵ = s1·(q·s2 − z)."""

    packed: jax.Array  # [K, N/2] uint8, layout of pallas_kernels.w4a8_gemm
    s1: jax.Array  # [N] float16
    s2: jax.Array  # [K/group_size, N] int8, 1..16
    zero: jax.Array  # [K/group_size, N] int8
    group_size: int = _static()
    kernel: str = _static("auto")

    format_name: ClassVar[str] = "w4a8-g128"

    @classmethod
    def from_codes(cls, codes_kn, s1, s2, zero, *, group_size: int, kernel: str = "auto") -> "Int4GroupWeight":
        return cls(
            w4a8_gemm.pack_uint4(codes_kn),
            jnp.asarray(s1, jnp.float16),
            jnp.asarray(s2, jnp.int8),
            jnp.asarray(zero, jnp.int8),
            group_size=group_size,
            kernel=kernel,
        )

    @classmethod
    def round_to_nearest(cls, w_kn: jax.Array, *, group_size: int, kernel: str = "auto") -> "Int4GroupWeight":
        s1, u = progressive_level1(w_kn)
        s2, zero = progressive_level2(u, group_size)
        codes = round_to_grid(u, s2, zero, group_size)
        return cls.from_codes(codes, s1, s2, zero, group_size=group_size, kernel=kernel)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def int8_weight(self) -> jax.Array:
        """W8 = q·s2 − z [K, N] int8, what the GEMM multiplies."""
        return w4a8_gemm.g128_int8_weights(self.packed, self.s2, self.zero, group_size=self.group_size)

    def dequantize(self) -> jax.Array:
        return self.int8_weight().astype(jnp.float32) * self.s1.astype(jnp.float32)[None, :]

    def matmul(self, x: jax.Array, *, scale_over: tuple[str, ...] = ()) -> jax.Array:
        """x [..., K] @ the weight in x's dtype; `scale_over`: see `quantize_activations`."""
        x2, lead = _flatten_tokens(x)
        x_i8, x_scale = quantize_activations(x2, scale_over)
        gemm = w4a8_gemm.w4a8_gemm_g128 if use_pallas(self.kernel) else w4a8_gemm.w4a8_gemm_g128_reference
        y = gemm(x_i8, x_scale, self.packed, self.s1, self.s2, self.zero, group_size=self.group_size, out_dtype=x.dtype)
        return y.reshape(*lead, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4ChannelWeight:
    """Per-channel W4 (QoQ gchn): ŵ = q·scale − zero with a float scale and scaled zero per output channel."""

    packed: jax.Array  # [K, N/2] uint8
    scale: jax.Array  # [N] float16
    zero: jax.Array  # [N] float16
    kernel: str = _static("auto")

    format_name: ClassVar[str] = "w4a8-chn"

    @classmethod
    def from_codes(cls, codes_kn, scale, zero, *, kernel: str = "auto") -> "Int4ChannelWeight":
        return cls(
            w4a8_gemm.pack_uint4(codes_kn),
            jnp.asarray(scale, jnp.float16),
            jnp.asarray(zero, jnp.float16),
            kernel=kernel,
        )

    @classmethod
    def round_to_nearest(cls, w_kn: jax.Array, *, kernel: str = "auto") -> "Int4ChannelWeight":
        scale, zero = channel_grid(w_kn)
        codes = round_to_grid(w_kn, scale[None], zero[None], w_kn.shape[0])
        return cls.from_codes(codes, scale, zero, kernel=kernel)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def dequantize(self) -> jax.Array:
        codes = w4a8_gemm.unpack_uint4(self.packed).astype(jnp.float32)
        return codes * self.scale.astype(jnp.float32)[None, :] - self.zero.astype(jnp.float32)[None, :]

    def matmul(self, x: jax.Array, *, scale_over: tuple[str, ...] = ()) -> jax.Array:
        """x [..., K] @ the weight in x's dtype; `scale_over`: see `quantize_activations`."""
        x2, lead = _flatten_tokens(x)
        x_i8, x_scale = quantize_activations(x2, scale_over)
        x_sum = jnp.sum(x_i8.astype(jnp.int32), axis=-1)
        gemm = w4a8_gemm.w4a8_gemm_chn if use_pallas(self.kernel) else w4a8_gemm.w4a8_gemm_chn_reference
        y = gemm(x_i8, x_scale, x_sum, self.packed, self.scale, self.zero, out_dtype=x.dtype)
        return y.reshape(*lead, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8ChannelWeight:
    """W8A8: symmetric int8 per output channel, multiplied by XLA's int8 GEMM (int32 accumulation)."""

    values: jax.Array  # [K, N] int8
    scale: jax.Array  # [N] float32

    format_name: ClassVar[str] = "w8a8"

    @classmethod
    def round_to_nearest(cls, w_kn: jax.Array) -> "Int8ChannelWeight":
        w = w_kn.astype(jnp.float32)
        absmax = jnp.max(jnp.abs(w), axis=0)
        scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
        return cls(jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def dequantize(self) -> jax.Array:
        return self.values.astype(jnp.float32) * self.scale[None, :]

    def matmul(self, x: jax.Array, *, scale_over: tuple[str, ...] = ()) -> jax.Array:
        """x [..., K] @ the weight in x's dtype; `scale_over`: see `quantize_activations`."""
        x2, lead = _flatten_tokens(x)
        x_i8, x_scale = quantize_activations(x2, scale_over)
        acc = jax.lax.dot_general(x_i8, self.values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * x_scale[:, None] * self.scale[None, :]
        return y.astype(x.dtype).reshape(*lead, -1)


QuantizedWeight = Int4GroupWeight | Int4ChannelWeight | Int8ChannelWeight


# --------------------------------------------------------------------------------------------------
# The static description a quantized model carries
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How a model's decoder linears and KV cache are stored: static, hashable, recorded in checkpoints.

    weights: "w4a8-g128" | "w4a8-chn" | "w8a8"; group_size only for g128; kv_bits 4, 8 or 16.

    The KV options of QoQ's calibration (each off by default, so formats without them describe older checkpoints):

    * layer_kv_bits: bits of layer i's K and V pages (mixed precision, e.g. KV8 for sensitive layers); None: all
      `kv_bits`.
    * kv_clip: per layer (K ratio, V ratio) of the per-token range kept before rounding (see `quantize_kv`);
      None: 1.0 everywhere.
    * kv_range_search: every K and V vector written to the pages gets the range of least round-trip error among
      `KV_RANGE_CUTS` (`quantize_kv`'s `search`); the stored codes, scale and zero read as any others.
    * qk_transform: every attention layer holds per-KV-head `key_transform` A, `query_transform` A⁻ᵀ [Hkv, D, D]
      and `key_offset` μ [Hkv, D] (float32), applied after RoPE: k ← (k − μ)·A, q ← q·A⁻ᵀ. q·k changes only by
      q·μ, the same for every key of a query, which softmax ignores; so attention is unchanged while the keys
      written to the pages are centred and rotated (a Hadamard A spreads outlier channels over the head)."""

    weights: str
    kv_bits: int = 4
    group_size: int | None = None
    kernel: str = "auto"
    layer_kv_bits: tuple[int, ...] | None = None
    kv_clip: tuple[tuple[float, float], ...] | None = None
    kv_range_search: bool = False
    qk_transform: bool = False

    FORMATS: ClassVar[dict[str, type]] = {
        cls.format_name: cls for cls in (Int4GroupWeight, Int4ChannelWeight, Int8ChannelWeight)
    }

    def __post_init__(self):
        if self.weights not in self.FORMATS:
            raise ValueError(f"weight format {self.weights!r} is not one of {', '.join(self.FORMATS)}")
        if self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}; got {self.kv_bits}")
        if (self.weights == Int4GroupWeight.format_name) != (self.group_size is not None):
            raise ValueError("group_size is required by, and only by, the w4a8-g128 format")
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}; got {self.kernel!r}")
        if self.layer_kv_bits is not None:  # JSON gives lists: store tuples, so the format stays hashable
            object.__setattr__(self, "layer_kv_bits", tuple(int(b) for b in self.layer_kv_bits))
            bad = [b for b in self.layer_kv_bits if b not in KV_BITS]
            if bad or not self.layer_kv_bits:
                raise ValueError(f"layer_kv_bits must be a non-empty list of {KV_BITS}; got {self.layer_kv_bits}")
        if self.kv_clip is not None:
            object.__setattr__(self, "kv_clip", tuple((float(k), float(v)) for k, v in self.kv_clip))
            if not self.kv_clip or not all(0 < r <= 1 for pair in self.kv_clip for r in pair):
                raise ValueError(f"kv_clip must be non-empty (K, V) ratios in (0, 1]; got {self.kv_clip}")
        if self.layer_kv_bits and self.kv_clip and len(self.layer_kv_bits) != len(self.kv_clip):
            raise ValueError(
                f"layer_kv_bits has {len(self.layer_kv_bits)} layers but kv_clip has {len(self.kv_clip)}"
            )

    def check_layers(self, num_layers: int) -> None:
        """Refuses per-layer KV options written for another depth."""
        for name in ("layer_kv_bits", "kv_clip"):
            value = getattr(self, name)
            if value is not None and len(value) != num_layers:
                raise ValueError(f"{name} has {len(value)} entries for a model of {num_layers} layers")

    def layer_bits(self, num_layers: int) -> tuple[int, ...]:
        return self.layer_kv_bits or (self.kv_bits,) * num_layers

    def check_linear(self, num_in: int, num_out: int, name: str = "linear") -> None:
        """Refuses a shape this format cannot store, naming the layer (never silently changing the recipe)."""
        if self.weights == Int8ChannelWeight.format_name:
            return
        try:
            w4a8_gemm.check_packable(num_in, num_out)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        if self.group_size is not None and num_in % self.group_size:
            raise ValueError(f"{name}: in_features={num_in} is not a multiple of group_size={self.group_size}")

    def round_to_nearest(self, w_kn: jax.Array) -> QuantizedWeight:
        """The weight in this format by plain rounding (baselines, random models, tests)."""
        if self.weights == Int4GroupWeight.format_name:
            return Int4GroupWeight.round_to_nearest(w_kn, group_size=self.group_size, kernel=self.kernel)
        if self.weights == Int4ChannelWeight.format_name:
            return Int4ChannelWeight.round_to_nearest(w_kn, kernel=self.kernel)
        return Int8ChannelWeight.round_to_nearest(w_kn)
