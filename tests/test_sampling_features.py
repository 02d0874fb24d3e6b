"""Log-probabilities, penalties, logit bias, min_tokens, n and best_of: on the device, against `forward` and a
float64 numpy reference of the formulas."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qoq_jax
from qoq_jax.errors import InvalidRequestError, InvalidSamplingError
from qoq_jax.generate import _decode_chunk, _prefill_and_sample
from qoq_jax.logits_processors import TokenHistory, process_logits
from qoq_jax.sampling import SamplingBatch, SamplingParams, choice_seed
from qoq_jax.sharding import make_mesh
from tiny_models import sharp_tiny_llama, tiny_tokenizer

LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


def _log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _forward_logits(params, tokens: list[int]) -> np.ndarray:
    """float64 `forward` logits of `tokens`, run right-padded to 32 tokens (causal: the padding changes nothing
    before it) so every reference shares one compiled forward."""
    padded = np.full((1, 32), 3, np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(qoq_jax.forward(params, jnp.asarray(padded))[0, : len(tokens)], np.float64)


def _reference_logprobs(params, prompt: list[int], generated: list[int]) -> np.ndarray:
    """log_softmax of `forward`'s logits over prompt + generated: row t scores the token at t + 1."""
    return _log_softmax64(_forward_logits(params, prompt + generated))


def _assert_logprobs(entries, tokens, reference_rows, num_top):
    assert [e.token_id for e in entries] == list(tokens)
    for entry, row in zip(entries, reference_rows):
        np.testing.assert_allclose(entry.logprob, row[entry.token_id], atol=LOGPROB_TOLERANCE)
        expected_top = np.argsort(-row, kind="stable")[:num_top]
        assert [t for t, _ in entry.top] == list(expected_top)
        np.testing.assert_allclose([v for _, v in entry.top], row[expected_top], atol=LOGPROB_TOLERANCE)


def test_logprobs_of_completion_and_prompt_equal_log_softmax_of_forward(params):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (11, 4, 8)]
    completions = qoq_jax.complete(
        params, prompts, max_new_tokens=9, temperature=0.9, seed=3, logprobs=5, prompt_logprobs=3, ignore_eos=True
    )
    for prompt, completion in zip(prompts, completions):
        reference = _reference_logprobs(params, prompt, completion.token_ids)
        start = len(prompt) - 1
        _assert_logprobs(completion.logprobs, completion.token_ids, reference[start : start + 9], 5)
        _assert_logprobs(completion.prompt_logprobs, prompt[1:], reference[:start], 3)


def test_echo_without_generation_scores_the_prompt(params):
    """lm-eval's loglikelihood request: max_new_tokens 0, the prompt's log-probabilities only."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 320, size=13).tolist()
    [completion] = qoq_jax.complete(params, [prompt], max_new_tokens=0, prompt_logprobs=0)
    assert completion.token_ids == [] and completion.finish_reason == "length" and completion.logprobs is None
    reference = _reference_logprobs(params, prompt, [])
    _assert_logprobs(completion.prompt_logprobs, prompt[1:], reference[:-1], 0)
    assert all(e.top == () for e in completion.prompt_logprobs)


def test_processed_logprobs_are_the_distribution_sampled_from(params):
    """logprobs_mode="processed": log_softmax(logits / T) over the top-k, the rest of probability zero."""
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, 320, size=7).tolist()
    temperature, top_k = 0.7, 4
    [completion] = qoq_jax.complete(
        params, [prompt], max_new_tokens=6, temperature=temperature, top_k=top_k, seed=5, logprobs=6,
        logprobs_mode="processed", ignore_eos=True,
    )
    logits = _forward_logits(params, prompt + completion.token_ids)
    for t, entry in enumerate(completion.logprobs):
        row = logits[len(prompt) - 1 + t] / temperature
        kept = np.argsort(-row, kind="stable")[:top_k]
        expected = np.full_like(row, -np.inf)
        expected[kept] = _log_softmax64(row[kept])
        np.testing.assert_allclose(entry.logprob, expected[entry.token_id], atol=LOGPROB_TOLERANCE)
        assert [tok for tok, _ in entry.top] == list(kept)  # only the top-k have probability > 0
        np.testing.assert_allclose([v for _, v in entry.top], expected[kept], atol=LOGPROB_TOLERANCE)


def _penalised_reference(logits, counts, in_prompt, presence, frequency, repetition, bias, held):
    """vLLM's order and formulas in float64: bias, min_tokens (held ids to -inf), repetition, frequency, presence."""
    x = np.asarray(logits, np.float64).copy()
    for token, value in bias:
        x[token] += value
    x[list(held)] = -np.inf
    seen = in_prompt | (counts > 0)
    x = np.where(seen, np.where(x > 0, x / repetition, x * repetition), x)
    return x - frequency * counts - presence * (counts > 0)


def test_logit_processing_matches_a_float64_reference_and_touches_only_its_tokens():
    rng = np.random.default_rng(3)
    batch, vocab = 6, 96
    logits = rng.normal(0, 3, (batch, vocab)).astype(np.float32)
    counts = np.where(rng.random((batch, vocab)) < 0.15, rng.integers(1, 5, (batch, vocab)), 0).astype(np.int32)
    in_prompt = rng.random((batch, vocab)) < 0.1
    in_prompt[4, 5], counts[4, 17] = True, 2  # biased tokens that are penalised too: the order matters
    rows = [
        SamplingParams(),  # nothing: untouched
        SamplingParams(presence_penalty=1.5),
        SamplingParams(frequency_penalty=-0.7, presence_penalty=0.3),
        SamplingParams(repetition_penalty=1.8),
        SamplingParams(repetition_penalty=0.6, frequency_penalty=2.0, logit_bias={5: 100.0, 17: -42.5}),
        SamplingParams(min_tokens=4, logit_bias={3: 7.0}),
    ]
    generated = np.asarray([0, 9, 9, 9, 9, 3])  # the last row is still under its min_tokens
    stop_ids = np.tile(np.asarray([2, 11, -1, vocab + 5]), (batch, 1))  # -1 and >= V are padding
    history = TokenHistory(jnp.asarray(counts), jnp.asarray(in_prompt))
    out = np.asarray(
        jax.jit(process_logits)(jnp.asarray(logits), SamplingBatch.stack(rows), history, generated, stop_ids)
    )
    for row, p in enumerate(rows):
        held = {2, 11} if generated[row] < p.min_tokens else set()
        expected = _penalised_reference(
            logits[row], counts[row], in_prompt[row], p.presence_penalty, p.frequency_penalty,
            p.repetition_penalty, p.logit_bias, held,
        )
        np.testing.assert_allclose(out[row], expected, rtol=1e-6, atol=1e-5)
        touched = set(t for t, _ in p.logit_bias) | held
        if p.has_penalties:
            touched |= set(np.flatnonzero(in_prompt[row] | (counts[row] > 0)))
            if p.repetition_penalty == 1.0:
                touched -= set(np.flatnonzero(in_prompt[row] & (counts[row] == 0)))
        untouched = np.setdiff1d(np.arange(vocab), sorted(touched))
        np.testing.assert_array_equal(out[row, untouched], logits[row, untouched])  # bit for bit
        assert np.all(out[row, sorted(touched)] != logits[row, sorted(touched)])


def test_greedy_generation_with_penalties_follows_the_reference_step_by_step(params):
    """Each token is the argmax of the float64 formulas over forward's logits and the tokens seen so far."""
    rng = np.random.default_rng(4)
    prompt = rng.integers(3, 320, size=6).tolist()
    prompt = prompt + prompt[:3]  # repeated prompt tokens, so the repetition penalty has work
    options = dict(presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4, logit_bias={7: 3.0, 9: -2.0})
    [plain] = qoq_jax.generate(params, [prompt], max_new_tokens=20, ignore_eos=True)
    [penalised] = qoq_jax.generate(params, [prompt], max_new_tokens=20, ignore_eos=True, **options)
    assert penalised != plain
    logits = _forward_logits(params, prompt + penalised)
    in_prompt = np.zeros(320, bool)
    in_prompt[prompt] = True
    for t, token in enumerate(penalised):
        counts = np.bincount(penalised[:t], minlength=320)
        expected = _penalised_reference(
            logits[len(prompt) - 1 + t], counts, in_prompt, options["presence_penalty"],
            options["frequency_penalty"], options["repetition_penalty"], options["logit_bias"].items(), (),
        )
        order = np.argsort(-expected)
        assert token == order[0] or expected[order[0]] - expected[token] < 1e-4, f"step {t}"


def test_min_tokens_holds_back_eos_and_stop_ids(params):
    prompt = [5, 9, 14]
    [free] = qoq_jax.generate(params, [prompt], max_new_tokens=16, ignore_eos=True)
    first_other = next(i for i, token in enumerate(free) if token != free[0])
    eos, stop_id = free[first_other], free[0]  # greedy would stop at once
    with_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=(eos,)))
    [early] = qoq_jax.complete(with_eos, [prompt], max_new_tokens=16, stop_token_ids=[stop_id])
    assert early.token_ids == [] and early.finish_reason == "stop"
    [held] = qoq_jax.complete(with_eos, [prompt], max_new_tokens=16, min_tokens=6, stop_token_ids=[stop_id])
    assert len(held.token_ids) >= 6 and not {eos, stop_id} & set(held.token_ids[:6])


def test_n_choices_are_different_reproducible_and_batch_independent(params):
    prompt = [3, 1, 4, 1, 5]
    options = dict(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    three = qoq_jax.complete(params, [prompt], n=3, seed=[21], **options)
    assert [c.index for c in three] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in three}) == 3
    assert [c.token_ids for c in qoq_jax.complete(params, [prompt], n=3, seed=[21], **options)] == [
        c.token_ids for c in three
    ]
    for j, choice in enumerate(three):  # choice j is, alone in its batch, the request with choice j's seed
        assert qoq_jax.generate(params, [prompt], seed=[choice_seed(21, j)], **options) == [choice.token_ids]


def test_best_of_keeps_the_highest_mean_logprob(params):
    prompt = [6, 2, 8, 3]
    options = dict(max_new_tokens=14, temperature=1.2, seed=[4], ignore_eos=True)
    candidates = qoq_jax.complete(params, [prompt], n=4, logprobs=0, **options)
    best = qoq_jax.complete(params, [prompt], n=2, best_of=4, **options)
    scores = [np.mean([t.logprob for t in c.logprobs]) for c in candidates]
    expected = [candidates[i].token_ids for i in np.argsort(scores)[::-1][:2]]
    assert [c.token_ids for c in best] == expected and [c.index for c in best] == [0, 1]
    assert all(c.logprobs is None for c in best)  # not asked for


def test_settings_share_the_compiled_programs(params):
    prompts = [[4, 5, 9, 5, 4]]
    options = dict(max_new_tokens=12, ignore_eos=True, temperature=0.8)
    qoq_jax.generate(params, prompts, **options)
    compiled = _prefill_and_sample._cache_size(), _decode_chunk._cache_size()
    for settings in (
        dict(presence_penalty=1.0, frequency_penalty=-0.5, repetition_penalty=1.3),
        dict(logit_bias={3: 5.0, 8: -100.0}, min_tokens=3),
        dict(logprobs=2, prompt_logprobs=1, logprobs_mode="processed"),
        dict(logprobs=17, top_k=5, n=1),
    ):
        qoq_jax.generate(params, prompts, **options, **settings)
    assert (_prefill_and_sample._cache_size(), _decode_chunk._cache_size()) == compiled


def test_logprobs_on_a_tensor_parallel_mesh_equal_one_device(params):
    prompt = [9, 4, 12, 33, 7]
    options = dict(max_new_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    [one] = qoq_jax.complete(params, [prompt], **options)
    [split] = qoq_jax.complete(params, [prompt], mesh=make_mesh(2), **options)
    assert split.token_ids == one.token_ids
    for mine, theirs in zip(split.logprobs + split.prompt_logprobs, one.logprobs + one.prompt_logprobs):
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]
        np.testing.assert_allclose(
            [mine.logprob] + [v for _, v in mine.top], [theirs.logprob] + [v for _, v in theirs.top], atol=1e-4
        )


@pytest.mark.parametrize(
    "options, error, field",
    [
        (dict(presence_penalty=2.5), InvalidSamplingError, "presence_penalty"),
        (dict(frequency_penalty=float("nan")), InvalidSamplingError, "frequency_penalty"),
        (dict(repetition_penalty=0.0), InvalidSamplingError, "repetition_penalty"),
        (dict(min_tokens=-1), InvalidRequestError, "min_tokens"),
        (dict(min_tokens=9, max_new_tokens=8), InvalidRequestError, "min_tokens"),
        (dict(logprobs=21), InvalidSamplingError, "logprobs"),
        (dict(prompt_logprobs=-1), InvalidSamplingError, "prompt_logprobs"),
        (dict(logprobs_mode="logits"), InvalidSamplingError, "logprobs_mode"),
        (dict(logit_bias={3: 101.0}), InvalidSamplingError, "logit_bias"),
        (dict(logit_bias={320: 1.0}), InvalidRequestError, "logit_bias"),
        (dict(logit_bias={"a": 1.0}), InvalidSamplingError, "logit_bias"),
        (dict(n=0), InvalidRequestError, "n must be"),
        (dict(n=3, best_of=2), InvalidRequestError, "best_of"),
        (dict(max_new_tokens=-1), InvalidRequestError, "max_new_tokens"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(params, options, error, field):
    with pytest.raises(error, match=field):
        qoq_jax.generate(params, [[1, 2, 3]], **options)
