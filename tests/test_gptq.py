"""Weight-quantization kernels: Hessian accumulation, GPTQ against RTN, static groups, and the clip search."""

from __future__ import annotations

import numpy as np
import pytest

from converters.gptq import (
    CLIP_RATIOS,
    HessianAccumulator,
    accumulate_hessian,
    channel_scale_zero,
    clip_ratio_errors,
    dequantize,
    gptq_quantize,
    rtn_quantize,
    search_clip_ratios,
    strided_token_sample,
)

PROTECTIVE_RANGE = 119.0


def correlated_inputs(rng, tokens, in_features):
    """X = Z·A: a Hessian far from diagonal, so GPTQ's error feedback has something to exploit."""
    mixing = rng.standard_normal((in_features, in_features)) / np.sqrt(in_features)
    return (rng.standard_normal((tokens, in_features)) @ mixing).astype(np.float32)


def weights_with_outliers(rng, out_features, in_features):
    w = rng.standard_normal((out_features, in_features))
    outliers = rng.choice(in_features, size=max(1, in_features // 32), replace=False)
    w[:, outliers] *= 8.0
    return w.astype(np.float32)


def hessian_of(x):
    return (2.0 / x.shape[0]) * x.T.astype(np.float32) @ x.astype(np.float32)


def minmax_grid(w, group_size):
    """fp16 scale and scaled zero of each group's own [min, max] (qoq-gchn's grid when group = in)."""
    groups = w.reshape(w.shape[0], -1, group_size)
    vmin, vmax = groups.min(axis=2), groups.max(axis=2)
    scale = ((vmax - vmin) / 15).astype(np.float16).astype(np.float32)
    zero = (-vmin).astype(np.float16).astype(np.float32)
    return scale, zero


def progressive_level1(w):
    """qoq-g128 level 1: U = clamp(W/s1, −P, P) with s1 = fp16(max|w|/P) per row."""
    s1 = (np.abs(w).max(axis=1, keepdims=True) / PROTECTIVE_RANGE).astype(np.float16).astype(np.float32)
    return s1, np.clip(w / s1, -PROTECTIVE_RANGE, PROTECTIVE_RANGE)


def progressive_grid(u, group_size):
    """qoq-g128 level 2: integer s2 in 1..16 and integer zero per group of U."""
    groups = u.reshape(u.shape[0], -1, group_size)
    vmin, vmax = groups.min(axis=2), groups.max(axis=2)
    scale = np.maximum(np.round((vmax - vmin) / 15), 1).astype(np.float32)
    zero = np.round(-vmin).astype(np.float32)
    return scale, zero


def output_error(x, w, w_hat):
    diff = x.astype(np.float64) @ (w.astype(np.float64) - np.asarray(w_hat, np.float64)).T
    return float(np.sum(diff * diff))


def test_hessian_accumulates_chunks_of_any_shape(rng):
    x = rng.standard_normal((1300, 48)).astype(np.float32)
    acc = HessianAccumulator.zeros(48)
    acc = accumulate_hessian(acc, x[:700])
    acc = accumulate_hessian(acc, x[700:1000].reshape(3, 100, 48))
    acc = accumulate_hessian(acc, x[1000:])
    expected = (2.0 / 1300) * x.astype(np.float64).T @ x
    assert int(acc.num_tokens) == 1300
    np.testing.assert_allclose(np.asarray(acc.hessian()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [256, 32, 64, 128])
def test_gptq_beats_rtn_on_layer_output(rng, group_size):
    x = correlated_inputs(rng, 1024, 256)
    w = weights_with_outliers(rng, 64, 256)
    scale, zero = minmax_grid(w, group_size)
    gptq, factorized = gptq_quantize(w, hessian_of(x), scale, zero, group_size)
    assert factorized
    rtn = rtn_quantize(w, scale, zero, group_size)
    gptq_error = output_error(x, w, dequantize(gptq, scale, zero, group_size))
    rtn_error = output_error(x, w, dequantize(rtn, scale, zero, group_size))
    assert gptq_error < 0.8 * rtn_error


@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_beats_rtn_on_progressive_level1_with_clip(rng, group_size):
    x = correlated_inputs(rng, 1024, 256)
    w = weights_with_outliers(rng, 64, 256)
    s1, u = progressive_level1(w)
    scale, zero = progressive_grid(u, group_size)
    assert scale.min() >= 1 and scale.max() <= 16
    kwargs = dict(group_size=group_size, clip=PROTECTIVE_RANGE)
    gptq = np.asarray(gptq_quantize(u, hessian_of(x), scale, zero, **kwargs)[0])
    rtn = np.asarray(rtn_quantize(u, scale, zero, **kwargs))
    for codes in (gptq, rtn):
        w8 = np.asarray(dequantize(codes, scale, zero, group_size))
        assert np.array_equal(w8, np.round(w8)) and np.abs(w8).max() <= 127
    gptq_error = output_error(x, w, s1 * np.asarray(dequantize(gptq, scale, zero, group_size)))
    rtn_error = output_error(x, w, s1 * np.asarray(dequantize(rtn, scale, zero, group_size)))
    assert gptq_error < 0.8 * rtn_error


def test_codes_are_uint4(rng):
    x = correlated_inputs(rng, 512, 256)
    w = weights_with_outliers(rng, 64, 256)
    scale, zero = minmax_grid(w, 32)
    codes = np.asarray(gptq_quantize(w, hessian_of(x), scale, zero, 32)[0])
    assert codes.dtype == np.uint8 and codes.shape == w.shape and codes.max() <= 15


def test_identity_hessian_without_act_order_is_rtn(rng):
    """160 columns: also checks that the padding to whole 128-column blocks leaks nothing."""
    w = weights_with_outliers(rng, 48, 160)
    scale, zero = minmax_grid(w, 32)
    gptq, _ = gptq_quantize(w, 3.0 * np.eye(160, dtype=np.float32), scale, zero, 32, act_order=False)
    np.testing.assert_array_equal(np.asarray(gptq), np.asarray(rtn_quantize(w, scale, zero, 32)))


def test_act_order_keeps_static_groups(rng):
    """A diagonal Hessian sends no error, so act-order GPTQ is RTN exactly when every column keeps the
    grid of its original group; the groups' grids differ widely so a permuted assignment would show."""
    w = weights_with_outliers(rng, 64, 256) * rng.uniform(0.1, 10.0, size=(1, 8)).repeat(32, axis=1)
    scale, zero = minmax_grid(w, 32)
    hessian = np.diag(rng.uniform(0.1, 10.0, size=256)).astype(np.float32)
    gptq, _ = gptq_quantize(w, hessian, scale, zero, 32, act_order=True)
    np.testing.assert_array_equal(np.asarray(gptq), np.asarray(rtn_quantize(w, scale, zero, 32)))


def test_dead_columns_quantize_zero(rng):
    x = correlated_inputs(rng, 512, 256)
    dead = rng.choice(256, size=5, replace=False)
    x[:, dead] = 0.0
    w = weights_with_outliers(rng, 64, 256)
    scale, zero = minmax_grid(w, 64)
    codes = np.asarray(gptq_quantize(w, hessian_of(x), scale, zero, 64)[0])
    zero_codes = np.asarray(rtn_quantize(np.zeros_like(w), scale, zero, 64))
    np.testing.assert_array_equal(codes[:, dead], zero_codes[:, dead])
    w_hat = np.asarray(dequantize(codes, scale, zero, 64))
    column_scale = np.repeat(scale, 64, axis=1)
    assert np.all(np.abs(w_hat[:, dead]) <= 0.5 * column_scale[:, dead] + 1e-6)


def test_rank_deficient_hessian(rng):
    """Fewer tokens than inputs: H is singular and only the damping makes it invertible."""
    x = correlated_inputs(rng, 40, 256)
    w = weights_with_outliers(rng, 64, 256)
    scale, zero = minmax_grid(w, 128)
    codes = np.asarray(gptq_quantize(w, hessian_of(x), scale, zero, 128)[0])
    rtn = np.asarray(rtn_quantize(w, scale, zero, 128))
    assert codes.max() <= 15
    assert output_error(x, w, dequantize(codes, scale, zero, 128)) < output_error(
        x, w, dequantize(rtn, scale, zero, 128)
    )


def test_indefinite_hessian_takes_the_retry_path(rng):
    """One eigenvalue at −1.5% of mean(diag H): the 1% damping fails and the 0.1% retries must take over.
    The result must then be GPTQ for a positive definite damped H (it beats RTN on it)."""
    x = correlated_inputs(rng, 512, 256)
    eigvals, eigvecs = np.linalg.eigh(hessian_of(x).astype(np.float64))
    eigvals[0] = -0.015 * np.mean(eigvals)
    hessian = (eigvecs * eigvals) @ eigvecs.T
    mean_diag = np.mean(np.diag(hessian))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(hessian + 0.01 * mean_diag * np.eye(256))
    w = weights_with_outliers(rng, 64, 256)
    scale, zero = minmax_grid(w, 32)
    codes, factorized = gptq_quantize(w, hessian.astype(np.float32), scale, zero, 32)
    codes = np.asarray(codes)
    assert factorized, "the retries should have made it positive definite"
    rtn = np.asarray(rtn_quantize(w, scale, zero, 32))
    assert codes.max() <= 15
    damped = hessian + 0.03 * mean_diag * np.eye(256)

    def damped_error(codes):
        diff = w - np.asarray(dequantize(codes, scale, zero, 32), np.float64)
        return float(np.einsum("oi,ij,oj->", diff, damped, diff))

    assert damped_error(codes) < damped_error(rtn)


@pytest.mark.parametrize("broken", ["negative definite", "NaN activations"])
def test_a_hessian_no_damping_fixes_is_reported_not_cast_to_codes(rng, broken):
    """After MAX_CHOLESKY_TRIES dampings the factor is still NaN: GPTQ says so instead of returning the NaN
    codes cast to uint8."""
    w = weights_with_outliers(rng, 64, 128)
    scale, zero = minmax_grid(w, 32)
    hessian = -np.eye(128, dtype=np.float32) if broken == "negative definite" else hessian_of(
        np.where(np.arange(128) == 7, np.nan, correlated_inputs(rng, 256, 128))
    )
    _, factorized = gptq_quantize(w, hessian, scale, zero, 32)
    assert not bool(factorized)


def test_channel_scale_zero_per_channel_ratio(rng):
    w = rng.standard_normal((6, 40)).astype(np.float32)
    ratios = rng.choice(CLIP_RATIOS, size=6)
    scale, zero = (np.asarray(a) for a in channel_scale_zero(w, ratios))
    vmin = w.min(axis=1) * ratios.astype(np.float32)
    vmax = w.max(axis=1) * ratios.astype(np.float32)
    # XLA may divide by 15 as a multiplication by 1/15: one fp16 rounding step apart at most.
    np.testing.assert_array_max_ulp(
        scale.astype(np.float16), ((vmax - vmin) / np.float32(15)).astype(np.float16), maxulp=1
    )
    np.testing.assert_array_equal(zero, (-vmin).astype(np.float16).astype(np.float32))


def test_strided_token_sample(rng):
    x = rng.standard_normal((4096, 3)).astype(np.float32)
    sample = np.asarray(strided_token_sample(x))
    assert sample.shape == (512, 3)
    for block in range(8):
        np.testing.assert_array_equal(sample[64 * block : 64 * (block + 1)], x[512 * block : 512 * block + 64])
    np.testing.assert_array_equal(np.asarray(strided_token_sample(x[:300])), x[:300])


def brute_force_clip_errors(w, x):
    """float64 objective per (ratio, channel); the range and rounding follow the reference's float32."""
    errors = np.empty((len(CLIP_RATIOS), w.shape[0]))
    for k, ratio in enumerate(CLIP_RATIOS):
        r = np.float32(ratio)
        vmin, vmax = w.min(axis=1) * r, w.max(axis=1) * r
        scale = ((vmax - vmin) / np.float32(15)).astype(np.float16).astype(np.float32)[:, None]
        zero = (-vmin).astype(np.float16).astype(np.float32)[:, None]
        w_hat = np.clip(np.round((w + zero) / scale), 0, 15) * scale - zero
        products = x.astype(np.float64) @ (w.astype(np.float64) - w_hat).T
        errors[k] = np.sum(products * products, axis=0)
    return errors


def test_clip_search_matches_float64_brute_force(rng):
    w = weights_with_outliers(rng, 12, 48)
    x = correlated_inputs(rng, 128, 48)
    chosen = np.asarray(search_clip_ratios(w, x))
    errors = brute_force_clip_errors(w, x)
    best = CLIP_RATIOS[np.argmin(errors, axis=0)].astype(np.float32)
    chosen_index = np.searchsorted(-CLIP_RATIOS.astype(np.float32), -chosen)
    np.testing.assert_array_equal(CLIP_RATIOS[chosen_index].astype(np.float32), chosen)
    channels = np.arange(12)
    # A float32 objective may break a near-tie the other way; it must then really be a near-tie.
    np.testing.assert_allclose(errors[chosen_index, channels], errors.min(axis=0), rtol=1e-5)
    assert np.mean(chosen == best) >= 0.75


def test_clip_search_never_worse_than_no_clipping(rng):
    w = weights_with_outliers(rng, 96, 192)
    x = np.asarray(strided_token_sample(correlated_inputs(rng, 2048, 192)))
    chosen = np.asarray(search_clip_ratios(w, x))
    assert np.all(np.isin(chosen, CLIP_RATIOS.astype(np.float32)))
    scale, zero = channel_scale_zero(w, chosen)
    unclipped_scale, unclipped_zero = channel_scale_zero(w, 1.0)

    def channel_errors(scale, zero):
        scale, zero = np.asarray(scale)[:, None], np.asarray(zero)[:, None]
        w_hat = np.asarray(dequantize(rtn_quantize(w, scale, zero, 192), scale, zero, 192))
        products = x.astype(np.float64) @ (w - w_hat).astype(np.float64).T
        return np.sum(products * products, axis=0)

    chosen_errors = channel_errors(scale, zero)
    unclipped_errors = channel_errors(unclipped_scale, unclipped_zero)
    assert np.all(chosen_errors <= unclipped_errors * (1 + 1e-5))
    np.testing.assert_allclose(np.asarray(clip_ratio_errors(w, x, CLIP_RATIOS[:1]))[0], unclipped_errors, rtol=1e-4)
