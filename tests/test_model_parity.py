"""qoq_jax against transformers on tiny random models of the Llama family (Llama, Mistral, Qwen2), in float32; the
other families (Qwen3, Gemma, Phi) are checked in test_families.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qoq_jax
from qoq_jax.rope import inverse_frequencies
from tiny_models import TINY_CONFIGS, build_hf_model, save_hf_model

LOGITS_RTOL = 1e-4


def relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


LLAMA_FAMILY = sorted(name for name in TINY_CONFIGS if name.startswith(("llama", "mistral", "qwen2")))


@pytest.fixture(scope="module", params=LLAMA_FAMILY)
def pair(request, tmp_path_factory):
    """(transformers model, qoq_jax params loaded from its saved safetensors)."""
    hf_model = build_hf_model(request.param, seed=len(request.param))
    directory = save_hf_model(hf_model, tmp_path_factory.mktemp(request.param))
    hf_model.generation_config.eos_token_id = None
    return request.param, hf_model, qoq_jax.load(directory, dtype="float32")


def test_logits_match_transformers(pair):
    name, hf_model, params = pair
    token_ids = np.random.default_rng(216).integers(0, params.config.vocab_size, (2, 48))
    with torch.no_grad():
        reference = hf_model(torch.tensor(token_ids)).logits.numpy()
    assert relative_error(qoq_jax.forward(params, token_ids), reference) <= LOGITS_RTOL, name


def test_greedy_generation_matches_transformers(pair):
    name, hf_model, params = pair
    prompt = np.random.default_rng(217).integers(3, params.config.vocab_size, 9).tolist()
    with torch.no_grad():
        reference = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    ours = qoq_jax.generate(params, [prompt], max_new_tokens=16, ignore_eos=True)
    assert ours == [reference[0, len(prompt) :].tolist()], name


def test_rotary_frequencies_match_transformers(pair):
    name, hf_model, params = pair
    ours = inverse_frequencies(params.config.rope, params.config.head_dim)
    np.testing.assert_allclose(ours, hf_model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6, err_msg=name)


def test_scaled_rope_differs_from_default():
    """Guards the rope-scaling parity tests against both sides silently using the default rope."""
    for name, kind in (("llama31_rope", "llama3"), ("llama_linear_rope", "linear")):
        config = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS[name]().to_dict())
        assert config.rope.rope_type == kind
        default = inverse_frequencies(qoq_jax.RopeConfig(theta=config.rope.theta), config.head_dim)
        assert np.max(np.abs(inverse_frequencies(config.rope, config.head_dim) - default)) > 1e-3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model(build_hf_model("llama", seed=7), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama(llama_dir):
    return qoq_jax.load(llama_dir, dtype="float32")


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_stays_close_to_float32(llama, llama_dir, dtype, tolerance):
    half = qoq_jax.load(llama_dir, dtype=dtype)
    token_ids = np.random.default_rng(218).integers(0, llama.config.vocab_size, (2, 24))
    logits = qoq_jax.forward(half, token_ids)
    assert logits.dtype == np.float32
    assert relative_error(logits, np.asarray(qoq_jax.forward(llama, token_ids))) <= tolerance
    [tokens] = qoq_jax.generate(half, [token_ids[0].tolist()], max_new_tokens=8, ignore_eos=True)
    assert len(tokens) == 8


def test_prefill_and_decode_steps_match_forward(llama):
    rng = np.random.default_rng(219)
    token_ids = rng.integers(0, llama.config.vocab_size, (3, 20))
    lengths = np.array([20, 13, 5])
    continuation = rng.integers(0, llama.config.vocab_size, (3, 4))
    # Each row's whole sequence (its prompt, then the 4 tokens it decodes, then padding) in one causal forward:
    # the logits at a position are the forward of the sequence up to it (one compiled shape, not one per prefix).
    sequences = rng.integers(0, llama.config.vocab_size, (3, 24))
    for row in range(3):
        sequences[row, : lengths[row] + 4] = np.concatenate([token_ids[row, : lengths[row]], continuation[row]])
    full = np.asarray(qoq_jax.forward(llama, sequences))
    state, logits = qoq_jax.prefill(llama, token_ids, lengths, max_length=32)
    np.testing.assert_allclose(logits, full[np.arange(3), lengths - 1], rtol=1e-5, atol=1e-5)
    # Decode the sequences' true continuations one token at a time.
    for step in range(4):
        state, logits = qoq_jax.decode_step(llama, state, continuation[:, step])
        np.testing.assert_allclose(logits, full[np.arange(3), lengths + step], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state.lengths, lengths + 4)


def test_padded_batch_equals_each_prompt_alone(llama):
    rng = np.random.default_rng(220)
    prompts = [rng.integers(3, llama.config.vocab_size, n).tolist() for n in (3, 17, 9, 30, 1)]
    batched = qoq_jax.generate(llama, prompts, max_new_tokens=12, ignore_eos=True)
    alone = [qoq_jax.generate(llama, [p], max_new_tokens=12, ignore_eos=True)[0] for p in prompts]
    assert batched == alone


def test_user_jit_of_the_step_functions(llama):
    """The step functions are pure over pytrees: a user's own jit (with donation) composes with them."""
    import jax

    token_ids = np.random.default_rng(221).integers(0, llama.config.vocab_size, (2, 8))
    state, logits = jax.jit(qoq_jax.prefill, static_argnames="max_length")(llama, token_ids, max_length=16)
    step = jax.jit(qoq_jax.decode_step, donate_argnums=1)
    state, next_logits = step(llama, state, np.argmax(logits, -1))
    sequences = np.concatenate([token_ids, np.argmax(logits, -1)[:, None]], axis=1)
    expected = np.asarray(qoq_jax.forward(llama, sequences))[:, -1]
    np.testing.assert_allclose(next_logits, expected, rtol=1e-5, atol=1e-5)
