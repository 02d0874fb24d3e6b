"""The KV4 calibration options: the q/k transform leaves the float model unchanged, rotated keys go through the
paged cache and the decode kernel as the reference reads them, checkpoints keep the options, the searches are
deterministic and pick what they claim, and the budget stays exact for mixed KV bits."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from near_ties import assert_equal_up_to_a_near_tie
from tiny_models import TINY_CONFIGS

import qoq_jax
from converters import kv_calibration
from converters.hadamard import hadamard_matrix
from converters.qoq import RECIPES, quantize_model
from pallas_kernels import paged_attention
from qoq_jax.kv_cache import LayerAttention, NoKVCache, PagedKVCache, kv_bytes_per_page, kv_bytes_per_token
from qoq_jax.quant import QuantFormat, dequantize_kv, quantize_kv
from serve.engine import build_engine
from serve.request import Request

TOLERANCE = 1e-4


def _config(head_dim: int) -> qoq_jax.ModelConfig:
    base = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS["llama"]().to_dict())  # 4 query heads on 2 KV heads
    return dataclasses.replace(base, head_dim=head_dim)


def _random_transform(rng, num_kv_heads: int, head_dim: int):
    """A Hadamard times a random well-conditioned matrix (what learning makes of it), its A⁻ᵀ and an offset."""
    hadamard = hadamard_matrix(head_dim)
    matrix = np.stack(
        [
            hadamard @ (np.eye(head_dim) + 0.2 * rng.normal(size=(head_dim, head_dim)) / np.sqrt(head_dim))
            for _ in range(num_kv_heads)
        ]
    )
    inverse_t = np.swapaxes(np.linalg.inv(matrix), -1, -2)
    offset = rng.normal(0, 2.0, (num_kv_heads, head_dim))
    return (jnp.asarray(a, jnp.float32) for a in (matrix, inverse_t, offset))


def _set_transform(attention, matrix, inverse_t, offset):
    attention.key_transform = nnx.data(nnx.Param(matrix))
    attention.query_transform = nnx.data(nnx.Param(inverse_t))
    attention.key_offset = nnx.data(nnx.Param(offset))


def _float_logits(model, tokens):
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    hidden, _ = model(tokens, positions, jnp.ones((batch, length), bool), NoKVCache())
    return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("head_dim", [64, 128, 20])  # 20: Paley's non-power-of-two Hadamard
def test_qk_transform_leaves_the_float_model_unchanged(head_dim, rng):
    """k ← (k − μ)·A, q ← q·A⁻ᵀ in every layer of a float model: logits equal to float rounding (the offset's
    q·μ is one constant per query, which softmax drops)."""
    config = _config(head_dim)
    model = qoq_jax.init_params(config, dtype="float32", seed=int(rng.integers(1 << 16))).model()
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (2, 24)))
    reference = _float_logits(model, tokens)
    for layer in model.layers:
        _set_transform(layer.self_attn, *_random_transform(rng, config.num_kv_heads, head_dim))
    transformed = _float_logits(model, tokens)
    scale = np.max(np.abs(reference))
    np.testing.assert_allclose(transformed, reference, atol=TOLERANCE * scale, rtol=0)


def _quantized_with_transform(rng, quant: QuantFormat, head_dim: int = 64):
    config = _config(head_dim)
    params = qoq_jax.init_params(config, dtype="float32", seed=int(rng.integers(1 << 16)), quant=quant)
    state = params.state
    for index in range(config.num_layers):
        matrix, inverse_t, offset = _random_transform(rng, config.num_kv_heads, head_dim)
        attention = state["layers"][index]["self_attn"]
        attention["key_transform"].set_value(matrix)
        attention["query_transform"].set_value(inverse_t)
        attention["key_offset"].set_value(offset)
    return dataclasses.replace(params, state=state)


def test_every_way_into_the_cache_gives_forward_with_every_kv_option(rng):
    """With the q/k transform, per-layer bits (KV8, KV4), clip ratios and the range search on, one-shot prefill
    (attending over the round trip of its own K/V), a chunk continuing it over the pages (the extend path) and
    decode steps token by token (each over pages that hold its own quantized key) all give the logits of
    `forward`, which attends over the same quantization round trip: every path reads K/V exactly as the pages
    hold them, clip and searched ranges included."""
    quant = QuantFormat(
        "w8a8", kv_bits=4, layer_kv_bits=(8, 4), kv_clip=((0.9, 0.95), (1.0, 0.85)), kv_range_search=True,
        qk_transform=True,
    )  # fmt: skip
    params = _quantized_with_transform(rng, quant)
    tokens = jnp.asarray(rng.integers(3, params.config.vocab_size, (2, 14)), jnp.int32)
    reference = np.asarray(qoq_jax.forward(params, tokens))
    first, chunk = 5, 4
    state, logits = qoq_jax.prefill(params, tokens[:, :first], max_length=16, page_size=8)
    assert [pool.bits for pool in state.cache.keys] == [8, 4] and state.cache.keys[0].clip == 0.9
    assert all(pool.search for pool in state.cache.keys + state.cache.values)
    assert state.cache.values[1].clip == 0.85
    np.testing.assert_allclose(logits, reference[:, first - 1], rtol=TOLERANCE, atol=TOLERANCE)
    starts = jnp.full((2,), first, jnp.int32)
    state, logits = qoq_jax.prefill(
        params, tokens[:, first : first + chunk], jnp.full((2,), chunk), cache=state.cache, start_positions=starts
    )
    np.testing.assert_allclose(logits, reference[:, first + chunk - 1], rtol=TOLERANCE, atol=TOLERANCE)
    for position in range(first + chunk, tokens.shape[1]):
        state, logits = qoq_jax.decode_step(params, state, tokens[:, position])
        np.testing.assert_allclose(logits, reference[:, position], rtol=TOLERANCE, atol=TOLERANCE)
    for option in ({"kv_clip": None}, {"kv_range_search": False}):  # each option changes what the pages hold
        without = dataclasses.replace(params, quant=dataclasses.replace(quant, **option))
        assert np.max(np.abs(np.asarray(qoq_jax.forward(without, tokens)) - reference)) > 100 * TOLERANCE, option


def test_the_engine_serves_generate_s_tokens_with_every_kv_option(rng):
    """The engine's pool takes the model's per-layer bits and clip ratios (its pages hold what `generate`'s
    cache holds), so under the q/k transform, mixed bits and clipping its greedy tokens are generate's (up to a
    near-tie: tests/near_ties.py), the prompt of 20 tokens prefilled in rows of 8."""
    quant = QuantFormat(
        "w8a8", kv_bits=4, layer_kv_bits=(8, 4), kv_clip=((0.9, 0.95), (1.0, 0.85)), kv_range_search=True,
        qk_transform=True,
    )  # fmt: skip
    params = _quantized_with_transform(rng, quant)
    engine = build_engine(
        params, max_num_seqs=2, max_model_len=48, page_size=8, num_pages=12, max_num_batched_tokens=18,
        prefill_row_tokens=8, max_prefill_rows=2, warmup="none", compile_in_background=False,
    )  # fmt: skip
    keys, values = engine.runner.pool.keys, engine.runner.pool.values
    assert [(k.bits, k.clip, v.clip) for k, v in zip(keys, values)] == [(8, 0.9, 0.95), (4, 1.0, 0.85)]
    assert all(pool.search for pool in keys + values)
    prompts = [rng.integers(3, params.config.vocab_size, n).tolist() for n in (20, 7)]
    for index, prompt in enumerate(prompts):
        engine.add_request(Request(str(index), tuple(prompt), 8, ignore_eos=True))
    tokens = {str(index): [] for index in range(len(prompts))}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    expected = qoq_jax.generate(params, prompts, max_new_tokens=8, ignore_eos=True)
    for index, (prompt, want) in enumerate(zip(prompts, expected)):
        assert_equal_up_to_a_near_tie(params, prompt, tokens[str(index)], want, f"prompt {index}")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotated_keys_in_the_pages_read_by_kernel_and_reference(head_dim, rng):
    """Keys transformed by the model's `transform_qk` and written to KV4 pages are read by the Pallas decode
    kernel (interpret mode) and its jnp reference as a float64 attention over the dequantized transformed
    keys computes it."""
    config = _config(head_dim)
    quant = QuantFormat("w8a8", kv_bits=4, qk_transform=True)
    params = _quantized_with_transform(rng, quant, head_dim)
    attention = params.model().layers[0].self_attn
    batch, length, groups = 2, 21, config.num_groups
    q = jnp.asarray(rng.normal(size=(batch, 1, config.num_heads, head_dim)), jnp.float32)
    k, v = (
        jnp.asarray(rng.normal(size=(batch, length, config.num_kv_heads, head_dim)) * 3, jnp.float32) for _ in range(2)
    )
    k = k + jnp.asarray(rng.normal(0, 5, head_dim), jnp.float32)  # a per-channel offset for μ to remove
    q_t, _ = attention.transform_qk(q, k[:, :1])
    _, k_t = attention.transform_qk(jnp.zeros((batch, length, config.num_heads, head_dim)), k)
    tables = jnp.asarray(rng.permutation(8)[:6].reshape(batch, 3), jnp.int32)
    cache = PagedKVCache.init(config, num_pages=8, page_size=8, block_tables=tables, dtype=jnp.float32, kv_bits=4)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    queries = jnp.zeros((batch, length, config.num_heads, head_dim))  # the prompt's own attention is not checked
    _, cache = cache.attend(0, queries, k_t, v, positions, jnp.ones((batch, length), bool))
    keys, values = cache.keys[0], cache.values[0]
    lengths = jnp.asarray([length, 13], jnp.int32)
    args = (q_t[:, 0], keys.codes, values.codes, tables, lengths, keys.scale, keys.zero, values.scale, values.zero)
    kernel = paged_attention.paged_decode_attention(*args, bits=4, interpret=True)
    reference = paged_attention.paged_decode_attention_reference(*args, bits=4)

    k_hat = np.asarray(dequantize_kv(*quantize_kv(k_t, 4), jnp.float32), np.float64)
    v_hat = np.asarray(dequantize_kv(*quantize_kv(v, 4), jnp.float32), np.float64)
    q64 = np.asarray(q_t[:, 0], np.float64).reshape(batch, config.num_kv_heads, groups, head_dim)
    expected = np.zeros_like(q64)
    for b, n in enumerate(np.asarray(lengths)):
        logits = np.einsum("hgd,thd->hgt", q64[b], k_hat[b, :n]) / np.sqrt(head_dim)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        expected[b] = np.einsum("hgt,thd->hgd", probs / probs.sum(-1, keepdims=True), v_hat[b, :n])
    expected = expected.reshape(batch, config.num_heads, head_dim)
    np.testing.assert_allclose(reference, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kernel, expected, rtol=1e-3, atol=1e-3)


def _sample_with_outliers(rng, rows=2, length=48, num_kv_heads=2, groups=2, head_dim=32, outliers=True):
    """Post-RoPE-like keys with a per-channel offset and (optionally) two outlier channels: KV4's failure modes."""
    shape = (rows, length, num_kv_heads, head_dim)
    k = rng.normal(size=shape)
    if outliers:
        k[..., [3, 3 + head_dim // 2]] *= 12
    k += rng.normal(0, 4, head_dim)
    q = rng.normal(size=(rows, length, num_kv_heads * groups, head_dim))
    return kv_calibration.AttentionSample.create(q, k, rng.normal(size=shape))


def _kv4_error(sample, transform) -> float:
    return float(kv_calibration.attention_error(sample, transform, 4))


def test_centring_rotation_and_learning_each_lower_the_kv4_error(rng):
    """Centring removes per-channel offsets, the Hadamard spreads outlier channels, learning improves on both."""
    offsets = _sample_with_outliers(rng, outliers=False)
    plain, centred = (kv_calibration.initial_transform(offsets, rotate=False, center=c) for c in (False, True))
    assert _kv4_error(offsets, centred) < 0.5 * _kv4_error(offsets, plain)
    sample = _sample_with_outliers(rng)
    centred = kv_calibration.initial_transform(sample, rotate=False, center=True)
    rotated = kv_calibration.initial_transform(sample, rotate=True, center=True)
    learned = kv_calibration.learn_transform(sample, rotated, bits=4, steps=60, learning_rate=2e-3, query_stride=4)
    errors = [_kv4_error(sample, t) for t in (centred, rotated, learned)]
    assert errors[0] > errors[1] > errors[2], errors
    # The learned pair stays exact in float: A⁻ᵀ is A's inverse transpose.
    product = np.einsum("hde,hfe->hdf", np.asarray(learned.key_transform), np.asarray(learned.query_transform))
    np.testing.assert_allclose(product, np.broadcast_to(np.eye(32), product.shape), atol=1e-4)


def test_clip_search_returns_the_grid_minimum(rng):
    """Each grid is scored on every SEARCH_QUERY_STRIDE-th query (one vectorised call); the returned error is the
    chosen pair's on every query."""
    sample = _sample_with_outliers(rng)
    transform = kv_calibration.initial_transform(sample, rotate=True, center=True)
    k_clip, v_clip, error = kv_calibration.search_clip(sample, transform, 4)
    ratios, stride = kv_calibration.CLIP_RATIOS, kv_calibration.SEARCH_QUERY_STRIDE

    def strided(k, v):
        return float(kv_calibration.attention_error(sample, transform, 4, k, v, query_stride=stride))

    assert k_clip == ratios[int(np.argmin([strided(r, 1.0) for r in ratios]))]
    assert v_clip == ratios[int(np.argmin([strided(k_clip, r) for r in ratios]))]
    assert error == pytest.approx(float(kv_calibration.attention_error(sample, transform, 4, k_clip, v_clip)))
    assert strided(k_clip, v_clip) <= strided(1.0, 1.0)


@pytest.mark.parametrize("query_stride", [1, 4])
def test_calibration_error_attends_as_the_layer_does(rng, query_stride):
    """The calibration's attention (strided queries, the layer's window, soft-cap and scale) is the model's: with
    16-bit pages its error against the layer's own prompt attention is zero to float rounding, while the same
    queries scored without the window differ."""
    local = LayerAttention(scale=0.2, softcap=5.0, window=7)
    sample = _sample_with_outliers(rng)
    windowed = kv_calibration.AttentionSample.create(sample.query, sample.key, sample.value, local)
    identity = kv_calibration.QKTransform.identity(*sample.key.shape[2:])
    assert float(kv_calibration.attention_error(windowed, identity, 16, query_stride=query_stride)) < 1e-10
    unwindowed = dataclasses.replace(windowed, attention=dataclasses.replace(local, window=None))
    assert float(kv_calibration.attention_error(unwindowed, identity, 16, query_stride=query_stride)) > 1e-3


def test_soft_capped_layers_are_not_centred_and_keep_their_attention(rng):
    """Soft-capping (Gemma 2) does not drop the per-query constant q·μ: its layers get no key offset, before or
    after learning, and their transformed attention with 16-bit pages equals the untransformed one."""
    sample = _sample_with_outliers(rng)
    capped = kv_calibration.AttentionSample.create(
        sample.query * 3, sample.key, sample.value, LayerAttention(softcap=2.0)
    )
    start = kv_calibration.initial_transform(capped, rotate=True, center=True)
    learned = kv_calibration.learn_transform(capped, start, bits=4, steps=20, learning_rate=5e-3, query_stride=4)
    for transform in (start, learned):
        np.testing.assert_array_equal(np.asarray(transform.key_offset), 0.0)
        assert float(kv_calibration.attention_error(capped, transform, 16)) < 1e-10
    offset = kv_calibration.initial_transform(sample, rotate=True, center=True).key_offset
    centred = dataclasses.replace(start, key_offset=offset)  # what centring would do: the output moves
    assert float(kv_calibration.attention_error(capped, centred, 16)) > 1e-4


KV_RECIPE = dataclasses.replace(
    RECIPES["g128"],
    name="g128-kv",
    center_keys=True,
    rotate_qk=True,
    learn_qk=True,
    learn_qk_steps=8,
    kv_clip_search=True,
    kv_range_search=True,
    smooth_attention_search=True,
    kv8_layers=1,
    kv_rows=2,
)


@pytest.fixture(scope="module")
def kv_quantized():
    """The tiny quantizable Llama through every KV stage, twice on the same calibration set."""
    config = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS["llama_quantizable"]().to_dict())
    params = qoq_jax.init_params(config, dtype="float32", seed=4)
    calibration = np.random.default_rng(7).integers(3, config.vocab_size, (3, 48)).astype(np.int32)
    return params, [quantize_model(params, KV_RECIPE, calibration, progress=False) for _ in range(2)]


def test_kv_searches_are_deterministic_and_recorded(kv_quantized):
    _, ((first, report), (second, again)) = kv_quantized
    for a, b in zip(jax.tree_util.tree_leaves(first.state), jax.tree_util.tree_leaves(second.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    drop_time = lambda r: {k: v for k, v in r.items() if not k.endswith("seconds")}  # noqa: E731
    assert drop_time(report) == drop_time(again)
    layers = report["kv_layers"]
    worst = int(np.argmax([r["error"] for r in layers]))
    assert first.quant.layer_kv_bits == tuple(8 if i == worst else 4 for i in range(len(layers)))
    assert first.quant.qk_transform and len(first.quant.kv_clip) == len(layers)
    assert first.quant.kv_clip[worst] == (1.0, 1.0)  # full range at 8 bits
    assert all(tuple(chosen) in kv_calibration.SMOOTHING_GRID for chosen in report["smooth_attention"])
    for record in layers:
        assert record["error"] <= record["error_before_learning"] + 1e-6
    attention = first.state["layers"][0]["self_attn"]
    assert attention["key_transform"][...].dtype == jnp.float32


def test_checkpoint_keeps_the_kv_options_and_old_ones_still_load(kv_quantized, tmp_path, rng):
    _, ((quantized, report), _) = kv_quantized
    tokens = jnp.asarray(rng.integers(3, 300, (1, 20)))
    path = qoq_jax.save_checkpoint(quantized, tmp_path / "kv", recipe=report)
    stored = json.loads((path / "qoq.json").read_text())["quant"]
    assert stored["qk_transform"] and stored["kv_range_search"]
    assert len(stored["layer_kv_bits"]) == quantized.config.num_layers
    loaded = qoq_jax.load(path)
    assert loaded.quant == quantized.quant
    np.testing.assert_array_equal(qoq_jax.forward(loaded, tokens), qoq_jax.forward(quantized, tokens))

    plain = qoq_jax.init_params(quantized.config, dtype="float32", quant=QuantFormat("w4a8-g128", group_size=64))
    old = qoq_jax.save_checkpoint(plain, tmp_path / "old")
    assert json.loads((old / "qoq.json").read_text())["quant"] == {
        "weights": "w4a8-g128",
        "kv_bits": 4,
        "group_size": 64,
    }
    assert qoq_jax.load(old).quant == plain.quant

    metadata = json.loads((path / "qoq.json").read_text())
    metadata["quant"]["layer_kv_bits"], metadata["quant"]["kv_clip"] = [4], [[1.0, 1.0]]
    (path / "qoq.json").write_text(json.dumps(metadata))
    with pytest.raises(qoq_jax.CheckpointError, match="layer_kv_bits has 1 entries"):
        qoq_jax.load(path)


def test_mixed_kv_budget_is_exactly_what_the_pools_allocate():
    config = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS["llama_quantizable"]().to_dict())
    bits = (8, 4)
    cache = PagedKVCache.for_batch(config, 2, 48, page_size=16, dtype=jnp.bfloat16, kv_bits=bits)
    allocated = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache.keys + cache.values))
    assert allocated == 6 * kv_bytes_per_page(config, 16, bits, jnp.bfloat16)
    per_layer = [kv_bytes_per_token(dataclasses.replace(config, num_layers=1), b, jnp.bfloat16) for b in bits]
    assert kv_bytes_per_token(config, bits, jnp.bfloat16) == sum(per_layer)
    with pytest.raises(ValueError, match="2 entries"):
        kv_bytes_per_token(config, (4,), jnp.bfloat16)
