"""Every boundary of the Python API refuses what it cannot serve with a `QoQError` naming the field and its range:
sampling values that do not fit the dtypes they become, token ids outside the vocabulary, lengths outside the
prompt block or the cache, text that is not valid Unicode, malformed model configs and checkpoints. Inside a
user's own `jax.jit` the values are not known: there the steps' documented behaviour holds, tested here too."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qoq_jax
from qoq_jax.errors import ConfigError, InvalidRequestError, InvalidSamplingError, PromptTooLongError
from qoq_jax.sampling import SamplingParams
from serve.cli import main
from serve.request import Request
from tiny_models import build_hf_model, save_hf_model, sharp_tiny_llama, tiny_tokenizer

INT32_MAX = 2**31 - 1
VOCAB = 320  # the tiny Llama's


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


@pytest.fixture(scope="module")
def prompt_ids(params):
    return np.random.default_rng(7).integers(3, VOCAB, (2, 16)).astype(np.int32)


# ------------------------------------------------------------------------------------------- sampling values


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("top_k", 2**31, r"top_k must be an integer in \[0, 2\*\*31\)"),
        ("top_k", 2**40, r"top_k must be an integer in \[0, 2\*\*31\)"),
        ("top_k", float("inf"), "top_k must be an integer"),
        ("top_k", "5", "top_k must be an integer"),
        ("temperature", 1e39, "temperature must be a finite float32 >= 0"),
        ("temperature", "hot", "temperature must be a finite float32 >= 0"),
        ("top_p", float("nan"), r"top_p must be in \(0, 1\]"),
        ("top_p", None, r"top_p must be in \(0, 1\]"),
        ("seed", 2**32, r"seed must be an integer in \[0, 2\*\*32\)"),
        ("seed", 1.5, r"seed must be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_sampling_values_must_fit_their_dtypes(field, value, message):
    with pytest.raises(InvalidSamplingError, match=message):
        SamplingParams(**{field: value})


def test_the_largest_values_that_fit_are_accepted():
    largest = SamplingParams(temperature=3.0e38, top_k=INT32_MAX, top_p=1.0, seed=2**32 - 1)
    assert largest.top_k == INT32_MAX and np.isfinite(np.float32(largest.temperature))


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(top_k=2**31), InvalidSamplingError, "top_k"),
        (dict(temperature=1e39), InvalidSamplingError, "temperature"),
        (dict(seed=2**32 - 1), InvalidSamplingError, "seed"),  # the second prompt's seed + 1 does not fit
        (dict(stop_token_ids=[2**40]), InvalidRequestError, r"stop_token_ids must be integers in \[0, 2\*\*31\)"),
        (dict(stop=["\ud800"]), InvalidRequestError, r"stop\[0\]: not valid Unicode"),
        (dict(max_new_tokens=2.5), InvalidRequestError, "max_new_tokens must be an integer"),
        (dict(decode_chunk=10**9), InvalidRequestError, r"decode_chunk must be an integer in \[1, 512\]"),
    ],
)
def test_generate_refuses_values_that_do_not_fit(params, options, error, message):
    with pytest.raises(error, match=message):
        qoq_jax.generate(params, [[5, 6, 7], [8, 9]], **options)


def test_generate_refuses_text_that_is_not_unicode_and_ids_that_are_not_integers(params):
    with pytest.raises(InvalidRequestError, match=r"prompts\[1\]: not valid Unicode \(a lone surrogate at 0\)"):
        qoq_jax.generate(params, ["fine", "\ud800abc"])
    with pytest.raises(InvalidRequestError, match=r"prompts\[0\]\[0\]\.content: not valid Unicode"):
        qoq_jax.generate(params, [[{"role": "user", "content": "\udfff"}]])
    with pytest.raises(InvalidRequestError, match=r"prompts\[0\]: token ids must be integers"):
        qoq_jax.generate(params, [[1.5, 2]])


# ------------------------------------------------------------------------------------- serving requests


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt_token_ids=(1, 2**31)), r"prompt_token_ids must be integers in \[0, 2\*\*31\)"),
        (dict(prompt_token_ids=(1, -1)), r"prompt_token_ids must be integers in \[0, 2\*\*31\)"),
        (dict(prompt_token_ids=()), "prompt_token_ids: the prompt is empty"),
        (dict(max_tokens=2**31), r"max_tokens must be an integer in \[1, 2\*\*31\)"),
        (dict(max_tokens=0), r"max_tokens must be an integer in \[1, 2\*\*31\)"),
        (dict(stop=("ok", "\ud800")), r"stop\[1\]: not valid Unicode"),
        (dict(stop_token_ids=(2**35,)), r"stop_token_ids must be integers in \[0, 2\*\*31\)"),
        (dict(request_id=""), "request_id must be a non-empty string"),
    ],
)
def test_requests_refuse_values_that_do_not_fit(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        Request(**{"request_id": "r", "prompt_token_ids": (1, 2), "max_tokens": 4, **fields})


# ---------------------------------------------------------------------------- forward / prefill / decode_step


def test_forward_refuses_ids_outside_the_vocabulary(params, prompt_ids):
    for bad in (VOCAB, -1):
        ids = prompt_ids.copy()
        ids[1, 5] = bad
        with pytest.raises(InvalidRequestError, match=rf"token_ids\[1, 5\] = {bad} is outside the vocabulary \[0, 320"):
            qoq_jax.forward(params, ids)
    with pytest.raises(InvalidRequestError, match=r"token_ids must be an integer array \[batch, seq\]"):
        qoq_jax.forward(params, prompt_ids[0])


def test_prefill_refuses_lengths_outside_the_prompt_block(params, prompt_ids):
    for lengths, message in [
        ([16, 17], r"lengths\[1\] = 17 is outside \[1, 16\], the prompt block"),
        ([0, 4], r"lengths\[0\] = 0 is outside \[1, 16\], the prompt block"),
        ([4], r"lengths must have shape \(2,\)"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            qoq_jax.prefill(params, prompt_ids, jnp.asarray(lengths, jnp.int32))
    bad = prompt_ids.copy()
    bad[0, 15] = 10**6  # padding is embedded too: every id must be in the vocabulary
    with pytest.raises(InvalidRequestError, match=r"token_ids\[0, 15\]"):
        qoq_jax.prefill(params, bad, jnp.asarray([4, 4], jnp.int32))


def test_prefill_chunks_must_fit_their_cache(params, prompt_ids):
    state, _ = qoq_jax.prefill(params, prompt_ids, max_length=32, page_size=16)
    tables = state.cache.block_tables
    for starts, message in [
        ([20, 0], r"start_positions\[0\] \+ lengths\[0\] = 36 exceeds the 32 tokens"),
        ([-1, 0], r"start_positions\[0\] = -1 is negative"),
    ]:
        cache = dataclasses.replace(state.cache, block_tables=tables)
        with pytest.raises(InvalidRequestError, match=message):
            qoq_jax.prefill(params, prompt_ids, cache=cache, start_positions=jnp.asarray(starts, jnp.int32))


def test_decode_step_refuses_rows_past_their_cache_and_ids_outside_the_vocabulary(params, prompt_ids):
    state, logits = qoq_jax.prefill(params, prompt_ids, max_length=17)  # pages of 64 tokens: room for 64
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    with pytest.raises(InvalidRequestError, match=r"tokens\[0\] = 320 is outside the vocabulary"):
        qoq_jax.decode_step(params, state, jnp.asarray([VOCAB, 3], jnp.int32))
    full = dataclasses.replace(state, lengths=jnp.asarray([64, 16], jnp.int32))
    with pytest.raises(InvalidRequestError, match=r"row 0 holds 64 tokens: its cache of 64 tokens is full"):
        qoq_jax.decode_step(params, full, tokens)
    assert not state.cache.keys[0].codes.is_deleted(), "a refused step must not consume the donated state"
    state, logits = qoq_jax.decode_step(params, state, tokens)  # the refused calls harmed nothing
    assert np.all(np.isfinite(np.asarray(logits))) and list(np.asarray(state.lengths)) == [17, 17]


def test_decode_step_refuses_positions_past_the_context(params, prompt_ids):
    short = dataclasses.replace(params, config=dataclasses.replace(params.config, max_context=16))
    state, logits = qoq_jax.prefill(short, prompt_ids, max_length=16)
    with pytest.raises(InvalidRequestError, match=r"row 0 is at position 16: the model's context is 16 tokens"):
        qoq_jax.decode_step(short, state, jnp.argmax(logits, axis=-1).astype(jnp.int32))


def test_inside_jit_values_are_unchecked_and_behave_as_documented(params, prompt_ids):
    """Under the user's jit an out-of-vocabulary id reads a NaN embedding, which makes its row's logits NaN (the
    other rows are unharmed), and a row whose cache is full writes nothing."""
    ids = prompt_ids.copy()
    ids[0, 9] = VOCAB
    logits = np.asarray(jax.jit(qoq_jax.forward)(params, ids))
    assert np.all(np.isnan(logits[0, 9:])) and np.all(np.isfinite(logits[1]))

    state, step_logits = qoq_jax.prefill(params, prompt_ids, max_length=64)
    before = [np.asarray(pool.codes) for pool in state.cache.keys]
    full = dataclasses.replace(state, lengths=jnp.asarray([64, 64], jnp.int32))
    state, _ = jax.jit(qoq_jax.decode_step)(params, full, jnp.argmax(step_logits, axis=-1).astype(jnp.int32))
    for old, pool in zip(before, state.cache.keys):
        np.testing.assert_array_equal(np.asarray(pool.codes), old)


# --------------------------------------------------------------------------------- configs and checkpoints


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, gpl_text):
    directory = save_hf_model(build_hf_model("llama", seed=3), tmp_path_factory.mktemp("validation_hf"))
    tiny_tokenizer(gpl_text).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("hidden_size"), "config.json: missing required key 'hidden_size'"),
        (lambda c: c.pop("num_attention_heads"), "config.json: missing required key 'num_attention_heads'"),
        (lambda c: c.update(num_hidden_layers="two"), "num_hidden_layers must be a positive integer, got 'two'"),
        (lambda c: c.update(vocab_size=0), "vocab_size must be a positive integer, got 0"),
    ],
)
def test_a_malformed_hf_config_is_named_and_the_cli_prints_it(hf_dir, tmp_path, capsys, change, message):
    directory = shutil.copytree(hf_dir, tmp_path / "model")
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        qoq_jax.load(directory)
    assert main(["generate", "--model", str(directory), "--no-warmup", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qoq-jax: error: ") and message in err and "Traceback" not in err


def test_a_checkpoint_whose_config_is_not_a_model_is_refused(params, tmp_path):
    saved = qoq_jax.save_checkpoint(params, tmp_path / "ckpt")
    metadata = json.loads((saved / "qoq.json").read_text())
    metadata["model_config"]["num_layers"] = "2"
    (saved / "qoq.json").write_text(json.dumps(metadata))
    with pytest.raises(qoq_jax.CheckpointError, match="model_config is invalid: num_layers must be a positive integer"):
        qoq_jax.load(saved)


def test_prompt_too_long_is_still_its_own_error(params):
    with pytest.raises(PromptTooLongError):
        qoq_jax.generate(params, [[5] * 500], max_new_tokens=20)
