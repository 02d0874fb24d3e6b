"""W4A8 GEMM: int8 activations × 4-bit weights on int8 tensor cores, and the packed uint4 layout they share.

Packed layout (the one place it is defined; calibration writes it, the kernels and references read it)
------------------------------------------------------------------------------------------------------
Weights are stored in the model's [K (in), N (out)] orientation as uint8 `packed` [K, N/2]. Output channels
come in tiles of `PACK_TILE_N` = 64; inside tile t, byte column t·32 + j holds

    low nibble  = code of output channel t·64 + j
    high nibble = code of output channel t·64 + 32 + j          (j in 0..31)

so the low nibbles of a [block_k, T·32] slab of bytes (T whole tiles) are the codes of the low halves of its T
tiles and the high nibbles those of the high halves: one mask and one shift (`b & 15`, `b >> 4`) give two
[block_k, T·32] int8 weight tiles, each feeding one dot, with no interleave and no concatenate (which the Pallas
Triton lowering rejects off the last axis). The kernels view per-channel operands and the output as
[..., N/64, 2, 32] (`by_half_tile`), so each half's channels are one strided slice. QServe pairs rows o and o+16
of a 32×32 MMA tile for the same reason.

Arithmetic (both recipes; see ../shared/spec/qoq-algorithm.md §2.3)
-------------------------------------------------------------------
* progressive g128: W8 = q·s2 − z in int8 (|W8| ≤ 119 by the protective range), acc = X8 @ W8 in int32 over the
  full K, y = s_x·s1·acc. s2 and z are integers per (group of `group_size` inputs, output channel).
* per-channel: acc = X8 @ q with the codes 0..15 as int8, y = s_x·(s·acc − z·ΣX8), ΣX8 the per-token sum of the
  int8 activations (exact, int32).
The epilogue is float32 and rounds once to the output dtype.

Kernels (Pallas, Triton lowering; `interpret=True` runs them on CPU)
--------------------------------------------------------------------
`w4a8_gemm_g128` and `w4a8_gemm_chn` tile the output over a (M blocks, N blocks) grid. Each program loops over
K in `block_k` steps (within one group for g128), unpacking each [block_k, block_n/2] byte slab on int32 (Triton
has no arithmetic on 8-bit types) and running one int8 × int8 → int32 `jnp.dot` per nibble half, block_n/2
columns wide; partial sums are never dequantized. Rows past M are masked on load and store, so M is free; N and
K are multiples of 64. Tiles come from `W4A8BlockSizes.for_shape` per M bucket and arch. The `*_reference`
functions at the bottom are the same arithmetic in plain jnp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

PACK_TILE_N = 64
_HALF_TILE = PACK_TILE_N // 2


def check_packable(num_in: int, num_out: int) -> None:
    """The shapes every W4A8 kernel accepts: K and N multiples of 64."""
    if num_in % 64 or num_out % PACK_TILE_N:
        raise ValueError(
            f"W4A8 weights need in_features and out_features that are multiples of 64; got [{num_in}, {num_out}]"
        )


def pack_uint4(codes: jax.Array | np.ndarray) -> jax.Array:
    """Codes [K, N] with values 0..15 → packed uint8 [K, N/2] in the layout above."""
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [K, N]; got shape {codes.shape}")
    check_packable(*codes.shape)
    num_in, num_out = codes.shape
    tiles = codes.astype(jnp.uint8).reshape(num_in, num_out // PACK_TILE_N, 2, _HALF_TILE)
    packed = tiles[:, :, 0, :] | (tiles[:, :, 1, :] << 4)
    return packed.reshape(num_in, num_out // 2)


def unpack_uint4(packed: jax.Array) -> jax.Array:
    """Packed uint8 [K, N/2] → codes uint8 [K, N], the inverse of `pack_uint4`."""
    if packed.ndim != 2 or packed.dtype != jnp.uint8 or packed.shape[1] % _HALF_TILE:
        raise ValueError(
            f"packed weights must be uint8 [K, N/2] with N a multiple of 64; got {packed.dtype}{packed.shape}"
        )
    num_in, half = packed.shape
    tiles = packed.reshape(num_in, half // _HALF_TILE, 1, _HALF_TILE)
    both = jnp.concatenate([tiles & 15, tiles >> 4], axis=2)
    return both.reshape(num_in, half * 2)


@dataclasses.dataclass(frozen=True)
class W4A8BlockSizes:
    """Tile sizes and Triton launch parameters of one W4A8 GEMM call; frozen so it can be a static jit argument.

    Each program computes a [block_m, block_n] output tile, stepping over K in block_k slices. block_n is a
    multiple of the 64-channel packed tile (each step is two int8 dots of block_n/2 columns, one per nibble
    half); the g128 kernel needs block_k to divide group_size so that each step reads one row of s2 / zero. All
    three are powers of two because Triton loads are; block_m ≥ 16 and block_k ≥ 32 because that is the smallest
    int8 `tt.dot`.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        sizes = (self.block_m, self.block_n, self.block_k)
        if any(size & (size - 1) for size in sizes) or min(sizes) < 16 or self.block_n < 64 or self.block_k < 32:
            raise ValueError(
                f"W4A8 block sizes must be powers of two, block_m ≥ 16, block_n ≥ 64, block_k ≥ 32; got {self}"
            )

    @classmethod
    def for_shape(
        cls, m: int, n: int, k: int, *, group_size: int | None = None, compute_capability: float | None = None
    ) -> W4A8BlockSizes:
        """The default tiles for an [m, k] @ [k, n] product on a GPU of `compute_capability` (default: the first
        device's; 9.0 without a GPU): the M bucket's entry, shrunk to divide n and k (and the group).

        The buckets follow QServe's CTA tiles (narrow tiles for decode so that N alone fills the GPU, 128-row
        tiles for prefill). From M > 64 on, sm_90 takes 256-channel blocks, so each nibble half's dot is 128
        columns wide (wgmma m64n128k32; the 32-wide dots of 64-channel halves ran wgmma n32, far below its rate),
        while sm_80's `mma.sync` tiles are 8 columns wide anyway and 256-channel blocks spill there: its
        buckets keep 128. benchmarks/results/kernel-compile.md has the registers, spills and shared memory of
        every bucket on both; none has been timed on a GPU yet.
        """
        if compute_capability is None:
            compute_capability = device_compute_capability()
        buckets = _M_BUCKETS_SM90 if compute_capability >= 9.0 else _M_BUCKETS
        bucket = next(blocks for bound, blocks in buckets if m <= bound)
        block_k = _largest_dividing(bucket.block_k, k if group_size is None else group_size)
        return dataclasses.replace(bucket, block_n=_largest_dividing(bucket.block_n, n), block_k=block_k)


def device_compute_capability() -> float:
    """The first device's compute capability, 9.0 where it is no GPU (interpret mode, lowering on CPU)."""
    device = jax.devices()[0]
    return float(device.compute_capability) if device.platform == "gpu" else 9.0


# (largest M, tiles) per bucket, from decode (M ≤ 16) to prefill (M > 256).
_M_BUCKETS = (
    (16, W4A8BlockSizes(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)),
    (64, W4A8BlockSizes(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4)),
    (256, W4A8BlockSizes(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)),
    (float("inf"), W4A8BlockSizes(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
)
_M_BUCKETS_SM90 = (
    *_M_BUCKETS[:2],
    (256, W4A8BlockSizes(block_m=64, block_n=256, block_k=32, num_warps=4, num_stages=4)),  # bk 64: 253 registers
    (float("inf"), W4A8BlockSizes(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)),
)


def _largest_dividing(limit: int, size: int) -> int:
    """The largest power of two ≤ limit that divides size (size is a multiple of 64, so at least 64 when limit is)."""
    block = limit
    while size % block:
        block //= 2
    return block


def _valid_rows(block_m: int, num_rows: int) -> jax.Array:
    """Which of this program's block_m rows exist: M need not be a multiple of block_m."""
    return pl.program_id(0) * block_m + jnp.arange(block_m) < num_rows


def by_half_tile(a: jax.Array) -> jax.Array:
    """A per-output-channel array [..., N] viewed as [..., N/64, 2, 32]: (packed tile, nibble half, lane), the
    order of the packed layout, so `[..., :, half, :]` is the channels of one nibble half of every tile."""
    return a.reshape(*a.shape[:-1], a.shape[-1] // PACK_TILE_N, 2, _HALF_TILE)


def _half_columns(ref, half: int, *leading) -> jax.Array:
    """Row `leading` of a by_half_tile ref, the channels of nibble half `half` of its tiles: [1, block_n/2]."""
    values = ref[(*(pl.ds(index, 1) for index in leading), slice(None), half, slice(None))]
    return values.reshape(1, values.size)


def _accumulate(x_ref, packed_ref, rows, *, num_k_blocks: int, block_k: int, widen):
    """Σ_K X8 @ W8 in int32: one [block_m, block_n/2] accumulator per nibble half.

    A [block_k, block_n/2] slab of packed bytes holds, in its low nibbles, the codes of the low half of every
    64-channel tile of the block, and in its high nibbles the high halves; each half is one int8 dot as wide as
    half the block (≥ 128 columns at block_n = 256, which Hopper's wgmma needs for its full rate). The bytes are
    unpacked on int32 (Triton rejects arithmetic on 8-bit types); `widen(k_block, half, codes)` turns a half's
    codes 0..15 into its int8 weights. Partial sums are never dequantized.
    """

    def step(k_block, accs):
        k_slice = pl.ds(k_block * block_k, block_k)
        x = plgpu.load(x_ref.at[:, k_slice], mask=rows[:, None], other=0)
        packed = packed_ref[k_slice, :].astype(jnp.int32)
        return tuple(
            acc + jnp.dot(x, widen(k_block, half, codes), preferred_element_type=jnp.int32)
            for half, (acc, codes) in enumerate(zip(accs, (packed & 15, packed >> 4)))
        )

    zeros = jnp.zeros((x_ref.shape[0], packed_ref.shape[1]), jnp.int32)
    return jax.lax.fori_loop(0, num_k_blocks, step, (zeros, zeros))


def _store(o_ref, rows, accs, epilogue) -> None:
    """Writes `epilogue(half, acc)` of each half's accumulator into its channels of the by_half_tile output,
    skipping the rows past M."""
    block_m, num_tiles = o_ref.shape[:2]
    for half, acc in enumerate(accs):
        y = epilogue(half, acc).astype(o_ref.dtype).reshape(block_m, num_tiles, 1, _HALF_TILE)
        plgpu.store(o_ref.at[:, :, pl.ds(half, 1), :], y, mask=jnp.broadcast_to(rows[:, None, None, None], y.shape))


def _g128_kernel(x_ref, x_scale_ref, packed_ref, s1_ref, s2_ref, zero_ref, o_ref, *, num_rows, group_size, block_k):
    rows = _valid_rows(x_ref.shape[0], num_rows)

    def widen(k_block, half, codes):
        group = k_block * block_k // group_size
        s2 = _half_columns(s2_ref, half, group).astype(jnp.int32)
        zero = _half_columns(zero_ref, half, group).astype(jnp.int32)
        return (codes * s2 - zero).astype(jnp.int8)

    num_k_blocks = x_ref.shape[1] // block_k
    accs = _accumulate(x_ref, packed_ref, rows, num_k_blocks=num_k_blocks, block_k=block_k, widen=widen)
    x_scale = plgpu.load(x_scale_ref, mask=rows, other=0).astype(jnp.float32)[:, None]

    def epilogue(half, acc):
        return acc.astype(jnp.float32) * x_scale * _half_columns(s1_ref, half).astype(jnp.float32)

    _store(o_ref, rows, accs, epilogue)


def _chn_kernel(x_ref, x_scale_ref, x_sum_ref, packed_ref, scale_ref, zero_ref, o_ref, *, num_rows, block_k):
    rows = _valid_rows(x_ref.shape[0], num_rows)
    accs = _accumulate(
        x_ref,
        packed_ref,
        rows,
        num_k_blocks=x_ref.shape[1] // block_k,
        block_k=block_k,
        widen=lambda k_block, half, codes: codes.astype(jnp.int8),
    )
    x_scale = plgpu.load(x_scale_ref, mask=rows, other=0).astype(jnp.float32)[:, None]
    x_sum = plgpu.load(x_sum_ref, mask=rows, other=0).astype(jnp.float32)[:, None]

    def epilogue(half, acc):
        scale = _half_columns(scale_ref, half).astype(jnp.float32)
        zero = _half_columns(zero_ref, half).astype(jnp.float32)
        return x_scale * (scale * acc.astype(jnp.float32) - zero * x_sum)

    _store(o_ref, rows, accs, epilogue)


def _w4a8_unbatched(kernel, row_operands, packed, column_operands, *, out_dtype, blocks, name, interpret):
    """The one pallas_call: grid (M blocks, N blocks); per-token operands are split by rows, weights by columns.

    Per-channel operands and the output travel in their by_half_tile view, so each nibble half's channels are one
    strided slice of the block."""
    num_rows, num_out = row_operands[0].shape[0], packed.shape[1] * 2
    block_m, block_n = blocks.block_m, blocks.block_n
    tiles_per_block = block_n // PACK_TILE_N

    def by_rows(a):
        return pl.BlockSpec((block_m, *a.shape[1:]), lambda i, j: (i,) + (0,) * (a.ndim - 1))

    def by_columns(a):
        leading = a.shape[:-3]
        return pl.BlockSpec(
            (*leading, tiles_per_block, 2, _HALF_TILE), lambda i, j: (0,) * len(leading) + (j, 0, 0)
        )

    column_operands = [by_half_tile(a) for a in column_operands]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, num_out // PACK_TILE_N, 2, _HALF_TILE), out_dtype),
        grid=(pl.cdiv(num_rows, block_m), num_out // block_n),
        in_specs=[
            *map(by_rows, row_operands),
            pl.BlockSpec((packed.shape[0], block_n // 2), lambda i, j: (0, j)),
            *map(by_columns, column_operands),
        ],
        out_specs=pl.BlockSpec((block_m, tiles_per_block, 2, _HALF_TILE), lambda i, j: (i, j, 0, 0)),
        # Without Triton's CompilerParams jax ≥ 0.10 lowers for Mosaic GPU, which rejects this kernel.
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name=f"{name}_bm{block_m}_bn{block_n}_bk{blocks.block_k}",
    )(*row_operands, packed, *column_operands)
    return out.reshape(num_rows, num_out)


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype", "block_sizes", "interpret"))
def w4a8_gemm_g128(
    x_i8: jax.Array,
    x_scale: jax.Array,
    packed: jax.Array,
    s1: jax.Array,
    s2: jax.Array,
    zero: jax.Array,
    *,
    group_size: int,
    out_dtype=jnp.float16,
    block_sizes: W4A8BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Progressive-group W4A8 GEMM: y = s_x·s1·(X8 @ (q·s2 − z)), int32 accumulation over the whole K.

    x_i8 [M, K] int8, x_scale [M] float, packed [K, N/2] uint8 (layout above), s1 [N] float,
    s2 / zero [K/group_size, N] int8 → [M, N] out_dtype. N and K multiples of 64, group_size a power of two
    that divides K; any M. block_sizes defaults to `W4A8BlockSizes.for_shape`; interpret runs the kernel on CPU.
    """
    num_rows, num_in, num_out = _check_operands(x_i8, x_scale, packed, out_dtype)
    if group_size < 32 or group_size & (group_size - 1) or num_in % group_size:
        raise ValueError(f"group_size must be a power of two ≥ 32 dividing K = {num_in}; got {group_size}")
    _check_operand("s1", s1, (num_out,), jnp.floating)
    _check_operand("s2", s2, (num_in // group_size, num_out), jnp.int8)
    _check_operand("zero", zero, (num_in // group_size, num_out), jnp.int8)
    blocks = block_sizes or W4A8BlockSizes.for_shape(num_rows, num_out, num_in, group_size=group_size)
    if group_size % blocks.block_k:
        raise ValueError(f"the g128 kernel steps within one group: block_k must divide {group_size}; got {blocks}")
    _check_blocks(blocks, num_in, num_out)
    kernel = functools.partial(_g128_kernel, num_rows=num_rows, group_size=group_size, block_k=blocks.block_k)
    return _w4a8_unbatched(
        kernel,
        (x_i8, x_scale),
        packed,
        (s1, s2, zero),
        out_dtype=out_dtype,
        blocks=blocks,
        name=f"w4a8_gemm_g{group_size}",
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def w4a8_gemm_chn(
    x_i8: jax.Array,
    x_scale: jax.Array,
    x_sum: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    *,
    out_dtype=jnp.float16,
    block_sizes: W4A8BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-channel W4A8 GEMM: y = s_x·(s·(X8 @ q) − z·ΣX8), int32 accumulation over the whole K.

    x_i8 [M, K] int8, x_scale [M] float, x_sum [M] int32 (Σ_k x_i8), packed [K, N/2] uint8 (layout above),
    scale / zero [N] float (zero is the scaled zero) → [M, N] out_dtype. N and K multiples of 64; any M.
    block_sizes defaults to `W4A8BlockSizes.for_shape`; interpret runs the kernel on CPU.
    """
    num_rows, num_in, num_out = _check_operands(x_i8, x_scale, packed, out_dtype)
    _check_operand("x_sum", x_sum, (num_rows,), jnp.int32)
    _check_operand("scale", scale, (num_out,), jnp.floating)
    _check_operand("zero", zero, (num_out,), jnp.floating)
    blocks = block_sizes or W4A8BlockSizes.for_shape(num_rows, num_out, num_in)
    _check_blocks(blocks, num_in, num_out)
    kernel = functools.partial(_chn_kernel, num_rows=num_rows, block_k=blocks.block_k)
    return _w4a8_unbatched(
        kernel,
        (x_i8, x_scale, x_sum),
        packed,
        (scale, zero),
        out_dtype=out_dtype,
        blocks=blocks,
        name="w4a8_gemm_chn",
        interpret=interpret,
    )


def _check_operands(x_i8, x_scale, packed, out_dtype) -> tuple[int, int, int]:
    """Validates what both recipes share and returns (M, K, N)."""
    if x_i8.ndim != 2 or packed.ndim != 2:
        raise ValueError(f"x_i8 must be [M, K] and packed [K, N/2]; got {x_i8.shape} and {packed.shape}")
    num_rows, num_in = x_i8.shape
    num_out = packed.shape[1] * 2
    check_packable(num_in, num_out)
    _check_operand("x_i8", x_i8, (num_rows, num_in), jnp.int8)
    _check_operand("packed", packed, (num_in, num_out // 2), jnp.uint8)
    _check_operand("x_scale", x_scale, (num_rows,), jnp.floating)
    if num_rows < 1 or not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"need M ≥ 1 and a floating out_dtype; got M = {num_rows}, out_dtype {out_dtype}")
    return num_rows, num_in, num_out


def _check_operand(name: str, a: jax.Array, shape: tuple[int, ...], dtype) -> None:
    if a.shape != shape or not jnp.issubdtype(a.dtype, dtype):
        expected = getattr(dtype, "__name__", dtype)
        raise ValueError(f"{name} must be {expected} {list(shape)}; got {a.dtype} {list(a.shape)}")


def _check_blocks(blocks: W4A8BlockSizes, num_in: int, num_out: int) -> None:
    if num_out % blocks.block_n or num_in % blocks.block_k:
        raise ValueError(f"block_n / block_k must divide N = {num_out} / K = {num_in}; got {blocks}")


def g128_int8_weights(packed: jax.Array, s2: jax.Array, zero: jax.Array, *, group_size: int) -> jax.Array:
    """W8 = q·s2 − z [K, N] int8, the matrix the progressive GEMM multiplies (computed in int32, then narrowed)."""
    codes = unpack_uint4(packed).astype(jnp.int32)
    s2_rows = jnp.repeat(s2.astype(jnp.int32), group_size, axis=0)
    zero_rows = jnp.repeat(zero.astype(jnp.int32), group_size, axis=0)
    return (codes * s2_rows - zero_rows).astype(jnp.int8)


def w4a8_gemm_g128_reference(
    x_i8: jax.Array,
    x_scale: jax.Array,
    packed: jax.Array,
    s1: jax.Array,
    s2: jax.Array,
    zero: jax.Array,
    *,
    group_size: int,
    out_dtype=jnp.float16,
) -> jax.Array:
    """Progressive-group W4A8 GEMM in plain jnp with the kernel's integer arithmetic.

    x_i8 [M, K] int8, x_scale [M] float32, packed [K, N/2] uint8, s1 [N] float16,
    s2 / zero [K/group_size, N] int8 → [M, N] out_dtype.
    """
    acc = _int8_dot(x_i8, g128_int8_weights(packed, s2, zero, group_size=group_size))
    y = acc.astype(jnp.float32) * x_scale.astype(jnp.float32)[:, None] * s1.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)


def w4a8_gemm_chn_reference(
    x_i8: jax.Array,
    x_scale: jax.Array,
    x_sum: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    *,
    out_dtype=jnp.float16,
) -> jax.Array:
    """Per-channel W4A8 GEMM in plain jnp with the kernel's integer arithmetic.

    x_i8 [M, K] int8, x_scale [M] float32, x_sum [M] int32 (Σ_k x_i8), packed [K, N/2] uint8,
    scale / zero [N] float16 (zero is the scaled zero: ŵ = q·scale − zero) → [M, N] out_dtype.
    """
    acc = _int8_dot(x_i8, unpack_uint4(packed).astype(jnp.int8))
    corrected = (
        scale.astype(jnp.float32)[None, :] * acc.astype(jnp.float32)
        - zero.astype(jnp.float32)[None, :] * x_sum.astype(jnp.float32)[:, None]
    )
    return (x_scale.astype(jnp.float32)[:, None] * corrected).astype(out_dtype)


def _int8_dot(x_i8: jax.Array, w_i8: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x_i8, w_i8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
