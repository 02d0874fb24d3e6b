"""generate / complete: prompt kinds, stopping, sampling, bucketing and request validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qoq_jax
from qoq_jax.errors import InvalidRequestError, InvalidSamplingError, PromptTooLongError
from qoq_jax.generate import _decode_chunk, _prefill_and_sample
from qoq_jax.sampling import SamplingBatch, sample
from tiny_models import sharp_tiny_llama, tiny_tokenizer

_jit_sample = jax.jit(sample)


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


def test_string_prompts_give_text_and_token_prompts_give_ids(params):
    prompt = "This License applies to"
    ids = params.tokenizer(prompt).input_ids
    text, tokens = qoq_jax.generate(params, [prompt, ids], max_new_tokens=10, ignore_eos=True)
    assert isinstance(text, str) and len(tokens) == 10
    assert text == params.tokenizer.decode(tokens, skip_special_tokens=True)


def test_max_new_tokens_and_finish_reason(params):
    [completion] = qoq_jax.complete(params, [[5, 6, 7]], max_new_tokens=21, ignore_eos=True)
    assert len(completion.token_ids) == 21 and completion.finish_reason == "length"


def test_shortest_request(params):
    [completion] = qoq_jax.complete(params, [[7]], max_new_tokens=1, ignore_eos=True)
    assert len(completion.token_ids) == 1


def test_stop_token_ids_cut_before_the_first_stop_token(params):
    [full] = qoq_jax.generate(params, [[9, 8, 7]], max_new_tokens=24, ignore_eos=True)
    stop_token = full[6]
    [completion] = qoq_jax.complete(
        params, [[9, 8, 7]], max_new_tokens=24, ignore_eos=True, stop_token_ids=[stop_token]
    )
    assert completion.token_ids == full[: full.index(stop_token)] and completion.finish_reason == "stop"


def test_model_eos_stops_unless_ignored(params):
    [full] = qoq_jax.generate(params, [[4, 5]], max_new_tokens=20, ignore_eos=True)
    eos = full[4]
    with_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=(eos,)))
    assert qoq_jax.generate(with_eos, [[4, 5]], max_new_tokens=20) == [full[: full.index(eos)]]
    assert qoq_jax.generate(with_eos, [[4, 5]], max_new_tokens=20, ignore_eos=True) == [full]


def test_stop_strings_cut_the_text_before_them(params):
    prompt = "You may convey"
    [full] = qoq_jax.generate(params, [prompt], max_new_tokens=40, ignore_eos=True)
    stop = full[12:15]
    [completion] = qoq_jax.complete(params, [prompt], max_new_tokens=40, ignore_eos=True, stop=[stop, "\x00never"])
    assert completion.text == full[: full.index(stop)] and completion.finish_reason == "stop"
    assert stop not in completion.text


def test_chat_prompts(params):
    messages = [{"role": "user", "content": "Hello"}]
    as_string = qoq_jax.complete(params, ["Hello"], chat=True, max_new_tokens=8, ignore_eos=True)
    as_messages = qoq_jax.complete(params, [messages], max_new_tokens=8, ignore_eos=True)
    expected_prompt = params.tokenizer("<|user|>Hello</s><|assistant|>", add_special_tokens=False).input_ids
    assert as_string == as_messages and as_string[0].prompt_token_ids == expected_prompt


def test_one_compilation_per_bucket(params):
    options = dict(max_new_tokens=16, ignore_eos=True)
    qoq_jax.generate(params, [[1] * 3, [2] * 9, [3] * 2], **options)
    prefills, decodes = _prefill_and_sample._cache_size(), _decode_chunk._cache_size()
    qoq_jax.generate(params, [[4] * 5, [5] * 12, [6] * 7, [7] * 1], **options)  # batch 3 and 4 share a bucket
    qoq_jax.generate(params, [[8] * 14, [9] * 1, [1] * 4], max_new_tokens=11, ignore_eos=True)
    assert (_prefill_and_sample._cache_size(), _decode_chunk._cache_size()) == (prefills, decodes)


def test_greedy_limits_of_sampling(params):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    greedy = qoq_jax.generate(params, prompts, max_new_tokens=12, ignore_eos=True)
    top_k_one = qoq_jax.generate(params, prompts, max_new_tokens=12, ignore_eos=True, temperature=1.5, top_k=1)
    tiny_top_p = qoq_jax.generate(params, prompts, max_new_tokens=12, ignore_eos=True, temperature=1.5, top_p=1e-6)
    assert top_k_one == greedy and tiny_top_p == greedy


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(params):
    prompt, other = [3, 1, 4, 1, 5], [2, 7, 1, 8]
    options = dict(max_new_tokens=16, ignore_eos=True, temperature=1.0)
    alone = qoq_jax.generate(params, [prompt], seed=[5], **options)
    batched = qoq_jax.generate(params, [other, prompt, other], seed=[9, 5, 10], **options)
    assert batched[1] == alone[0]
    assert batched[0] != batched[2]  # different seeds, different samples


def test_sampling_distribution_matches_the_filtered_softmax():
    """Drawn frequencies follow softmax(logits / T) restricted to the top-k and top-p sets."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    temperature, top_k, top_p = 0.8, 6, 0.9
    draws = 6000
    sampling = SamplingBatch.stack([qoq_jax.SamplingParams(temperature, top_k, top_p, seed=123)] * draws)
    # One seed for every row: the position varies the draw, as it does along a sequence.
    tokens = np.asarray(_jit_sample(jnp.repeat(logits, draws, 0), sampling, jnp.arange(draws)))
    probs = np.exp(np.asarray(logits[0]) / temperature)
    probs[top_k:] = 0
    probs /= probs.sum()
    kept = (np.cumsum(probs) - probs) < top_p
    expected = np.where(kept, probs, 0) / probs[kept].sum()
    observed = np.bincount(tokens, minlength=8) / draws
    assert np.all(observed[~kept] == 0)
    np.testing.assert_allclose(observed, expected, atol=0.025)


@settings(max_examples=25, deadline=None)
@given(
    logits=st.lists(st.floats(-8, 8), min_size=16, max_size=16),
    top_k=st.integers(0, 16),
    top_p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_samples_stay_inside_the_top_k_and_top_p_sets(logits, top_k, top_p, seed):
    row = np.asarray(logits, np.float32)
    sampling = SamplingBatch.stack([qoq_jax.SamplingParams(1.0, top_k, top_p, seed)] * 8)
    tokens = np.asarray(_jit_sample(jnp.tile(row, (8, 1)), sampling, jnp.arange(8)))
    order = np.argsort(-row, kind="stable")
    k = top_k or 16
    probs = np.exp(row[order[:k]] - row[order[0]])
    probs /= probs.sum()
    nucleus = int(np.sum((np.cumsum(probs) - probs) < top_p))
    allowed_floor = row[order[max(nucleus, 1) - 1]]
    assert np.all(row[tokens] >= allowed_floor - 1e-6)


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(temperature=-0.1), InvalidSamplingError),
        (dict(temperature=float("nan")), InvalidSamplingError),
        (dict(top_p=0.0), InvalidSamplingError),
        (dict(top_p=1.5), InvalidSamplingError),
        (dict(top_k=-1), InvalidSamplingError),
        (dict(top_k=2.5), InvalidSamplingError),
        (dict(seed=-1), InvalidSamplingError),
        (dict(max_new_tokens=-1), InvalidRequestError),
        (dict(seed=[1, 2, 3]), InvalidRequestError),
    ],
)
def test_invalid_requests_are_refused(params, options, error):
    with pytest.raises(error):
        qoq_jax.generate(params, [[1, 2, 3]], **options)


def test_prompt_errors(params):
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 512"):
        qoq_jax.generate(params, [[1] * 500], max_new_tokens=20)
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        qoq_jax.generate(params, [[]])
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        qoq_jax.generate(params, "a bare string")
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 320\)"):
        qoq_jax.generate(params, [[1, 320]])
    with pytest.raises(PromptTooLongError):
        qoq_jax.forward(params, np.zeros((1, 513), np.int32))


def test_tokenizer_errors(params):
    bare = dataclasses.replace(params, tokenizer=None)
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        qoq_jax.generate(bare, ["text"])
    with pytest.raises(InvalidRequestError, match="stop strings need a tokenizer"):
        qoq_jax.generate(bare, [[1, 2]], stop=["x"])
    params.tokenizer.chat_template, template = None, params.tokenizer.chat_template
    try:
        with pytest.raises(InvalidRequestError, match="no chat template"):
            qoq_jax.generate(params, ["hi"], chat=True)
    finally:
        params.tokenizer.chat_template = template
