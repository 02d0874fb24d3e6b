"""W4A8 GEMM: Pallas kernels against their jnp references, the references against float64, the packed layout,
input validation, and the CUDA (Triton) lowering of every M bucket checked on CPU.

The kernel suite runs twice: `TestW4A8Gemm` with the real kernels (GPU only) and `TestW4A8GemmInterpret` in
Pallas interpret mode (CPU). Every test draws fresh random data; the seed is in the failure message.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cuda_lowering import lower_for_cuda, triton_module_text
from seeding import seeded_rng
from suite_guard import assert_every_test_ran_and_passed

from pallas_kernels.w4a8_gemm import (
    W4A8BlockSizes,
    pack_uint4,
    unpack_uint4,
    w4a8_gemm_chn,
    w4a8_gemm_chn_reference,
    w4a8_gemm_g128,
    w4a8_gemm_g128_reference,
)

ON_GPU = jax.default_backend() == "gpu"
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (jax.default_backend() != 'gpu')")


def _activations(rng, m, k):
    """int8 activations over the full range, with the extreme rows that maximise |acc| when there is room."""
    x = rng.integers(-128, 128, (m, k))
    if m > 2:
        x[0], x[-1] = 127, -128
    x_scale = rng.uniform(1e-3, 5e-2, m)
    return jnp.asarray(x, jnp.int8), jnp.asarray(x_scale, jnp.float32)


def g128_operands(rng, m, n, k, group_size, *, unit_scales=False):
    """Operands of the progressive recipe with |q·s2 − z| ≤ 105, inside QoQ's protective range."""
    x, x_scale = _activations(rng, m, k)
    codes = rng.integers(0, 16, (k, n))
    s2 = rng.integers(1, 8, (k // group_size, n))
    zero = rng.integers(0, 16, (k // group_size, n)) * s2
    s1 = rng.uniform(1e-3, 2e-2, n)
    if unit_scales:
        x_scale, s1 = np.ones(m), np.ones(n)
    return dict(
        x_i8=x,
        x_scale=jnp.asarray(x_scale, jnp.float32),
        packed=pack_uint4(codes),
        s1=jnp.asarray(s1, jnp.float16),
        s2=jnp.asarray(s2, jnp.int8),
        zero=jnp.asarray(zero, jnp.int8),
    ), codes


def chn_operands(rng, m, n, k, *, unit_scales=False):
    x, x_scale = _activations(rng, m, k)
    codes = rng.integers(0, 16, (k, n))
    scale = rng.uniform(1e-3, 2e-2, n)
    zero = scale * rng.uniform(0, 15, n)
    if unit_scales:
        x_scale, scale, zero = np.ones(m), np.ones(n), np.zeros(n)
    return dict(
        x_i8=x,
        x_scale=jnp.asarray(x_scale, jnp.float32),
        x_sum=jnp.sum(x.astype(jnp.int32), axis=1),
        packed=pack_uint4(codes),
        scale=jnp.asarray(scale, jnp.float16),
        zero=jnp.asarray(zero, jnp.float16),
    ), codes


def assert_within_rounding(actual, expected, dtype, message):
    """Equal up to one rounding step of `dtype` (plus float32 noise where the per-channel terms cancel)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.isfinite(actual).all(), message
    tolerance = jnp.finfo(dtype).eps * np.abs(expected) + 1e-5 * np.abs(expected).max()
    worst = np.max(np.abs(actual - expected) - tolerance)
    assert worst <= 0, f"{message}: beyond rounding by {worst}"


# (M, N, K, group_size): M not a multiple of the block, N with one, two and three 64-channel tiles.
G128_CASES = [(1, 64, 64, 64), (5, 192, 256, 64), (33, 128, 128, 128), (100, 128, 256, 128)]
CHN_CASES = [(1, 128, 64), (16, 64, 256), (33, 192, 256)]
# Tiles other than the defaults: several M blocks with a ragged last one, two packed tiles per N block.
SMALL_BLOCKS = W4A8BlockSizes(block_m=16, block_n=128, block_k=64, num_warps=4, num_stages=2)


class TestW4A8Gemm:
    """Kernel against reference on small shapes; the real kernels, so GPU only (see the interpret subclass)."""

    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _backend(self):
        if not self.INTERPRET and not ON_GPU:
            pytest.skip("the real Pallas Triton kernels need a GPU; TestW4A8GemmInterpret runs them on CPU")

    @pytest.mark.parametrize("m, n, k, group_size", G128_CASES)
    def test_g128_accumulator_is_exact(self, m, n, k, group_size):
        rng, seed = seeded_rng()
        operands, _ = g128_operands(rng, m, n, k, group_size, unit_scales=True)
        actual = w4a8_gemm_g128(**operands, group_size=group_size, out_dtype=jnp.float32, interpret=self.INTERPRET)
        expected = w4a8_gemm_g128_reference(**operands, group_size=group_size, out_dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=f"seed {seed}")

    @pytest.mark.parametrize("m, n, k", CHN_CASES)
    def test_chn_accumulator_is_exact(self, m, n, k):
        rng, seed = seeded_rng()
        operands, _ = chn_operands(rng, m, n, k, unit_scales=True)
        actual = w4a8_gemm_chn(**operands, out_dtype=jnp.float32, interpret=self.INTERPRET)
        expected = w4a8_gemm_chn_reference(**operands, out_dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=f"seed {seed}")

    @pytest.mark.parametrize(
        "m, n, k, group_size, out_dtype, blocks",
        [
            (5, 128, 256, 128, jnp.float16, None),
            (33, 192, 128, 64, jnp.bfloat16, None),
            (100, 128, 256, 128, jnp.float16, SMALL_BLOCKS),  # two K steps per group
        ],
    )
    def test_g128_output(self, m, n, k, group_size, out_dtype, blocks):
        rng, seed = seeded_rng()
        operands, _ = g128_operands(rng, m, n, k, group_size)
        kwargs = dict(group_size=group_size, out_dtype=out_dtype)
        actual = w4a8_gemm_g128(**operands, **kwargs, block_sizes=blocks, interpret=self.INTERPRET)
        assert actual.dtype == out_dtype and actual.shape == (m, n)
        expected = w4a8_gemm_g128_reference(**operands, **kwargs)
        assert_within_rounding(actual, expected, out_dtype, f"seed {seed}")

    @pytest.mark.parametrize(
        "m, n, k, out_dtype, blocks",
        [
            (1, 192, 128, jnp.bfloat16, None),
            (33, 128, 256, jnp.float16, None),
            (100, 128, 128, jnp.bfloat16, SMALL_BLOCKS),
        ],
    )
    def test_chn_output(self, m, n, k, out_dtype, blocks):
        rng, seed = seeded_rng()
        operands, _ = chn_operands(rng, m, n, k)
        actual = w4a8_gemm_chn(**operands, out_dtype=out_dtype, block_sizes=blocks, interpret=self.INTERPRET)
        assert actual.dtype == out_dtype and actual.shape == (m, n)
        expected = w4a8_gemm_chn_reference(**operands, out_dtype=out_dtype)
        assert_within_rounding(actual, expected, out_dtype, f"seed {seed}")


class TestW4A8GemmInterpret(TestW4A8Gemm):
    INTERPRET = True


def test_interpret_suite_is_not_skipped(request):
    """The CPU suite must really run the kernel tests, not only collect them: every test of the interpret class
    ran before this one and passed (a misplaced skip, or INTERPRET turned off, would silently drop them)."""
    assert_every_test_ran_and_passed(request, TestW4A8GemmInterpret)


@requires_gpu
class TestW4A8GemmOnGpu:
    """The real kernels at a Llama-sized shape with the default tiles of every M bucket."""

    @pytest.mark.parametrize("m", [1, 16, 64, 256, 1024, 4096])
    def test_g128_default_tiles(self, m):
        rng, seed = seeded_rng()
        operands, _ = g128_operands(rng, m, 4096, 4096, 128)
        actual = w4a8_gemm_g128(**operands, group_size=128)
        expected = w4a8_gemm_g128_reference(**operands, group_size=128)
        assert_within_rounding(actual, expected, jnp.float16, f"seed {seed}")

    @pytest.mark.parametrize("m", [1, 16, 64, 256, 1024, 4096])
    def test_chn_default_tiles(self, m):
        rng, seed = seeded_rng()
        operands, _ = chn_operands(rng, m, 4096, 4096)
        actual = w4a8_gemm_chn(**operands)
        expected = w4a8_gemm_chn_reference(**operands)
        assert_within_rounding(actual, expected, jnp.float16, f"seed {seed}")


# --- the references against float64 -------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_g128_reference_matches_float64(out_dtype):
    rng, seed = seeded_rng()
    operands, codes = g128_operands(rng, 7, 128, 256, 64)
    s2 = np.repeat(np.asarray(operands["s2"], np.float64), 64, axis=0)
    zero = np.repeat(np.asarray(operands["zero"], np.float64), 64, axis=0)
    x = np.asarray(operands["x_i8"], np.float64)
    x_scale, s1 = (np.asarray(operands[name], np.float64) for name in ("x_scale", "s1"))
    expected = x_scale[:, None] * s1[None, :] * (x @ (codes * s2 - zero))
    actual = w4a8_gemm_g128_reference(**operands, group_size=64, out_dtype=out_dtype)
    assert_within_rounding(actual, expected, out_dtype, f"seed {seed}")


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_chn_reference_matches_float64(out_dtype):
    """y = s_x·X8 @ (q·s − z): the dequantized weights, so the ΣX8 correction is checked, not restated."""
    rng, seed = seeded_rng()
    operands, codes = chn_operands(rng, 9, 192, 128)
    x = np.asarray(operands["x_i8"], np.float64)
    x_scale, scale, zero = (np.asarray(operands[name], np.float64) for name in ("x_scale", "scale", "zero"))
    expected = x_scale[:, None] * (x @ (codes * scale[None, :] - zero[None, :]))
    actual = w4a8_gemm_chn_reference(**operands, out_dtype=out_dtype)
    assert_within_rounding(actual, expected, out_dtype, f"seed {seed}")


# --- the packed layout --------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.sampled_from([64, 128]), st.sampled_from([64, 128, 192, 256])),
        elements=st.integers(0, 15),
    )
)
def test_pack_unpack_round_trip(codes):
    packed = pack_uint4(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (codes.shape[0], codes.shape[1] // 2)
    np.testing.assert_array_equal(np.asarray(unpack_uint4(packed)), codes)


def test_packed_layout_pairs_channels_32_apart():
    rng, seed = seeded_rng()
    codes = rng.integers(0, 16, (64, 192))
    packed = np.asarray(pack_uint4(codes))
    for tile in range(3):
        for j in (0, 17, 31):
            byte = packed[:, tile * 32 + j]
            np.testing.assert_array_equal(byte & 15, codes[:, tile * 64 + j], err_msg=f"seed {seed}")
            np.testing.assert_array_equal(byte >> 4, codes[:, tile * 64 + 32 + j], err_msg=f"seed {seed}")


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (64,)])
def test_pack_refuses_unpackable_shapes(shape):
    with pytest.raises(ValueError, match="64|\\[K, N\\]"):
        pack_uint4(np.zeros(shape, np.uint8))


def test_unpack_refuses_wrong_dtype_or_width():
    with pytest.raises(ValueError, match="uint8"):
        unpack_uint4(jnp.zeros((64, 32), jnp.int8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_uint4(jnp.zeros((64, 48), jnp.uint8))


# --- validation ---------------------------------------------------------------------------------------------


def _replace(operands, **changes):
    return {**operands, **changes}


def test_g128_refuses_malformed_inputs():
    rng, _ = seeded_rng()
    good, _ = g128_operands(rng, 4, 128, 256, 128)
    bad_inputs = [
        (_replace(good, packed=jnp.zeros((256, 48), jnp.uint8)), 128, "multiples of 64"),
        (_replace(good, x_i8=good["x_i8"].astype(jnp.int16)), 128, "x_i8 must be int8"),
        (_replace(good, packed=good["packed"].astype(jnp.int8)), 128, "packed must be uint8"),
        (_replace(good, x_scale=good["x_scale"][:3]), 128, "x_scale"),
        (_replace(good, s2=good["s2"].astype(jnp.int16)), 128, "s2 must be int8"),
        (_replace(good, zero=good["zero"][:1]), 128, "zero must be int8"),
        (_replace(good, s1=jnp.ones(128, jnp.int32)), 128, "s1 must be floating"),
        (good, 96, "group_size"),
        (_replace(good, x_i8=jnp.zeros((4, 192), jnp.int8), packed=jnp.zeros((192, 64), jnp.uint8)), 128, "192"),
    ]
    g64, _ = g128_operands(rng, 4, 128, 256, 64)
    for operands, group_size, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            w4a8_gemm_g128(**operands, group_size=group_size, interpret=True)
    with pytest.raises(ValueError, match="block_k must divide 64"):
        w4a8_gemm_g128(**g64, group_size=64, block_sizes=dataclasses.replace(SMALL_BLOCKS, block_k=128), interpret=True)


def test_chn_refuses_malformed_inputs():
    rng, _ = seeded_rng()
    good, _ = chn_operands(rng, 4, 192, 128)
    bad_inputs = [
        (_replace(good, x_i8=jnp.zeros((4, 160), jnp.int8), packed=jnp.zeros((160, 96), jnp.uint8)), "160"),
        (_replace(good, x_sum=good["x_sum"].astype(jnp.float32)), "x_sum must be int32"),
        (_replace(good, scale=good["scale"][:64]), "scale"),
        (_replace(good, x_i8=good["x_i8"][:, :64]), "packed"),
    ]
    for operands, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            w4a8_gemm_chn(**operands, interpret=True)
    with pytest.raises(ValueError, match="block_n / block_k must divide"):
        w4a8_gemm_chn(**good, block_sizes=SMALL_BLOCKS, interpret=True)


def test_block_sizes_refuse_shapes_triton_cannot_load():
    with pytest.raises(ValueError, match="powers of two"):
        W4A8BlockSizes(block_m=24, block_n=64, block_k=64, num_warps=4, num_stages=3)
    with pytest.raises(ValueError, match="block_n ≥ 64"):
        W4A8BlockSizes(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=3)


@pytest.mark.parametrize("compute_capability", [8.0, 9.0])
def test_default_tiles_divide_the_shape(compute_capability):
    for m in (1, 16, 64, 256, 1024, 4096):
        for n, k in ((4096, 4096), (1536, 576), (576, 1536), (28672, 4096)):
            blocks = W4A8BlockSizes.for_shape(m, n, k, compute_capability=compute_capability)
            assert n % blocks.block_n == 0 and k % blocks.block_k == 0, (m, n, k, blocks)
            grouped = W4A8BlockSizes.for_shape(m, n, k, group_size=64, compute_capability=compute_capability)
            assert 64 % grouped.block_k == 0, (m, n, k, grouped)


def test_hopper_tiles_give_each_dot_128_columns_from_m_128():
    """On sm_90 the prefill buckets take 256-channel blocks: each nibble half's dot is 128 wide (wgmma n128)."""
    for m in (128, 256, 1024, 4096):
        assert W4A8BlockSizes.for_shape(m, 4096, 4096, group_size=128, compute_capability=9.0).block_n == 256
        assert W4A8BlockSizes.for_shape(m, 4096, 4096, group_size=128, compute_capability=8.0).block_n == 128


# --- the CUDA lowering, checked on CPU ----------------------------------------------------------------------

LOWERING_MS = [1, 16, 64, 256, 1024, 4096]
# (N, K, group_size): a Llama-3-8B projection and SmolLM2-135M's MLP (K = 576 takes groups of 64).
LOWERING_SHAPES = [(4096, 4096, 128), (1536, 576, 64), (576, 1536, 128)]


def _check_triton_lowering(lowered, blocks: W4A8BlockSizes, name: str):
    assert "__gpu$xla.gpu.triton" in lowered.as_text()
    module = triton_module_text(lowered)
    assert f"@{name}_bm{blocks.block_m}_bn{blocks.block_n}_bk{blocks.block_k}" in module
    dots = re.findall(r"tt\.dot .*: tensor<(\d+)x(\d+)xi8> \* tensor<(\d+)x(\d+)xi8> -> tensor<\d+x\d+xi32>", module)
    # Two int8 dots per K step (low and high nibbles), each half the N block wide; none in float.
    assert len(dots) == 2
    half = blocks.block_n // 2
    assert {tuple(map(int, dot)) for dot in dots} == {(blocks.block_m, blocks.block_k, blocks.block_k, half)}


@pytest.mark.parametrize("n, k, group_size", LOWERING_SHAPES)
@pytest.mark.parametrize("m", LOWERING_MS)
def test_g128_lowers_for_cuda(m, n, k, group_size):
    lowered = lower_for_cuda(
        lambda *args: w4a8_gemm_g128(*args, group_size=group_size),
        ((m, k), jnp.int8),
        ((m,), jnp.float32),
        ((k, n // 2), jnp.uint8),
        ((n,), jnp.float16),
        ((k // group_size, n), jnp.int8),
        ((k // group_size, n), jnp.int8),
    )
    blocks = W4A8BlockSizes.for_shape(m, n, k, group_size=group_size)
    _check_triton_lowering(lowered, blocks, f"w4a8_gemm_g{group_size}")


@pytest.mark.parametrize("n, k, group_size", LOWERING_SHAPES)
@pytest.mark.parametrize("m", LOWERING_MS)
def test_chn_lowers_for_cuda(m, n, k, group_size):
    lowered = lower_for_cuda(
        lambda *args: w4a8_gemm_chn(*args, out_dtype=jnp.bfloat16),
        ((m, k), jnp.int8),
        ((m,), jnp.float32),
        ((m,), jnp.int32),
        ((k, n // 2), jnp.uint8),
        ((n,), jnp.float16),
        ((n,), jnp.float16),
    )
    _check_triton_lowering(lowered, W4A8BlockSizes.for_shape(m, n, k), "w4a8_gemm_chn")
