"""Checkpoints: exact round trips of float and quantized models, clear refusals, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import qoq_jax
from qoq_jax.checkpoint import is_checkpoint, read_metadata
from qoq_jax.errors import CheckpointError
from qoq_jax.quant import QuantFormat
from tiny_models import TINY_CONFIGS, tiny_tokenizer

RECIPE = {"name": "qoq-rtn", "parameters": {"seed": 3, "ratios": [0.9, 1.0]}, "stages": ["smooth", "rotate", "rtn"]}
TEXT = "This program is free software: you can redistribute it"


def make_params(name: str, dtype: str, quant: QuantFormat | None, tokenizer=None, seed: int = 0, **changes):
    config = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS[name]().to_dict())
    config = dataclasses.replace(config, **changes)
    return qoq_jax.init_params(config, dtype=dtype, seed=seed, tokenizer=tokenizer, quant=quant)


def assert_same_state(loaded, saved):
    assert jax.tree_util.tree_structure(loaded.state) == jax.tree_util.tree_structure(saved.state)
    for a, b in zip(jax.tree_util.tree_leaves(loaded.state), jax.tree_util.tree_leaves(saved.state), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def tokenizer(gpl_text):
    return tiny_tokenizer(gpl_text)


@pytest.mark.parametrize(
    "name, dtype, quant, changes",
    [
        ("llama_quantizable", "float32", None, {}),
        ("qwen2_quantizable_tied", "bfloat16", None, {}),
        ("llama_quantizable", "float32", QuantFormat("w4a8-g128", group_size=64), {}),
        ("qwen2_quantizable_tied", "bfloat16", QuantFormat("w4a8-chn"), {}),
        ("llama_quantizable", "bfloat16", QuantFormat("w8a8", kv_bits=8), {}),
        # Gemma 3 as QoQ leaves it (per-head q/k norms, post-norms, local rope, the online rotation's factors) and
        # Phi-4-mini's LongRoPE factors: every config field and parameter kind survives the round trip.
        ("gemma3_quantizable", "float32", None, {"input_rotation": (16, 8)}),
        ("phi4_mini_quantizable", "float32", None, {}),
    ],
)
def test_round_trip_is_exact(name, dtype, quant, changes, tokenizer, tmp_path):
    params = make_params(name, dtype, quant, tokenizer, **changes)
    path = qoq_jax.save_checkpoint(params, tmp_path / "ckpt", recipe=RECIPE)
    assert is_checkpoint(path) and not list(tmp_path.glob("*.tmp-*"))

    loaded = qoq_jax.load(path)
    assert_same_state(loaded, params)
    assert loaded.config == params.config and loaded.quant == quant and loaded.dtype == params.dtype
    assert loaded.tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    token_ids = np.random.default_rng(0).integers(0, params.config.vocab_size, (1, 6))
    # The tokenizer is static jit data compared by identity (and unused by `forward`): with the original's, the
    # loaded weights run in the program compiled for `params` instead of a second compilation.
    loaded = dataclasses.replace(loaded, tokenizer=params.tokenizer)
    np.testing.assert_array_equal(qoq_jax.forward(loaded, token_ids), qoq_jax.forward(params, token_ids))

    metadata = read_metadata(path)
    assert metadata["recipe"] == RECIPE and metadata["dtype"] == dtype
    assert metadata["quant"] == (
        None if quant is None else {"weights": quant.weights, "kv_bits": quant.kv_bits, "group_size": quant.group_size}
    )


def test_manifest_names_and_dtypes(tmp_path):
    params = make_params("llama_quantizable", "bfloat16", QuantFormat("w4a8-g128", group_size=64))
    tensors = read_metadata(qoq_jax.save_checkpoint(params, tmp_path / "ckpt"))["tensors"]
    assert tensors["embed_tokens"] == {"shape": [320, 192], "dtype": "bfloat16"}
    assert tensors["layers.0.self_attn.q_proj.kernel.packed"] == {"shape": [192, 96], "dtype": "uint8"}
    assert tensors["layers.0.self_attn.q_proj.kernel.s1"]["dtype"] == "float16"
    assert tensors["layers.1.mlp.down_proj.kernel.s2"] == {"shape": [6, 192], "dtype": "int8"}


def test_kernel_choice_is_not_stored(tmp_path):
    params = make_params("qwen2_quantizable_tied", "bfloat16", QuantFormat("w4a8-chn", kernel="reference"))
    path = qoq_jax.save_checkpoint(params, tmp_path / "ckpt")
    assert qoq_jax.load_checkpoint(path).quant.kernel == "auto"
    loaded = qoq_jax.load(path, kernel="reference")
    assert loaded.quant == params.quant
    assert loaded.state["layers"][0]["mlp"]["up_proj"]["kernel"].get_value().kernel == "reference"


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    params = make_params("llama_quantizable", "float32", QuantFormat("w4a8-g128", group_size=64), tokenizer)
    return qoq_jax.save_checkpoint(params, tmp_path_factory.mktemp("saved") / "ckpt", recipe=RECIPE)


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ckpt")


def edit_metadata(path, edit):
    metadata = json.loads((path / "qoq.json").read_text())
    edit(metadata)
    (path / "qoq.json").write_text(json.dumps(metadata))


def array_files(path):
    return sorted(
        (f for f in (path / "state").rglob("*") if f.is_file() and f.parent.name == "d"), key=lambda f: f.stat().st_size
    )


def test_refuses_other_format_version(copy):
    edit_metadata(copy, lambda m: m.update(format_version=2))
    with pytest.raises(CheckpointError, match=r"qoq\.json: format_version 2 is not supported"):
        qoq_jax.load(copy)


def test_refuses_config_that_disagrees_with_the_arrays(copy):
    edit_metadata(copy, lambda m: m["model_config"].update(hidden_size=128))
    with pytest.raises(CheckpointError, match="tensors manifest does not match") as error:
        qoq_jax.load(copy)
    assert "tensor embed_tokens has shape [320, 192], the model needs [320, 128]" in str(error.value)
    assert "tensor layers.0.input_layernorm.weight has shape [192]" in str(error.value)


def test_refuses_manifest_dtype_change(copy):
    edit_metadata(copy, lambda m: m["tensors"]["layers.0.self_attn.q_proj.kernel.s1"].update(dtype="float32"))
    with pytest.raises(
        CheckpointError, match="tensor layers.0.self_attn.q_proj.kernel.s1 has dtype float32, the model needs float16"
    ):
        qoq_jax.load(copy)


def test_lists_every_manifest_problem_at_once(copy):
    def edit(metadata):
        tensors = metadata["tensors"]
        tensors["layers.0.mlp.up_proj.kernel.bogus"] = tensors.pop("layers.0.mlp.up_proj.kernel.zero")
        tensors["norm.weight"]["shape"] = [7]

    edit_metadata(copy, edit)
    with pytest.raises(CheckpointError) as error:
        qoq_jax.load(copy)
    message = str(error.value)
    assert "missing tensor layers.0.mlp.up_proj.kernel.zero int8[3, 384]" in message
    assert "unexpected tensor layers.0.mlp.up_proj.kernel.bogus" in message
    assert "tensor norm.weight has shape [7], the model needs [192]" in message


def test_refuses_arrays_whose_stored_dtype_differs(copy):
    """Model dtype and manifest edited consistently: Orbax would silently cast the float32 files to bfloat16."""

    def edit(metadata):
        metadata["dtype"] = "bfloat16"
        for entry in metadata["tensors"].values():
            entry["dtype"] = "bfloat16" if entry["dtype"] == "float32" else entry["dtype"]

    edit_metadata(copy, edit)
    with pytest.raises(CheckpointError, match="the stored arrays does not match") as error:
        qoq_jax.load(copy)
    assert "tensor embed_tokens has dtype float32, the model needs bfloat16" in str(error.value)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_refuses_missing_or_truncated_array_file(copy, damage):
    largest = array_files(copy)[-1]
    if damage == "delete":
        largest.unlink()
    else:
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="state: the arrays cannot be read"):
        qoq_jax.load(copy)


def test_refuses_missing_state_directory(copy):
    shutil.rmtree(copy / "state")
    with pytest.raises(CheckpointError, match="state: the arrays cannot be read"):
        qoq_jax.load_checkpoint(copy)


def test_refuses_partial_checkpoint_without_metadata(copy):
    (copy / "qoq.json").unlink()
    assert not is_checkpoint(copy)
    with pytest.raises(CheckpointError, match="missing qoq.json"):
        qoq_jax.load_checkpoint(copy)


def test_refuses_unparseable_metadata(copy):
    (copy / "qoq.json").write_text('{"format_version": 1, "model_config": {')
    with pytest.raises(CheckpointError, match="qoq.json: cannot be parsed"):
        qoq_jax.load(copy)


def test_refuses_other_dtype(saved):
    with pytest.raises(CheckpointError, match="stores float32 weights and is not re-cast"):
        qoq_jax.load(saved, dtype="bfloat16")
    assert qoq_jax.load(saved, dtype="float32").dtype == np.float32


def test_refuses_existing_target_without_overwrite(saved):
    before = sorted(p.name for p in saved.rglob("*"))
    params = make_params("llama_quantizable", "float32", None)
    with pytest.raises(CheckpointError, match="already exists"):
        qoq_jax.save_checkpoint(params, saved)
    assert sorted(p.name for p in saved.rglob("*")) == before


def test_overwrite_never_replaces_an_unrelated_directory(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not a qoq checkpoint"):
        qoq_jax.save_checkpoint(make_params("llama_quantizable", "float32", None), tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------
# Atomicity
# --------------------------------------------------------------------------------------------------


def make_orbax_save_fail(monkeypatch):
    """Orbax writes the arrays, then fails, as a full disk or a kill would part-way through a checkpoint."""
    original = ocp.StandardCheckpointer.save

    def save(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        self.wait_until_finished()
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    make_orbax_save_fail(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        qoq_jax.save_checkpoint(make_params("llama_quantizable", "float32", None), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = make_params("llama_quantizable", "float32", None, seed=1)
    path = qoq_jax.save_checkpoint(old, tmp_path / "ckpt")
    make_orbax_save_fail(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        qoq_jax.save_checkpoint(make_params("llama_quantizable", "float32", None, seed=2), path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    monkeypatch.undo()
    assert_same_state(qoq_jax.load(path), old)


def test_overwrite_replaces_the_checkpoint(tmp_path):
    path = qoq_jax.save_checkpoint(make_params("llama_quantizable", "float32", None, seed=1), tmp_path / "ckpt")
    new = make_params("llama_quantizable", "bfloat16", QuantFormat("w8a8"), seed=2)
    qoq_jax.save_checkpoint(new, path, overwrite=True, recipe=RECIPE)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_same_state(qoq_jax.load(path), new)
    assert read_metadata(path)["recipe"] == RECIPE
