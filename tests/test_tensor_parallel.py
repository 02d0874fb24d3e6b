"""Tensor parallelism on the test process's 4 CPU devices (see conftest): a model split over 1, 2 and 4 devices
computes what it computes on one, its arrays and KV pages are where the sharding rules put them, checkpoints
round-trip between splits, unsplittable models are refused, and one decode step has exactly the collectives the
design promises."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import lowering_test
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from flax import nnx

import qoq_jax
from qoq_jax import DecodeState, ModelConfig, PagedKVCache, QuantFormat, UnsupportedModelError
from qoq_jax.kv_cache import kv_bytes_per_page
from qoq_jax.model import CausalLM
from qoq_jax.params import _random_layer, shard_params
from qoq_jax.sharding import KV_SHARD_AXIS, TensorParallel, make_mesh
from serve.engine import build_engine
from serve.request import Request

# 8 query heads, 2 KV heads: on 4 devices each KV head is replicated on the 2 devices holding its query heads.
CONFIG = ModelConfig(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    max_context=128,
)
G128 = QuantFormat("w4a8-g128", kv_bits=4, group_size=128)
FORMATS = {
    "float": None,
    "w4a8-g128": G128,
    "w4a8-chn": QuantFormat("w4a8-chn", kv_bits=4),
    "w8a8": QuantFormat("w8a8", kv_bits=8),
}
DEVICE_COUNTS = (2, 4)
FP_ROUNDING = 2e-6
# A split sums partial products in another order, a few ulps off, which now and then moves an int8 activation code
# sitting on a rounding boundary: one code step, ~1e-3 in the logits of the tokens after it. An error of the split
# itself would be of the logits' own size (~0.5).
CODE_STEP = 1e-2


@pytest.fixture(scope="module", autouse=True)
def _four_devices():
    if len(jax.devices()) < 4:
        pytest.fail(f"these tests need 4 devices (conftest forces 4 CPU devices); found {len(jax.devices())}")


@pytest.fixture(scope="module")
def g128_params():
    return qoq_jax.init_params(CONFIG, quant=G128, seed=2)


def _tokens(batch: int, length: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, length)), jnp.int32)


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _abstract_state(batch: int, *, dtype=jnp.float32, kernel: str = "auto") -> DecodeState:
    """A KV4 decode state of 256 tokens per row, as shapes only."""
    return jax.eval_shape(
        lambda: DecodeState(
            PagedKVCache.for_batch(CONFIG, batch, 256, page_size=64, dtype=dtype, kv_bits=4, kernel=kernel),
            jnp.zeros((batch,), jnp.int32),
        )
    )


@pytest.mark.parametrize(
    ("fmt", "device_counts"), [("float", (2, 4)), ("w4a8-g128", (2, 4)), ("w4a8-chn", (4,)), ("w8a8", (4,))]
)
def test_forward_logits_equal_on_1_2_and_4_devices(fmt, device_counts):
    params = qoq_jax.init_params(CONFIG, quant=FORMATS[fmt], seed=2)
    tokens = _tokens(2, 12)
    expected = _host(qoq_jax.forward(params, tokens))
    for devices in device_counts:
        split = shard_params(params, make_mesh(devices))
        logits = qoq_jax.forward(split, tokens)
        assert logits.addressable_shards[0].data.shape == (2, 12, 256 // devices), "split over the vocabulary"
        difference = np.abs(_host(logits) - expected)
        if FORMATS[fmt] is None:
            assert difference.max() <= FP_ROUNDING, devices
        else:
            assert difference.max() <= CODE_STEP and np.median(difference) <= FP_ROUNDING, devices


# Every per-family feature at once: per-head q/k norms (split with their heads), (1 + w) norms and post-norms,
# GeGLU, a scaled embedding, Gemma's attention scale, final soft-capping, and QoQ's online input rotation.
FAMILY_FEATURES = dict(
    qk_norm=True,
    post_norms=True,
    norm_weight_offset=1.0,
    hidden_act="gelu_tanh",
    embedding_multiplier=16.0,
    query_pre_attn_scalar=48.0,
    final_logit_softcap=20.0,
    input_rotation=(16, 16),
)


def test_family_features_split_over_4_devices(rng):
    """In float, so a wrong split shows at float rounding (the quantized split is the same code per linear)."""
    config = ModelConfig(**{**CONFIG.__dict__, **FAMILY_FEATURES})
    params = qoq_jax.init_params(config, seed=4)

    def randomized(path, leaf):  # norms start at their identity, the rotation at I: make them matter
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return leaf + jnp.asarray(rng.normal(0, 0.3, leaf.shape), leaf.dtype)
        if "input_rotation" in name:  # a ±1 matrix (orthogonal up to its size) keeps activations in range
            return jnp.asarray(np.sign(rng.normal(size=leaf.shape)), leaf.dtype)
        return leaf

    state = jax.tree_util.tree_map_with_path(randomized, params.state)
    params = dataclasses.replace(params, state=state)
    tokens = _tokens(2, 12)
    expected = _host(qoq_jax.forward(params, tokens))
    split = shard_params(params, make_mesh(4))
    q_norm = split.state["layers"][0]["self_attn"]["q_norm"]["weight"][...]
    assert q_norm.addressable_shards[0].data.shape == (2, 64), "q_norm's 8 heads split 2 per device"
    assert np.abs(_host(qoq_jax.forward(split, tokens)) - expected).max() <= 10 * FP_ROUNDING


def test_greedy_generations_equal_on_1_2_and_4_devices(g128_params):
    """W4A8KV4 through the paged KV4 cache: prefill, then decode steps on every split."""
    prompts = [[1, 2, 3, 4, 5], [7] * 20, list(range(40, 70))]
    expected = qoq_jax.generate(g128_params, prompts, max_new_tokens=8, decode_chunk=8)
    assert len({t for row in expected for t in row}) > 3, "a degenerate generation would prove little"
    for devices in DEVICE_COUNTS:
        mesh = make_mesh(devices)
        assert qoq_jax.generate(g128_params, prompts, max_new_tokens=8, decode_chunk=8, mesh=mesh) == expected


def test_arrays_and_kv_pages_live_where_the_rules_put_them(g128_params):
    params = shard_params(g128_params, make_mesh(4))
    layer = params.state["layers"][0]

    def local_shape(leaf):
        shapes = {shard.data.shape for shard in leaf.addressable_shards}
        assert len(shapes) == 1
        return shapes.pop()

    q = layer["self_attn"]["q_proj"]["kernel"].get_value()
    k = layer["self_attn"]["k_proj"]["kernel"].get_value()
    down = layer["mlp"]["down_proj"]["kernel"].get_value()
    assert local_shape(q.packed) == (256, 512 // 4 // 2) and local_shape(q.s1) == (128,)
    assert local_shape(q.s2) == (2, 128) and local_shape(q.zero) == (2, 128)
    assert local_shape(k.packed) == (256, 64 // 2), "one whole KV head per device"
    assert local_shape(down.packed) == (128, 128), "row-parallel: whole 128-input groups per device"
    assert local_shape(down.s2) == (1, 256) and local_shape(down.s1) == (256,)
    assert local_shape(params.state["embed_tokens"][...]) == (64, 256)
    assert local_shape(params.state["norm"]["weight"][...]) == (256,)

    state, _ = qoq_jax.prefill(params, _tokens(2, 16), max_length=64)
    codes = state.cache.keys[0].codes
    assert codes.sharding.spec == P(KV_SHARD_AXIS)
    assert local_shape(codes)[0] == 1 and local_shape(state.cache.keys[0].scale)[0] == 1
    by_device = {shard.device.id: shard for shard in codes.addressable_shards}
    # Devices 0 and 1 hold query heads 0-3 (KV head 0), devices 2 and 3 heads 4-7 (KV head 1).
    np.testing.assert_array_equal(np.asarray(by_device[0].data), np.asarray(by_device[1].data))
    np.testing.assert_array_equal(np.asarray(by_device[2].data), np.asarray(by_device[3].data))
    assert not np.array_equal(np.asarray(by_device[0].data), np.asarray(by_device[2].data))


def test_sharded_checkpoint_round_trips_between_splits(g128_params, tmp_path):
    params = shard_params(g128_params, make_mesh(4))
    tokens = _tokens(2, 10)
    expected = _host(qoq_jax.forward(params, tokens))
    qoq_jax.save_checkpoint(params, tmp_path / "ckpt")
    for devices in (None, 2, 4):
        mesh = None if devices is None else make_mesh(devices)
        loaded = qoq_jax.load(tmp_path / "ckpt", mesh=mesh)
        down = loaded.state["layers"][1]["mlp"]["down_proj"]["kernel"].get_value()
        assert len(down.packed.devices()) == (devices or 1)
        assert down.packed.addressable_shards[0].data.shape == (512 // (devices or 1), 128)
        np.testing.assert_allclose(_host(qoq_jax.forward(loaded, tokens)), expected, atol=CODE_STEP, rtol=0)
        for original, restored in zip(jax.tree.leaves(g128_params.state), jax.tree.leaves(loaded.state)):
            np.testing.assert_array_equal(_host(restored), _host(original))


@pytest.mark.parametrize(
    ("change", "devices", "reason"),
    [
        ({"num_heads": 6, "num_kv_heads": 6}, 4, "6 attention heads"),
        ({"num_heads": 6, "num_kv_heads": 3}, 2, "3 KV heads"),
        ({"intermediate_size": 514}, 4, "MLP width 514"),
        ({"num_heads": 4}, 4, "o_proj on each device: in_features=64 is not a multiple of group_size=128"),
    ],
)
def test_models_that_do_not_split_are_refused(change, devices, reason):
    config = ModelConfig(**{**CONFIG.__dict__, **change})
    with pytest.raises(UnsupportedModelError, match=f"cannot be split over {devices} devices: .*{reason}"):
        qoq_jax.init_params(config, quant=G128, mesh=make_mesh(devices))


def test_meshes_without_a_usable_tensor_axis_are_refused():
    devices = np.array(jax.devices()[:4])
    with pytest.raises(ValueError, match="needs a 'tensor' axis"):
        TensorParallel.create(Mesh(devices, ("model",)), CONFIG)
    with pytest.raises(ValueError, match="data parallelism"):
        TensorParallel.create(Mesh(devices.reshape(2, 2), ("data", "tensor")), CONFIG)
    with pytest.raises(ValueError, match="tensor_parallel=5 needs 5 devices; there are 4"):
        make_mesh(5)


@pytest.mark.parametrize("fmt", ["float", "w4a8-g128"])
def test_init_params_makes_the_model_s_own_weights_with_one_layer_program(fmt):
    """Layer by layer (one compiled program serving every layer), on one device or directly split, the weights are
    exactly those CausalLM itself draws from the seed."""
    quant, config = FORMATS[fmt], dataclasses.replace(CONFIG, num_layers=3)  # a config no other test makes
    drawn = jax.jit(lambda seed: nnx.split(CausalLM(config, rngs=nnx.Rngs(jax.random.key(seed)), quant=quant))[1])
    expected = jax.tree.leaves(drawn(7))
    layer_programs = _random_layer._cache_size()
    made = [qoq_jax.init_params(config, quant=quant, seed=7)]
    assert _random_layer._cache_size() == layer_programs + 1
    if quant is None:  # a split quantizes in another program (see init_params)
        made.append(qoq_jax.init_params(config, seed=7, mesh=make_mesh(4)))
    for params in made:
        assert jax.tree.structure(params.state) == jax.tree.structure(drawn.eval_shape(7))
        for got, want in zip(jax.tree.leaves(params.state), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_vocabulary_that_does_not_divide_is_replicated():
    config = ModelConfig(**{**CONFIG.__dict__, "vocab_size": 250})
    params = qoq_jax.init_params(config, seed=3)
    tokens = _tokens(1, 9) % 250
    split = shard_params(params, make_mesh(4))
    assert not split.parallel.shard_vocab
    assert split.state["embed_tokens"][...].addressable_shards[0].data.shape == (250, 256)
    np.testing.assert_allclose(
        _host(qoq_jax.forward(split, tokens)), _host(qoq_jax.forward(params, tokens)), atol=FP_ROUNDING, rtol=0
    )


@pytest.mark.parametrize("fmt", ["float", "w4a8-g128"])
def test_decode_step_compiles_to_the_expected_all_reduces_per_layer(fmt):
    """Per layer one all-reduce of [B, 1, hidden] after o_proj and one after down_proj, and for quantized models
    one max-reduce of the per-token activation scales [B] before each; plus one for the vocab-split embedding
    lookup. Nothing is gathered: the logits leave the step split over the vocabulary."""
    params = qoq_jax.init_params(CONFIG, quant=FORMATS[fmt], seed=2, mesh=make_mesh(4))
    batch = 4
    hlo = qoq_jax.decode_step.lower(params, _abstract_state(batch), jnp.zeros((batch,), jnp.int32))
    hlo = hlo.compile().as_text()
    collectives = re.findall(r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(", hlo)
    assert {kind for _, kind in collectives} == {"all-reduce"}
    shapes = [shape.split("{")[0] for shape, _ in collectives]
    sums = shapes.count(f"f32[{batch},1,{CONFIG.hidden_size}]")
    scale_maxes = shapes.count(f"f32[{batch}]")
    assert sums == 1 + 2 * CONFIG.num_layers
    assert scale_maxes == (0 if fmt == "float" else 2 * CONFIG.num_layers)
    assert len(shapes) == sums + scale_maxes


def test_kv_budget_counts_each_devices_share_of_the_heads():
    whole = kv_bytes_per_page(CONFIG, 64, 4, jnp.float32)
    assert kv_bytes_per_page(CONFIG, 64, 4, jnp.float32, kv_shards=2) == whole // 2
    with pytest.raises(ValueError, match="2 KV heads do not split over 4"):
        kv_bytes_per_page(CONFIG, 64, 4, jnp.float32, kv_shards=4)


def test_engine_on_a_mesh_samples_what_generate_samples():
    """Seeded sampling through the engine on 4 devices (budget per device) equals `generate` on one; so do the
    penalties, logit bias and log-probabilities (the token history and the vocabulary-split logits they read).

    On the float model: there the two paths' sums in another order move the logits by ulps, which no draw feels.
    On a W4A8KV4 model the same few ulps can move an int8 activation or int4 KV code (CODE_STEP above), and a
    seeded draw near a boundary of the CDF then takes the neighbouring token: exact equality of sampled tokens is
    not a property there (measured: reordering the CPU attention reference's sums flipped this test's second
    token on the g128 model). W4A8KV4 on a mesh is checked by the greedy and logits tests above."""
    float_params = qoq_jax.init_params(CONFIG, seed=2)
    prompts = [[1, 2, 3, 4, 5], [7, 9] * 10]
    expected = qoq_jax.generate(float_params, prompts[:1], max_new_tokens=6, temperature=0.8, top_k=20, seed=5)
    features = dict(presence_penalty=0.8, repetition_penalty=1.3, logit_bias={3: 4.0}, logprobs=2, prompt_logprobs=1)
    [featured] = qoq_jax.complete(
        float_params, prompts[1:], max_new_tokens=6, temperature=0.8, top_k=20, seed=6, ignore_eos=True, **features
    )
    page_bytes = kv_bytes_per_page(CONFIG, 16, 16, jnp.float32, kv_shards=2)
    engine = build_engine(
        float_params,
        mesh=make_mesh(4),
        max_num_seqs=2,
        max_model_len=48,
        page_size=16,
        kv_memory_bytes=12 * page_bytes,
        prefill_row_tokens=16,  # the 20-token prompt is prefilled in two chunks
        max_num_batched_tokens=64,
        max_prefill_rows=1,
        warmup="none",  # the steps' own programs only (a covering warm-up compiles ~3x as many on the mesh)
        compile_in_background=False,
    )
    assert engine.kv_cache.num_pages == 12
    samplings = [
        qoq_jax.SamplingParams(temperature=0.8, top_k=20, seed=5),
        qoq_jax.SamplingParams(temperature=0.8, top_k=20, seed=6, **features),
    ]
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        engine.add_request(Request(str(i), tuple(prompt), 6, sampling, ignore_eos=True))
    outputs = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for output in engine.step():
            outputs[output.request_id].append(output)
    assert [t for o in outputs["0"] for t in o.new_token_ids] == expected[0]
    assert [t for o in outputs["1"] for t in o.new_token_ids] == featured.token_ids
    logprobs = [e for o in outputs["1"] for e in o.new_logprobs]
    [prompt_logprobs] = [o.prompt_logprobs for o in outputs["1"] if o.prompt_logprobs is not None]
    for got, want in ((logprobs, featured.logprobs), (prompt_logprobs, featured.prompt_logprobs)):
        assert [e.token_id for e in got] == [e.token_id for e in want]
        for mine, theirs in zip(got, want):  # top values, not ids: a near tie may order two ids either way
            values = [mine.logprob, *(v for _, v in mine.top)]
            np.testing.assert_allclose(values, [theirs.logprob, *(v for _, v in theirs.top)], atol=1e-4)


@lowering_test
def test_sharded_decode_step_lowers_for_cuda_through_the_kernels():
    """Inside shard_map each device runs the Pallas kernels on its blocks: the W4A8 GEMM at the three local
    linear shapes and the KV4 decode attention over one KV head's pages are Triton calls."""
    quant = QuantFormat("w4a8-g128", kv_bits=4, group_size=128, kernel="pallas")
    params = qoq_jax.init_params(CONFIG, dtype="bfloat16", quant=quant, mesh=make_mesh(4))
    state = _abstract_state(4, dtype=jnp.bfloat16, kernel="pallas")
    lowered = qoq_jax.decode_step.trace(params, state, jax.ShapeDtypeStruct((4,), jnp.int32))
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 4
    assert 'name = "paged_decode_attention_kv4_p64' in text
    assert text.count("sdy.manual_computation") >= 1
