"""The QoQ calibration pipeline on tiny random models, the calibration sets, and `qoq-jax quantize` / `eval`."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from scipy.special import log_softmax
from tiny_models import TINY_CONFIGS, build_hf_model, save_hf_model, tiny_tokenizer

from flax import nnx

import qoq_jax
from converters.calibration_data import calibration_tokens
from converters.qoq import RECIPES, quantize_model, resolve_group_size
from qoq_jax.config import ModelConfig
from qoq_jax.quant import Int4ChannelWeight, Int4GroupWeight, QuantFormat
from serve.cli import main

FAMILIES = [
    "llama_quantizable",
    "qwen2_quantizable_tied",
    "qwen3_quantizable",
    "gemma2_quantizable",
    "gemma3_quantizable",
    "phi4_mini_quantizable",
]
# g128 on every family; per-channel (whose transforms are g128's, less the reorder) on the Llama and Qwen2 models.
RECIPE_CASES = [(family, "g128") for family in FAMILIES] + [
    (family, "gchn") for family in ("llama_quantizable", "qwen2_quantizable_tied")
]
LINEARS = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, gpl_text):
    tokenizer = tiny_tokenizer(gpl_text)
    dirs = {}
    for family in FAMILIES:
        directory = save_hf_model(build_hf_model(family), tmp_path_factory.mktemp(family))
        tokenizer.save_pretrained(directory)
        dirs[family] = directory
    return dirs


def _with_activation_outliers(params):
    """Real LLMs have a few hidden channels far larger than the rest, which is what rotation and smoothing are
    for; random tiny models do not, so give three channels of every norm 30× weight."""
    weights = nnx.to_pure_dict(params.state)
    offset = params.config.norm_weight_offset  # the norms scale by offset + weight
    for layer in weights["layers"].values():
        for norm in ("input_layernorm", "post_attention_layernorm"):
            gamma = layer[norm]["weight"] + offset
            layer[norm]["weight"] = gamma.at[jnp.array([5, 17, 40])].multiply(30.0) - offset
    state = params.state
    nnx.replace_by_pure_dict(state, weights)
    return dataclasses.replace(params, state=state)


@pytest.fixture(scope="module")
def outlier_models(model_dirs):
    """Per family: the float model with activation outliers and its plain-rounding (RTN W4A8KV4 g128) baseline,
    made once for both recipes (read-only). RTN reads no calibration statistics; one object per family also lets
    the recipes' tests share their compiled forwards."""
    models = {}
    for family in FAMILIES:
        params = _with_activation_outliers(qoq_jax.load(model_dirs[family]))
        rtn, _ = quantize_model(params, RECIPES["rtn-w4a8kv4-g128"], np.ones((1, 16), np.int32), progress=False)
        models[family] = params, rtn
    return models


def _output_error(params, reference_logits, tokens):
    """Mean squared logit error relative to the logits' variance."""
    logits = qoq_jax.forward(params, tokens)
    return float(jnp.mean((logits - reference_logits) ** 2) / jnp.var(reference_logits))


@pytest.mark.parametrize("family, recipe_name", RECIPE_CASES)
def test_recipe_quantizes_every_decoder_linear_and_beats_plain_rounding(outlier_models, family, recipe_name):
    params, rtn = outlier_models[family]
    rng = np.random.default_rng(222)
    calibration = rng.integers(3, params.config.vocab_size, (6, 96)).astype(np.int32)
    held_out = jnp.asarray(rng.integers(3, params.config.vocab_size, (2, 64)))
    recipe = RECIPES[recipe_name]

    quantized, report = quantize_model(params, recipe, calibration, batch_size=4, progress=False)
    weight_type = Int4GroupWeight if recipe_name == "g128" else Int4ChannelWeight
    quant = quantized.quant
    group_size = resolve_group_size(recipe, params.config)
    assert (quant.weights, quant.kv_bits, quant.group_size) == (recipe.weights, 4, group_size)
    assert quant.qk_transform == recipe.qk_transform and (quant.kv_clip is not None) == recipe.kv_clip_search
    for layer in range(params.config.num_layers):
        for module, name in LINEARS:
            kernel = quantized.state["layers"][layer][module][name]["kernel"].get_value()
            assert isinstance(kernel, weight_type), (layer, name)
    if params.config.post_norms:
        # The block inputs rotate online (the stored ±1 Hadamard factors); embeddings and the head are untouched.
        assert quantized.config.input_rotation is not None
        assert quantized.config.tie_word_embeddings == params.config.tie_word_embeddings
        rotation = quantized.state["layers"][0]["input_rotation"]
        assert set(np.unique(np.asarray(rotation["outer"][...]))) <= {-1.0, 1.0}
    else:
        # Rotation folded the norms and gave the LM head its own (rotated) copy of the embedding.
        assert not quantized.config.tie_word_embeddings and quantized.state["lm_head"] is not None
        np.testing.assert_array_equal(np.asarray(quantized.state["norm"]["weight"][...]), 1.0)
    assert report["stages"] == recipe.stages() and report["calibration"] == {"samples": 6, "seq_len": 96}

    reference = qoq_jax.forward(params, held_out)
    qoq_error, rtn_error = _output_error(quantized, reference, held_out), _output_error(rtn, reference, held_out)
    # Tiny random models are fragile at 4 bits (QoQ ≈ 0.35–0.5, RTN ≈ 0.53–0.56 in trials); what matters is
    # that the whole pipeline stays bounded and beats plain rounding of the same format.
    assert qoq_error < 0.7, qoq_error
    assert qoq_error < rtn_error, (qoq_error, rtn_error)


def test_weight_only_and_w8a8_baselines(model_dirs):
    params = qoq_jax.load(model_dirs["llama_quantizable"])
    calibration = np.random.default_rng(223).integers(3, 320, (4, 64)).astype(np.int32)
    tokens = jnp.asarray(np.random.default_rng(224).integers(3, 320, (2, 48)))
    reference = qoq_jax.forward(params, tokens)
    for name in ("rtn-w4a16-progressive", "gptq-w4a16-g128"):
        weight_only, _ = quantize_model(params, RECIPES[name], calibration, progress=False)
        assert weight_only.quant is None and weight_only.dtype == params.dtype  # dequantized float weights
        kernel = np.asarray(weight_only.state["layers"][0]["mlp"]["up_proj"]["kernel"][...])
        assert all(len(np.unique(kernel[g * 64 : (g + 1) * 64, c])) <= 16 for g in range(3) for c in range(0, 384, 37))
    w8a8, _ = quantize_model(params, RECIPES["rtn-w8a8"], calibration, progress=False)
    assert w8a8.kv_bits == 16
    assert _output_error(w8a8, reference, tokens) < 0.05 < _output_error(weight_only, reference, tokens) < 0.6


def test_a_gptq_failure_raises_naming_the_layer(model_dirs):
    """A NaN in layer 1's up_proj makes down_proj's inputs NaN there: its Hessian never factorizes, and GPTQ must
    stop naming that linear instead of casting NaN codes to uint8."""
    params = qoq_jax.load(model_dirs["llama_quantizable"])
    weights = nnx.to_pure_dict(params.state)
    weights["layers"][1]["mlp"]["up_proj"]["kernel"] = weights["layers"][1]["mlp"]["up_proj"]["kernel"].at[3, 7].set(
        jnp.nan
    )
    state = params.state
    nnx.replace_by_pure_dict(state, weights)
    broken = dataclasses.replace(params, state=state)
    calibration = np.random.default_rng(2).integers(3, 320, (4, 64)).astype(np.int32)  # test_weight_only's shapes
    with pytest.raises(qoq_jax.CalibrationError, match=r"layers\.1\.mlp\.down_proj: GPTQ failed"):
        quantize_model(broken, RECIPES["gptq-w4a16-g128"], calibration, progress=False)


def test_group_size_follows_the_shapes_and_refuses_what_does_not_fit():
    llama = ModelConfig.from_hf(TINY_CONFIGS["llama_quantizable"]().to_dict())  # hidden 192: groups of 64
    assert resolve_group_size(RECIPES["g128"], llama) == 64
    wide = dataclasses.replace(llama, hidden_size=256, num_heads=8, intermediate_size=512)
    assert resolve_group_size(RECIPES["g128"], wide) == 128
    with pytest.raises(ValueError, match="group size"):
        resolve_group_size(dataclasses.replace(RECIPES["g128"], group_size=128), llama)
    assert resolve_group_size(RECIPES["gchn"], llama) is None
    odd = ModelConfig.from_hf(TINY_CONFIGS["llama"]().to_dict())  # k_proj has 32 outputs
    with pytest.raises(ValueError, match="k_proj"):
        quantize_model(qoq_jax.init_params(odd), RECIPES["gchn"], np.ones((1, 16), np.int32), progress=False)


def test_an_already_quantized_model_is_refused():
    config = ModelConfig.from_hf(TINY_CONFIGS["llama_quantizable"]().to_dict())
    quantized = qoq_jax.init_params(config, quant=QuantFormat("w4a8-chn"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(quantized, RECIPES["g128"], np.ones((1, 16), np.int32), progress=False)


def test_calibration_tokens_from_text_files_and_pydoc(tmp_path, gpl_text):
    tokenizer = tiny_tokenizer(gpl_text)
    path = tmp_path / "calib.txt"
    path.write_text(gpl_text)
    tokens = calibration_tokens(tokenizer, path, num_samples=5, seq_len=128)
    assert tokens.shape == (5, 128) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, calibration_tokens(tokenizer, str(path), num_samples=5, seq_len=128))
    assert not np.array_equal(tokens, calibration_tokens(tokenizer, path, num_samples=5, seq_len=128, seed=7))
    # The chunks are the file's text (windows may cut a word at their edges).
    words = tokenizer.decode(tokens.reshape(-1)).split()
    assert np.mean([word in gpl_text for word in words]) > 0.95
    pydoc = calibration_tokens(tokenizer, "pydoc", num_samples=3, seq_len=256)
    assert pydoc.shape == (3, 256)
    with pytest.raises(ValueError, match="fewer than one"):
        calibration_tokens(tokenizer, path, num_samples=1, seq_len=10**6)
    with pytest.raises(ValueError, match="neither a text file"):
        calibration_tokens(tokenizer, tmp_path / "missing.txt", num_samples=1, seq_len=8)


def test_cli_quantize_then_eval_then_generate(model_dirs, tmp_path, capsys, gpl_text):
    """On a model whose layer-1 down_proj has an all-zero input channel (a pruned channel): SmoothLinear's scale
    there is x^α / 0^β = ∞, which turns the stage off for that layer; the report records it and quantize says so."""
    model = shutil.copytree(model_dirs["llama_quantizable"], tmp_path / "model")
    with safe_open(model / "model.safetensors", framework="np") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["model.layers.1.mlp.down_proj.weight"][:, 5] = 0.0
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    output = tmp_path / "ckpt"
    calib = tmp_path / "calib.txt"
    calib.write_text(gpl_text[: len(gpl_text) // 2])
    args = ["--model", str(model), "--recipe", "g128", "--calib", str(calib)]
    assert main(["quantize", *args, "--samples", "4", "--seq-len", "64", "--output", str(output)]) == 0
    metadata = json.loads((output / "qoq.json").read_text())
    assert {k: metadata["quant"][k] for k in ("weights", "kv_bits", "group_size")} == {
        "weights": "w4a8-g128", "kv_bits": 4, "group_size": 64
    }
    assert metadata["quant"]["qk_transform"] and metadata["quant"]["kv_range_search"]  # the default KV stages
    assert "kv_clip" not in metadata["quant"]
    assert metadata["recipe"]["recipe"]["name"] == "g128" and metadata["recipe"]["calibration"]["samples"] == 4
    [disabled] = metadata["recipe"]["disabled_stages"]
    assert disabled["layer"] == 1 and disabled["stage"] == "smooth_linear" and "NaN/Inf" in disabled["reason"]
    assert "[warning: layer 1: smooth_linear disabled (" in capsys.readouterr().err
    # A second run into the same directory is refused without --overwrite.
    assert main(["quantize", *args, "--samples", "2", "--seq-len", "64", "--output", str(output)]) == 2
    assert "exists" in capsys.readouterr().err

    text = tmp_path / "eval.txt"
    text.write_text(gpl_text[len(gpl_text) // 2 :])
    assert main(["eval", "--model", str(output), "--text", str(text), "--seq-len", "128"]) == 0
    reported = float(capsys.readouterr().out.split()[-1])
    loaded = qoq_jax.load(output)
    assert reported == pytest.approx(qoq_jax.perplexity(loaded, text.read_text(), seq_len=128).perplexity, rel=1e-4)
    assert main(["generate", "--model", str(output), "--max-new-tokens", "4", "--no-warmup", "Free software"]) == 0


def test_perplexity_protocol_matches_a_direct_computation(model_dirs, gpl_text):
    params = qoq_jax.load(model_dirs["llama_quantizable"])
    ids = np.asarray(params.tokenizer(gpl_text[:6000]).input_ids)
    seq_len = 128
    chunks = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
    losses = []
    for chunk in chunks:
        logits = np.asarray(qoq_jax.forward(params, jnp.asarray(chunk[None])), np.float64)[0, :-1]
        log_probs = log_softmax(logits, axis=-1)
        losses.append(-log_probs[np.arange(seq_len - 1), chunk[1:]].mean())
    result = qoq_jax.perplexity(params, gpl_text[:6000], seq_len=seq_len, batch_size=3)
    assert result.num_chunks == len(chunks) and result.num_tokens == len(ids)
    assert result.perplexity == pytest.approx(float(np.exp(np.mean(losses))), rel=1e-4)
    with pytest.raises(ValueError, match="fewer than one"):
        qoq_jax.perplexity(params, "short", seq_len=seq_len)
    with pytest.raises(qoq_jax.PromptTooLongError):
        qoq_jax.perplexity(params, gpl_text, seq_len=params.config.max_context + 1)


def test_kv4_round_trip_is_part_of_the_quantized_forward(model_dirs):
    """forward on a quantized model attends over K/V after their 4-bit round trip: KV16 of the same weights
    gives different logits, and KV8 lies between."""
    params = qoq_jax.load(model_dirs["llama_quantizable"])
    quantized, _ = quantize_model(params, RECIPES["rtn-w4a8kv4-g128"], np.ones((1, 16), np.int32), progress=False)
    tokens = jnp.asarray(np.random.default_rng(225).integers(3, 320, (2, 40)))
    logits = {bits: qoq_jax.forward(_with_kv_bits(quantized, bits), tokens) for bits in (4, 8, 16)}
    kv8_gap = float(jnp.abs(logits[8] - logits[16]).mean())
    kv4_gap = float(jnp.abs(logits[4] - logits[16]).mean())
    assert 0 < kv8_gap < kv4_gap


def _with_kv_bits(params, bits):
    return dataclasses.replace(params, quant=dataclasses.replace(params.quant, kv_bits=bits))
