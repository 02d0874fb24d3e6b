"""HF directory import variants and every import error path: clear errors, never a half-loaded model."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch

import qoq_jax
from converters.gguf_import import unpermute_qk_rows
from qoq_jax.errors import CheckpointError, UnsupportedModelError
from tiny_models import TINY_CONFIGS, build_hf_model, save_gguf, save_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model("llama", seed=3)


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    return save_hf_model(hf_model, tmp_path_factory.mktemp("single"))


@pytest.fixture
def copy_of(model_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    return directory


def reference_logits(hf_model, token_ids):
    with torch.no_grad():
        return hf_model(torch.tensor(token_ids)).logits.numpy()


def assert_same_model(params, hf_model):
    token_ids = np.random.default_rng(214).integers(0, params.config.vocab_size, (1, 16))
    np.testing.assert_allclose(qoq_jax.forward(params, token_ids), reference_logits(hf_model, token_ids), atol=1e-4)


def test_sharded_safetensors(hf_model, tmp_path):
    directory = save_hf_model(hf_model, tmp_path, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 2
    assert_same_model(qoq_jax.load(directory), hf_model)


def test_pytorch_bin(hf_model, model_dir, tmp_path):
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_model(qoq_jax.load(tmp_path), hf_model)


def test_bfloat16_safetensors_loads_in_any_dtype(hf_model, tmp_path):
    directory = save_hf_model(hf_model.to(torch.bfloat16), tmp_path)
    hf_model.to(torch.float32)
    for dtype in ("float32", "bfloat16", "float16"):
        params = qoq_jax.load(directory, dtype=dtype)
        assert params.dtype == np.dtype(dtype)
        expected = hf_model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
        np.testing.assert_allclose(np.asarray(params.state["embed_tokens"][...], np.float32), expected, rtol=1e-2)


def test_tokenizer_is_loaded_with_the_model(hf_model, gpl_text, tmp_path):
    directory = save_hf_model(hf_model, tmp_path)
    tiny_tokenizer(gpl_text).save_pretrained(directory)
    params = qoq_jax.load(directory)
    assert params.tokenizer is not None
    assert params.tokenizer("General Public").input_ids == tiny_tokenizer(gpl_text)("General Public").input_ids


def test_missing_config(copy_of):
    (copy_of / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        qoq_jax.load(copy_of)


def test_missing_weights(copy_of):
    (copy_of / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        qoq_jax.load(copy_of)


def test_missing_shard(hf_model, tmp_path):
    directory = save_hf_model(hf_model, tmp_path, max_shard_size="40KB")
    shard = sorted(directory.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {shard.name}"):
        qoq_jax.load(directory)


@pytest.mark.parametrize("keep_fraction", [0.0001, 0.5, 0.99])
def test_truncated_safetensors(copy_of, keep_fraction):
    weights = copy_of / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(int(len(data) * keep_fraction), 4)])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        qoq_jax.load(copy_of)


def test_shape_mismatch_lists_every_bad_tensor(copy_of):
    config = json.loads((copy_of / "config.json").read_text())
    config["intermediate_size"] += 8
    (copy_of / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as raised:
        qoq_jax.load(copy_of)
    message = str(raised.value)
    for layer in range(config["num_hidden_layers"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"layers.{layer}.mlp.{proj}.kernel has shape" in message


def test_missing_tensor_is_named(hf_model, tmp_path):
    state = {k: v for k, v in hf_model.state_dict().items() if k != "model.layers.1.post_attention_layernorm.weight"}
    hf_model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match=r"lacks: model\.layers\.1\.post_attention_layernorm\.weight$"):
        qoq_jax.load(tmp_path)


def test_unexpected_tensor_is_named(hf_model, model_dir, tmp_path):
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    state = dict(hf_model.state_dict())
    state["model.layers.0.self_attn.rotary_bias"] = torch.zeros(4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="rotary_bias"):
        qoq_jax.load(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope scaling type 'yarn'"),
        ({"quantization_config": {"quant_method": "awq"}}, "pre-quantized checkpoints \\(awq\\)"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ],
)
def test_unsupported_options_are_refused_by_name(copy_of, change, message):
    config = json.loads((copy_of / "config.json").read_text())
    config.update(change)
    (copy_of / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=message):
        qoq_jax.load(copy_of)


def test_yi_loads_as_llama():
    config = TINY_CONFIGS["llama"]().to_dict()
    config["architectures"] = ["YiForCausalLM"]
    assert qoq_jax.ModelConfig.from_hf(config).architecture == "LlamaForCausalLM"


def test_sliding_windows_are_per_layer_and_do_not_limit_the_context():
    mistral = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS["mistral"]().to_dict())
    assert mistral.max_context == 512 and mistral.sliding_layers == (True, True) and mistral.layer_window(1) == 16
    qwen3 = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS["qwen3"]().to_dict())  # windows from max_window_layers = 1
    assert [qwen3.layer_window(i) for i in range(2)] == [None, 16]
    gemma2 = qoq_jax.ModelConfig.from_hf({**TINY_CONFIGS["gemma2"]().to_dict(), "layer_types": None})
    assert gemma2.sliding_layers == (True, False), "Gemma 2 alternates local and global layers"
    no_window = {**TINY_CONFIGS["qwen3"]().to_dict(), "use_sliding_window": False}
    assert qoq_jax.ModelConfig.from_hf(no_window).sliding_window is None


def test_unknown_source(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        qoq_jax.load(tmp_path / "nowhere")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="expected a .gguf file or a model directory"):
        qoq_jax.load(tmp_path / "weights.txt")


def test_truncated_gguf(tmp_path):
    from converters.importing import smollm2_path

    with open(smollm2_path(), "rb") as source:
        head = source.read(1 << 20)
    (tmp_path / "broken.gguf").write_bytes(head)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        qoq_jax.load(tmp_path / "broken.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's convert_hf_to_gguf permutes rows per head as reshape(h, 2, d/2).swapaxes(1, 2)."""
    rng = np.random.default_rng(215)
    for num_heads, head_dim in ((4, 8), (3, 64), (1, 16)):
        w = rng.standard_normal((num_heads * head_dim, 5))
        permuted = w.reshape(num_heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(unpermute_qk_rows(permuted, num_heads), w)


def test_transformers_still_keeps_the_gguf_tokenizer_converter_where_we_read_it():
    """converters/gguf_import.py reads transformers' GGUF tokenizer converter from a module that is not public API.
    If a transformers release moves or reshapes it, this fails first and says what to update."""
    import importlib

    import transformers

    from converters import gguf_import

    where = gguf_import._TRANSFORMERS_GGUF_MODULE
    try:
        module = importlib.import_module(where)
    except ImportError as err:
        pytest.fail(f"transformers {transformers.__version__} moved {where} ({err}): update gguf_tokenizer()")
    assert callable(getattr(module, "convert_gguf_tokenizer", None)), f"{where}.convert_gguf_tokenizer is gone"
    groups = getattr(module, "GGUF_TOKENIZER_MAPPING", {})
    assert {"tokenizer", "tokenizer_config"} <= set(groups), f"{where}.GGUF_TOKENIZER_MAPPING changed shape"
    assert {"ggml.tokens", "ggml.model"} <= set(groups["tokenizer"]), "the GGUF tokenizer keys we read moved"


# Each GGUF architecture from a tiny transformers model written as llama.cpp writes it. Gemma's attention scale and
# Gemma 3's layer pattern are not in the file (llama.cpp hard-codes them), so these models have the real ones.
GGUF_CASES = {
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {"use_sliding_window": False}),  # llama.cpp's qwen3 has no sliding window
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16}),
    "gemma3": ("gemma3", {"query_pre_attn_scalar": 16, "num_hidden_layers": 6, "layer_types": None}),
    "phi4_mini_longrope": ("phi3", {}),
}


@pytest.mark.parametrize("name", sorted(GGUF_CASES))
def test_gguf_import_equals_the_hf_import(name, tmp_path):
    """The GGUF reader undoes every change llama.cpp's converter makes: the same config and the same arrays as
    importing the transformers directory (itself checked against transformers' logits in test_model_parity)."""
    architecture, changes = GGUF_CASES[name]
    hf_model = build_hf_model(name, seed=5, **changes)
    from_hf = qoq_jax.load(save_hf_model(hf_model, tmp_path / "hf"), dtype="float32")
    from_gguf = qoq_jax.load(save_gguf(hf_model, tmp_path / "model.gguf", architecture), dtype="float32")
    assert_same_up_to_float32(from_gguf.config.to_dict(), from_hf.config.to_dict())  # GGUF stores float32
    assert from_gguf.tokenizer is None  # the file has no vocabulary: token-id prompts only
    hf_leaves = flat_leaves(from_hf)
    for path, leaf in flat_leaves(from_gguf).items():
        np.testing.assert_allclose(leaf, hf_leaves[path], rtol=0, atol=1e-6, err_msg=path)
    assert hf_leaves.keys() == flat_leaves(from_gguf).keys()


def assert_same_up_to_float32(ours, expected, where="config"):
    if isinstance(expected, dict):
        assert ours.keys() == expected.keys(), where
        for key in expected:
            assert_same_up_to_float32(ours[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(ours) == len(expected), where
        for index, (a, b) in enumerate(zip(ours, expected)):
            assert_same_up_to_float32(a, b, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert ours == pytest.approx(expected, rel=1e-6), where
    else:
        assert ours == expected, where


def flat_leaves(params) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(params.state)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope="module")
def family_models():
    return {name: build_hf_model(name, seed=9) for name in ("qwen3", "gemma2", "phi3")}


@pytest.mark.parametrize(
    "name, dropped, message",
    [
        # Each missing tensor is named as the checkpoint names it: Phi-3's fused projections, Gemma's norms.
        ("phi3", "model.layers.1.self_attn.qkv_proj.weight", r"model\.layers\.1\.self_attn\.qkv_proj\.weight$"),
        ("phi3", "model.layers.0.mlp.gate_up_proj.weight", r"model\.layers\.0\.mlp\.gate_up_proj\.weight$"),
        ("gemma2", "model.layers.0.pre_feedforward_layernorm.weight", r"layers\.0\.pre_feedforward_layernorm\.weight$"),
        ("gemma2", "model.layers.1.post_attention_layernorm.weight", r"layers\.1\.post_attention_layernorm\.weight$"),
        ("qwen3", "model.layers.0.self_attn.k_norm.weight", r"model\.layers\.0\.self_attn\.k_norm\.weight$"),
    ],
)
def test_a_missing_family_tensor_is_named_in_the_checkpoints_terms(family_models, tmp_path, name, dropped, message):
    state = {key: value for key, value in family_models[name].state_dict().items() if key != dropped}
    family_models[name].save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match=message):
        qoq_jax.load(tmp_path)


def test_a_fused_tensor_of_the_wrong_size_is_refused(family_models, tmp_path):
    state = dict(family_models["phi3"].state_dict())
    state["model.layers.0.mlp.gate_up_proj.weight"] = state["model.layers.0.mlp.gate_up_proj.weight"][:-8]
    family_models["phi3"].save_pretrained(tmp_path, state_dict=state)
    message = r"gate_up_proj\.weight has shape \(184, 64\); .*192 rows \(parts of 96 \+ 96\)"
    with pytest.raises(CheckpointError, match=message):
        qoq_jax.load(tmp_path)


@pytest.mark.parametrize(
    "name, rope, message",
    [
        ("phi3", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope scaling type 'yarn'"),
        ("qwen3", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope scaling type 'dynamic'"),
        (
            "gemma2",
            {"sliding_attention": {"rope_type": "default"}, "full_attention": {"rope_type": "yarn", "factor": 8.0}},
            "rope scaling type 'yarn'",
        ),
        (
            "phi3",
            {"rope_type": "longrope", "short_factor": [1.0] * 5, "long_factor": [1.0] * 5, "rope_theta": 1e4},
            "short_factor/long_factor have 5/5 entries; 16 rotary channels need 8",
        ),
        ("phi3", {"rope_type": "longrope", "short_factor": [1.0] * 8, "rope_theta": 1e4}, "needs both short_factor"),
    ],
)
def test_unsupported_family_rope_is_refused_by_name(family_models, tmp_path, name, rope, message):
    directory = save_hf_model(family_models[name], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = rope
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=message):
        qoq_jax.load(directory)
