"""W4A8 GEMM: int8 activations × 4-bit weights on int8 tensor cores, and the packed uint4 layout they share.

Packed layout (the one place it is defined; calibration writes it, the kernels and references read it)
------------------------------------------------------------------------------------------------------
Weights are stored in the model's [K (in), N (out)] orientation as uint8 `packed` [K, N/2]. Output channels
come in tiles of `PACK_TILE_N` = 64; inside tile t, byte column t·32 + j holds

    low nibble  = code of output channel t·64 + j
    high nibble = code of output channel t·64 + 32 + j          (j in 0..31)

so a kernel that loads a [block_k, 32] slab of bytes gets two [block_k, 32] int8 weight tiles with one mask
and one shift (`b & 15`, `b >> 4`), each feeding its own dot into its own 32 output columns: no interleave,
no concatenate (which the Pallas Triton lowering rejects off the last axis). QServe pairs rows o and o+16 of a
32×32 MMA tile for the same reason.

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
K in `block_k` steps (one group for g128), unpacking each [block_k, 32] byte slab on int32 (Triton has no
arithmetic on 8-bit types) and running one int8 × int8 → int32 `jnp.dot` per half tile; partial sums are never
dequantized. Rows past M are masked on load and store, so M is free; N and K are multiples of 64. Tiles come
from `W4A8BlockSizes.for_shape` per M bucket. The `*_reference` functions at the bottom are the same
arithmetic in plain jnp.
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
    multiple of the 64-channel packed tile (each tile is two 32-column dots); the g128 kernel needs
    block_k == group_size so that each step reads one row of s2 / zero. All three are powers of two because
    Triton loads are; block_m ≥ 16 and block_k ≥ 32 because that is the smallest int8 `tt.dot`.
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
    def for_shape(cls, m: int, n: int, k: int, *, group_size: int | None = None) -> W4A8BlockSizes:
        """The default tiles for an [m, k] @ [k, n] product: the M bucket's entry, shrunk to divide n and k.

        The buckets follow QServe's CTA tiles (narrow tiles for decode so that N alone fills the GPU, 128-row
        tiles for prefill); they are starting points that have not been tuned on a GPU.
        """
        bucket = next(blocks for bound, blocks in _M_BUCKETS if m <= bound)
        block_k = group_size if group_size is not None else _largest_dividing(bucket.block_k, k)
        return dataclasses.replace(bucket, block_n=_largest_dividing(bucket.block_n, n), block_k=block_k)


# (largest M, tiles) per bucket, from decode (M ≤ 16) to prefill (M > 1024).
_M_BUCKETS = (
    (16, W4A8BlockSizes(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)),
    (64, W4A8BlockSizes(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4)),
    (256, W4A8BlockSizes(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)),
    (1024, W4A8BlockSizes(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
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


def _accumulate(x_ref, packed_ref, rows, *, num_k_blocks: int, block_k: int, widen):
    """Σ_K X8 @ W8 in int32, one [block_m, 32] accumulator per half tile (column i·32 of the output block).

    `widen(k_block, column, codes)` turns the int32 codes 0..15 of a [block_k, 32] half tile into its int8 weights.
    The packed bytes are unpacked on int32 (Triton rejects arithmetic on 8-bit types) and each half tile is its
    own dot, so nothing is sliced or concatenated after loading.
    """
    block_m = x_ref.shape[0]
    num_tiles = packed_ref.shape[1] // _HALF_TILE

    def step(k_block, accs):
        k_slice = pl.ds(k_block * block_k, block_k)
        x = plgpu.load(x_ref.at[:, k_slice], mask=rows[:, None], other=0)
        out = list(accs)
        for tile in range(num_tiles):
            packed = packed_ref[k_slice, pl.ds(tile * _HALF_TILE, _HALF_TILE)].astype(jnp.int32)
            for half, codes in enumerate((packed & 15, packed >> 4)):
                i = 2 * tile + half  # output columns [i·32, i·32 + 32) of the block
                w_i8 = widen(k_block, i * _HALF_TILE, codes)
                out[i] += jnp.dot(x, w_i8, preferred_element_type=jnp.int32)
        return tuple(out)

    zeros = tuple(jnp.zeros((block_m, _HALF_TILE), jnp.int32) for _ in range(2 * num_tiles))
    return jax.lax.fori_loop(0, num_k_blocks, step, zeros)


def _store(o_ref, rows, accs, epilogue) -> None:
    """Writes `epilogue(columns, acc)` of every half-tile accumulator, skipping the rows past M."""
    for i, acc in enumerate(accs):
        columns = pl.ds(i * _HALF_TILE, _HALF_TILE)
        plgpu.store(o_ref.at[:, columns], epilogue(columns, acc).astype(o_ref.dtype), mask=rows[:, None])


def _g128_kernel(x_ref, x_scale_ref, packed_ref, s1_ref, s2_ref, zero_ref, o_ref, *, num_rows, group_size):
    rows = _valid_rows(x_ref.shape[0], num_rows)

    def widen(k_block, column, codes):
        columns = pl.ds(column, _HALF_TILE)
        s2 = s2_ref[pl.ds(k_block, 1), columns].astype(jnp.int32)
        zero = zero_ref[pl.ds(k_block, 1), columns].astype(jnp.int32)
        return (codes * s2 - zero).astype(jnp.int8)

    accs = _accumulate(x_ref, packed_ref, rows, num_k_blocks=s2_ref.shape[0], block_k=group_size, widen=widen)
    x_scale = plgpu.load(x_scale_ref, mask=rows, other=0).astype(jnp.float32)[:, None]

    def epilogue(columns, acc):
        return acc.astype(jnp.float32) * x_scale * s1_ref[columns].astype(jnp.float32)[None, :]

    _store(o_ref, rows, accs, epilogue)


def _chn_kernel(x_ref, x_scale_ref, x_sum_ref, packed_ref, scale_ref, zero_ref, o_ref, *, num_rows, block_k):
    rows = _valid_rows(x_ref.shape[0], num_rows)
    accs = _accumulate(
        x_ref,
        packed_ref,
        rows,
        num_k_blocks=x_ref.shape[1] // block_k,
        block_k=block_k,
        widen=lambda k_block, column, codes: codes.astype(jnp.int8),
    )
    x_scale = plgpu.load(x_scale_ref, mask=rows, other=0).astype(jnp.float32)[:, None]
    x_sum = plgpu.load(x_sum_ref, mask=rows, other=0).astype(jnp.float32)[:, None]

    def epilogue(columns, acc):
        scale = scale_ref[columns].astype(jnp.float32)[None, :]
        zero = zero_ref[columns].astype(jnp.float32)[None, :]
        return x_scale * (scale * acc.astype(jnp.float32) - zero * x_sum)

    _store(o_ref, rows, accs, epilogue)


def _w4a8_unbatched(kernel, row_operands, packed, column_operands, *, out_dtype, blocks, name, interpret):
    """The one pallas_call: grid (M blocks, N blocks); per-token operands are split by rows, weights by columns."""
    num_rows, num_out = row_operands[0].shape[0], packed.shape[1] * 2
    block_m, block_n = blocks.block_m, blocks.block_n

    def by_rows(a):
        return pl.BlockSpec((block_m, *a.shape[1:]), lambda i, j: (i,) + (0,) * (a.ndim - 1))

    def by_columns(a, width):
        return pl.BlockSpec((*a.shape[:-1], width), lambda i, j: (0,) * (a.ndim - 1) + (j,))

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, num_out), out_dtype),
        grid=(pl.cdiv(num_rows, block_m), num_out // block_n),
        in_specs=[
            *map(by_rows, row_operands),
            by_columns(packed, block_n // 2),
            *(by_columns(a, block_n) for a in column_operands),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        # Without Triton's CompilerParams jax ≥ 0.10 lowers for Mosaic GPU, which rejects this kernel.
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name=f"{name}_bm{block_m}_bn{block_n}_bk{blocks.block_k}",
    )(*row_operands, packed, *column_operands)


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
    if blocks.block_k != group_size:
        raise ValueError(f"the g128 kernel steps one group at a time: block_k must be {group_size}; got {blocks}")
    _check_blocks(blocks, num_in, num_out)
    kernel = functools.partial(_g128_kernel, num_rows=num_rows, group_size=group_size)
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
