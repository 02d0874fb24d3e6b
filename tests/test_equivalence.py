"""QoQ's equivalence transforms leave the float model's logits unchanged, alone and chained.

Models are random (norm weights and biases included, so folding and bias handling are exercised) and so are
the calibration statistics: any exact transform must pass for any of them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from converters import equivalence
from converters.hadamard import SUPPORTED_ORDERS, hadamard_matrix
from qoq_jax import ModelConfig, UnsupportedModelError, assemble_params, expected_shapes, forward
from tiny_models import TINY_CONFIGS

TOLERANCE = 1e-4


def _config(name: str) -> ModelConfig:
    if name == "llama_hidden_72_head_dim_20":  # non-power-of-two Hadamards: 72 = 36·2 and 20 (Paley II and I)
        return dataclasses.replace(_config("llama"), hidden_size=72, head_dim=20)
    return ModelConfig.from_hf(TINY_CONFIGS[name]().to_dict())


MODEL_NAMES = (
    "llama",
    "llama_tied",
    "qwen2_bias_tied",
    "llama_head_dim_24_mqa_bias",
    "llama_hidden_72_head_dim_20",
    "qwen3",  # q/k norms take SmoothAttention's scales
    "gemma2",  # (1 + w) norms, post-norms: the inputs of the linears rotate online
    "gemma3",  # both, and q/k norms with (1 + w)
    "phi4_mini_longrope",  # partial rotary: only the rotating channels pair up
)


def random_weights(config: ModelConfig, rng: np.random.Generator) -> dict:
    """Nested float32 weights like `nnx.to_pure_dict`, with non-trivial norms and biases."""
    flat = {}
    for path, shape in expected_shapes(config).items():
        kind = path[-1]
        if kind == "weight":  # RMSNorm γ (stored as γ − offset)
            value = rng.normal(1.0, 0.3, shape) - config.norm_weight_offset
        elif kind == "bias":
            value = rng.normal(0.0, 0.3, shape)
        elif kind == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)
        else:  # embed_tokens
            value = rng.normal(0.0, 1.0, shape)
        flat[path] = value.astype(np.float32)
    return unflatten(flat)


def unflatten(flat: dict) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


def flatten(tree: dict, prefix: tuple = ()) -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def logits(config: ModelConfig, weights: dict, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(forward(assemble_params(config, flatten(weights), dtype=jnp.float32), jnp.asarray(tokens)))


def assert_same_function(model, new_config, new_weights):
    after = logits(new_config, new_weights, model.tokens)
    error = np.abs(after - model.logits).max() / np.abs(model.logits).max()
    assert error < TOLERANCE, f"logits moved by {error:.2e} of their range"


def per_layer(weights: dict, transform) -> dict:
    return {**weights, "layers": {index: transform(layer) for index, layer in weights["layers"].items()}}


# Each step maps (weights, config, rng) → (weights, config); statistics are random positive numbers.
def untie(weights, config, rng):
    return equivalence.untie_embeddings(weights, config)


def fold(weights, config, rng):
    return equivalence.fold_norms(weights, config), config


def rotate_residual(weights, config, rng):
    return equivalence.rotate_residual(weights, config), config


def rotate_block_inputs(weights, config, rng):
    return equivalence.rotate_block_inputs(weights, config)


def rotate_value_heads(weights, config, rng):
    return equivalence.rotate_value_heads(weights, config), config


def reorder(weights, config, rng):
    def reorder_layer(layer):
        return equivalence.reorder_down_proj(layer, rng.permutation(config.intermediate_size))

    return per_layer(weights, reorder_layer), config


def smooth_attention(weights, config, rng):
    def smooth_layer(layer):
        k_absmax = rng.uniform(0.05, 5.0, config.num_kv_heads * config.head_dim)
        q_absmax = rng.uniform(0.05, 5.0, config.num_heads * config.head_dim)
        return equivalence.smooth_attention(layer, config, k_absmax, q_absmax, alpha=0.5, beta=0.3)[0]

    return per_layer(weights, smooth_layer), config


def smooth_down(weights, config, rng):
    def smooth_layer(layer):
        input_absmax = rng.uniform(0.01, 10.0, config.intermediate_size)
        return equivalence.smooth_down_proj(layer, input_absmax, alpha=0.3, beta=0.7)[0]

    return per_layer(weights, smooth_layer), config


# What each step needs done first (the rotations need folded norms, the residual one an untied head).
PREREQUISITES = {rotate_residual: (untie, fold), rotate_block_inputs: (fold,)}


def chain(config: ModelConfig) -> tuple:
    """QoQ's order: post-norm models rotate their block inputs online, the others the residual stream."""
    if config.post_norms:
        return (fold, rotate_block_inputs, rotate_value_heads, reorder, smooth_attention, smooth_down)
    return (untie, fold, rotate_residual, rotate_value_heads, reorder, smooth_attention, smooth_down)


@dataclasses.dataclass(frozen=True)
class RandomModel:
    config: ModelConfig
    weights: dict
    tokens: np.ndarray
    logits: np.ndarray


@pytest.fixture(params=MODEL_NAMES, scope="module")
def model(request) -> RandomModel:
    """Shared by the tests of one module run (they must not modify it): the reference logits cost a forward."""
    config = _config(request.param)
    rng = np.random.default_rng(205)
    weights = random_weights(config, rng)
    tokens = rng.integers(0, config.vocab_size, (2, 12))
    return RandomModel(config, weights, tokens, logits(config, weights, tokens))


def run(steps, weights, config, rng):
    for step in steps:
        weights, config = step(weights, config, rng)
    return weights, config


# Each model's own chain, and the online rotation on one model without post-norms (a non-power-of-two hidden).
STEP_CASES = [(name, step) for name in MODEL_NAMES for step in chain(_config(name))] + [
    ("llama_hidden_72_head_dim_20", rotate_block_inputs)
]


@pytest.mark.parametrize(
    "model, step", STEP_CASES, indirect=["model"], ids=[f"{name}-{step.__name__}" for name, step in STEP_CASES]
)
def test_each_transform_keeps_the_logits(model, step):
    rng = np.random.default_rng(206)
    prepared, prepared_config = run(PREREQUISITES.get(step, ()), model.weights, model.config, rng)
    new_weights, new_config = step(prepared, prepared_config, rng)
    before, after = flatten(prepared), flatten(new_weights)
    changed = before.keys() != after.keys() or any(not np.array_equal(after[path], before[path]) for path in before)
    nothing_to_do = step is untie and not model.config.tie_word_embeddings
    assert changed or nothing_to_do, "the transform changed nothing, so the test would prove nothing"
    assert_same_function(model, new_config, new_weights)


def test_the_whole_chain_keeps_the_logits_and_its_input(model):
    snapshot = {path: array.copy() for path, array in flatten(model.weights).items()}
    new_weights, new_config = run(chain(model.config), model.weights, model.config, np.random.default_rng(207))
    assert new_config.tie_word_embeddings == (model.config.tie_word_embeddings and model.config.post_norms)
    assert (new_config.input_rotation is not None) == model.config.post_norms
    assert all(np.array_equal(array, snapshot[path]) for path, array in flatten(model.weights).items())
    assert_same_function(model, new_config, new_weights)


def test_a_hidden_size_without_buildable_hadamard_factors_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="hidden size 3328 has no factorization"):  # 52·64, 13·256
        equivalence.rotation_factors(3328)


def test_residual_rotation_refuses_post_norms():
    config = _config("gemma2")
    weights = random_weights(config, np.random.default_rng(216))
    untied, untied_config = equivalence.untie_embeddings(weights, config)
    with pytest.raises(ValueError, match="post-norms.*rotate_block_inputs"):
        equivalence.rotate_residual(equivalence.fold_norms(untied, untied_config), untied_config)


def test_rotation_refuses_unfolded_norms_and_tied_embeddings():
    config = _config("llama_tied")
    weights = random_weights(config, np.random.default_rng(208))
    with pytest.raises(ValueError, match="untie"):
        equivalence.rotate_residual(weights, config)
    untied, untied_config = equivalence.untie_embeddings(weights, config)
    with pytest.raises(ValueError, match="folded norms"):
        equivalence.rotate_residual(untied, untied_config)
    with pytest.raises(ValueError, match="folded norms"):
        equivalence.rotate_block_inputs(weights, config)
    # A tied head keeps its final norm (the shared embedding cannot carry γ); the blocks' norms fold.
    folded = equivalence.fold_norms(weights, config)
    np.testing.assert_array_equal(folded["norm"]["weight"], weights["norm"]["weight"])
    assert np.all(folded["layers"][0]["input_layernorm"]["weight"] == 1.0)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_smooth_attention_scales_the_qk_norms_not_the_projections(name):
    """With q/k norms before RoPE a scale on k_proj's output would be normalized away: λ goes into the norms'
    per-head γ (offset included) and the projections stay as they were."""
    config = _config(name)
    rng = np.random.default_rng(218)
    layer = random_weights(config, rng)["layers"][0]
    k_absmax = rng.uniform(0.05, 5.0, config.num_kv_heads * config.head_dim)
    smoothed, lam = equivalence.smooth_attention(layer, config, k_absmax)
    attention, original = smoothed["self_attn"], layer["self_attn"]
    for proj in ("q_proj", "k_proj"):
        np.testing.assert_array_equal(attention[proj]["kernel"], original[proj]["kernel"])
    offset = config.norm_weight_offset
    lam_kv = lam.reshape(config.num_kv_heads, config.head_dim)
    np.testing.assert_allclose(
        attention["k_norm"]["weight"] + offset, (original["k_norm"]["weight"] + offset) / lam_kv, rtol=1e-5
    )
    np.testing.assert_allclose(
        attention["q_norm"]["weight"] + offset,
        (original["q_norm"]["weight"] + offset) * np.repeat(lam_kv, config.num_groups, axis=0),
        rtol=1e-5,
    )


def test_partial_rotary_pairs_only_the_rotating_channels():
    """Phi-4-mini rotates 12 of 16 channels: pairs (j, j + 6) for j < 6 share λ, channels 12..15 keep their own."""
    config = _config("phi4_mini_longrope")
    h, rotary = config.head_dim, config.rope.rotary_dim(config.head_dim)
    layer = random_weights(config, np.random.default_rng(219))["layers"][0]
    k_absmax = np.random.default_rng(220).uniform(0.05, 5.0, config.num_kv_heads * h)
    _, lam = equivalence.smooth_attention(layer, config, k_absmax)
    per_head, k_max = lam.reshape(-1, h), k_absmax.reshape(-1, h)
    half = rotary // 2
    np.testing.assert_allclose(per_head[:, :half], np.sqrt(np.maximum(k_max[:, :half], k_max[:, half:rotary])))
    np.testing.assert_allclose(per_head[:, half:rotary], per_head[:, :half])
    np.testing.assert_allclose(per_head[:, rotary:], np.sqrt(k_max[:, rotary:]))


def test_transforms_keep_dtype_and_array_kind():
    config = _config("llama_head_dim_24_mqa_bias")
    weights = {
        path: jnp.asarray(array, jnp.bfloat16)
        for path, array in flatten(random_weights(config, np.random.default_rng(209))).items()
    }
    rotated = flatten(equivalence.rotate_value_heads(unflatten(weights), config))
    for path, array in rotated.items():
        assert isinstance(array, type(weights[path])) and array.dtype == jnp.bfloat16, path


@pytest.mark.parametrize("name", ["llama", "llama_head_dim_24_mqa_bias"])
def test_smooth_attention_lambda_is_shared_by_rope_pairs_and_gqa_groups(name):
    config = _config(name)
    rng = np.random.default_rng(210)
    layer = random_weights(config, rng)["layers"][0]
    num_kv, group, h = config.num_kv_heads, config.num_groups, config.head_dim
    k_absmax = rng.uniform(0.05, 5.0, num_kv * h)
    q_absmax = rng.uniform(0.05, 5.0, config.num_heads * h)
    alpha, beta = rng.uniform(0.1, 0.9), rng.uniform(0.0, 0.9)
    smoothed, lam = equivalence.smooth_attention(layer, config, k_absmax, q_absmax, alpha=alpha, beta=beta)

    for kv_head in range(num_kv):
        for channel in range(h // 2):
            pair = [channel, channel + h // 2]
            query_heads = range(kv_head * group, (kv_head + 1) * group)
            query_channels = [head * h + c for head in query_heads for c in pair]
            kv_channels = [kv_head * h + c for c in pair]
            expected = k_absmax[kv_channels].max() ** alpha / q_absmax[query_channels].max() ** beta
            np.testing.assert_allclose(lam[kv_channels], expected, rtol=1e-12)

    q_scale = smoothed["self_attn"]["q_proj"]["kernel"] / layer["self_attn"]["q_proj"]["kernel"]
    k_scale = smoothed["self_attn"]["k_proj"]["kernel"] / layer["self_attn"]["k_proj"]["kernel"]
    np.testing.assert_allclose(
        q_scale, np.broadcast_to(np.repeat(lam.reshape(num_kv, h), group, 0).ravel(), q_scale.shape), rtol=1e-6
    )
    np.testing.assert_allclose(k_scale, np.broadcast_to(1 / lam, k_scale.shape), rtol=1e-6)
    if config.qkv_bias:
        np.testing.assert_allclose(
            smoothed["self_attn"]["k_proj"]["bias"], layer["self_attn"]["k_proj"]["bias"] / lam, rtol=1e-6
        )


def test_smoothing_scales_fall_back_to_one():
    config = _config("llama")
    layer = random_weights(config, np.random.default_rng(211))["layers"][0]
    k_absmax = np.full(config.num_kv_heads * config.head_dim, 4.0)
    k_absmax[[0, config.head_dim // 2]] = 0.0  # a dead RoPE pair: λ = 0 → 1
    _, lam = equivalence.smooth_attention(layer, config, k_absmax)
    assert lam[0] == lam[config.head_dim // 2] == 1.0 and np.all(lam[1 : config.head_dim // 2] == 2.0)
    k_absmax[5] = np.inf
    with pytest.warns(equivalence.SmoothingDisabledWarning, match=r"smooth_attention disabled: 2 channel\(s\)"):
        assert np.all(equivalence.smooth_attention(layer, config, k_absmax)[1] == 1.0)  # 5 and its RoPE pair
    input_absmax = np.full(config.intermediate_size, 2.0)
    input_absmax[3] = np.nan
    with pytest.warns(equivalence.SmoothingDisabledWarning, match=r"smooth_linear disabled: .*first: \[3\]"):
        assert np.all(equivalence.smooth_down_proj(layer, input_absmax, alpha=0.3, beta=0.7)[1] == 1.0)


def test_down_proj_permutation_is_a_stable_ascending_sort():
    stats = np.array([3.0, 1.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(equivalence.down_proj_permutation(stats), [4, 1, 3, 2, 0])


@pytest.mark.parametrize("n", [64, 72, 576, 1152, 2304, 3072, 3584, 5376])  # 5376: Gemma 3 27B, 84·64
def test_rotation_factors_are_sign_matrices_whose_kronecker_product_is_orthogonal(n):
    """kron(A, B)/√n is orthogonal exactly when A·Aᵀ = p·I and B·Bᵀ = q·I."""
    outer, inner = equivalence.rotation_factors(n)
    (p, _), (q, _) = outer.shape, inner.shape
    assert p * q == n and set(np.unique(outer)) | set(np.unique(inner)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(outer @ outer.T, p * np.eye(p))
    np.testing.assert_array_equal(inner @ inner.T, q * np.eye(q))


HADAMARD_ORDERS = sorted(
    {2**m for m in range(11)} | {k * 2**m for k in SUPPORTED_ORDERS for m in (0, 1, 3)} | {576, 896, 1536, 3584, 5120}
)


@pytest.mark.parametrize("n", HADAMARD_ORDERS)
def test_hadamard_matrix_is_orthonormal_with_equal_magnitude_entries(n):
    matrix = hadamard_matrix(n)
    assert matrix.shape == (n, n) and matrix.dtype == np.float64 and not matrix.flags.writeable
    assert np.all(np.abs(matrix) == 1 / np.sqrt(n))
    rows = np.random.default_rng(212).choice(n, min(n, 64), replace=False)  # all n² dot products are slow at 5120
    np.testing.assert_allclose(matrix[rows] @ matrix.T, np.eye(n)[rows], atol=1e-12)


def test_power_of_two_orders_are_sylvester_and_576_is_a_kronecker_product():
    np.testing.assert_array_equal(hadamard_matrix(128) * np.sqrt(128), scipy.linalg.hadamard(128))
    expected = np.kron(hadamard_matrix(36).T * 6, scipy.linalg.hadamard(16)) / 24
    np.testing.assert_allclose(hadamard_matrix(576), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [52, 104, 156, 172, 3, 6, 100])
def test_unbuildable_hadamard_orders_are_refused_by_name(n):
    with pytest.raises(UnsupportedModelError, match=rf"order {n}\b.*12"):
        hadamard_matrix(n)
