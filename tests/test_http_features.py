"""The API features over real HTTP with the official `openai` client: logprobs / top_logprobs, echo (with prompt
logprobs and max_tokens 0), n and best_of, penalties, min_tokens and logit_bias, on both endpoints, streaming and
not, in OpenAI's shapes; each answer equals `qoq_jax.complete` with the same settings; bad values are 400s naming
their field."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

import qoq_jax
from qoq_jax.sampling import choice_seed
from serve.engine import AsyncEngine, build_engine
from serve.http_server import create_app
from loopback import serving
from tiny_models import sharp_tiny_llama, tiny_tokenizer

MODEL = "tiny-llama"
ENGINE_OPTIONS = dict(
    max_num_seqs=4, max_model_len=128, page_size=16, num_pages=32, max_num_batched_tokens=64,
    prefill_row_tokens=16, max_prefill_rows=2, warmup="none", compile_in_background=False,
)  # fmt: skip
PROMPT = "This License applies to"
NEW = 10
# The engine's logits come another way than complete's (chunked prefill over pages): equal to float rounding.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


@pytest.fixture(scope="module")
def client(params):
    engine = AsyncEngine(build_engine(params, model_name=MODEL, **ENGINE_OPTIONS))
    with serving(create_app(engine, model_name=MODEL)) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            yield client


def _text(params, token_id: int) -> str:
    return params.tokenizer.decode([token_id])


def _check_completion_logprobs(params, logprobs, token_ids, entries, num_top):
    """The legacy shape: tokens, token_logprobs, top_logprobs (the chosen token among them) and text_offset."""
    assert logprobs.tokens == [_text(params, t) for t in token_ids]
    assert logprobs.text_offset == list(np.cumsum([0] + [len(t) for t in logprobs.tokens[:-1]]))
    for got, top, expected in zip(logprobs.token_logprobs, logprobs.top_logprobs, entries):
        if expected is None:
            assert got is None and top is None
            continue
        np.testing.assert_allclose(got, expected.logprob, atol=TOLERANCE)
        wanted = {_text(params, t): v for t, v in expected.top[:num_top]}
        wanted.setdefault(_text(params, expected.token_id), expected.logprob)
        assert top.keys() == wanted.keys()
        np.testing.assert_allclose([top[k] for k in wanted], list(wanted.values()), atol=TOLERANCE)


def test_completion_logprobs_with_echo_equal_complete(client, params):
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0, logprobs=3, echo=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    [expected] = qoq_jax.complete(params, [PROMPT], max_new_tokens=NEW, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    [choice] = response.choices
    assert choice.text == PROMPT + expected.text
    _check_completion_logprobs(
        params, choice.logprobs, expected.prompt_token_ids + expected.token_ids,
        [None, *expected.prompt_logprobs, *expected.logprobs], 3,
    )  # fmt: skip

    streamed = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0, logprobs=3, echo=True, stream=True,
        extra_body={"ignore_eos": True},
    ))  # fmt: skip
    parts = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs is not None]
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert sum((p.tokens for p in parts), []) == choice.logprobs.tokens
    assert sum((p.text_offset for p in parts), []) == choice.logprobs.text_offset
    streamed_logprobs = sum((p.token_logprobs for p in parts), [])
    assert streamed_logprobs[0] is None and choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(streamed_logprobs[1:], choice.logprobs.token_logprobs[1:], atol=TOLERANCE)


def test_echo_with_max_tokens_zero_scores_token_id_prompts(client, params):
    """lm-eval's loglikelihood request: a batch of token-id prompts, echo, logprobs, nothing generated."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in (9, 21)]  # 21 tokens: two chunk rows
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, logprobs=1, echo=True)
    assert response.usage.completion_tokens == 0 and [c.index for c in response.choices] == [0, 1]
    for prompt, choice in zip(prompts, response.choices):
        [expected] = qoq_jax.complete(params, [prompt], max_new_tokens=0, prompt_logprobs=1)
        assert choice.text == params.tokenizer.decode(prompt) and choice.finish_reason == "length"
        _check_completion_logprobs(params, choice.logprobs, prompt, [None, *expected.prompt_logprobs], 1)


def test_chat_logprobs_equal_complete_and_stream_the_same(client, params):
    messages = [{"role": "user", "content": "Hello"}]
    options = dict(model=MODEL, messages=messages, max_tokens=NEW, temperature=0, logprobs=True, top_logprobs=2)
    response = client.chat.completions.create(**options)
    [expected] = qoq_jax.complete(params, [messages], max_new_tokens=NEW, logprobs=2)
    content = response.choices[0].logprobs.content
    assert [c.token for c in content] == [_text(params, e.token_id) for e in expected.logprobs]
    for item, entry in zip(content, expected.logprobs):
        assert item.bytes == list(item.token.encode())
        np.testing.assert_allclose(item.logprob, entry.logprob, atol=TOLERANCE)
        assert [t.token for t in item.top_logprobs] == [_text(params, t) for t, _ in entry.top]
        np.testing.assert_allclose([t.logprob for t in item.top_logprobs], [v for _, v in entry.top], atol=TOLERANCE)
    streamed = [c for c in client.chat.completions.create(**options, stream=True) if c.choices]
    pieces = sum((c.choices[0].logprobs.content for c in streamed if c.choices[0].logprobs), [])
    assert [p.token for p in pieces] == [c.token for c in content]  # the prompt's pages now come from the cache:
    np.testing.assert_allclose([p.logprob for p in pieces], [c.logprob for c in content], atol=TOLERANCE)
    without = client.chat.completions.create(**{**options, "logprobs": False, "top_logprobs": None})
    assert without.choices[0].logprobs is None


def test_n_choices_follow_their_seeds_on_both_endpoints(client, params):
    options = dict(max_tokens=NEW, temperature=1.0, seed=17, n=3, extra_body={"ignore_eos": True})
    response = client.completions.create(model=MODEL, prompt=PROMPT, **options)
    expected = qoq_jax.complete(params, [PROMPT], max_new_tokens=NEW, temperature=1.0, seed=[17], n=3, ignore_eos=True)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert len({c.text for c in response.choices}) == 3 and response.usage.completion_tokens == 3 * NEW

    messages = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, **{**options, "n": 2})
    texts = ["", ""]
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True, **{**options, "n": 2}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in chat.choices]
    for j, choice in enumerate(chat.choices):
        [alone] = qoq_jax.complete(params, [messages], max_new_tokens=NEW, temperature=1.0,
                                   seed=[choice_seed(17, j)], ignore_eos=True)  # fmt: skip
        assert choice.message.content == alone.text


def test_best_of_returns_the_highest_mean_logprob(client, params):
    options = dict(max_tokens=NEW, temperature=1.3, seed=4, extra_body={"ignore_eos": True})
    best = client.completions.create(model=MODEL, prompt=PROMPT, n=1, best_of=3, **options)
    candidates = qoq_jax.complete(params, [PROMPT], max_new_tokens=NEW, temperature=1.3, seed=[4], n=3, logprobs=0,
                                  ignore_eos=True)  # fmt: skip
    scores = [np.mean([t.logprob for t in c.logprobs]) for c in candidates]
    assert [c.text for c in best.choices] == [candidates[int(np.argmax(scores))].text]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == 3 * NEW


def test_penalties_min_tokens_and_logit_bias_equal_complete(client, params):
    [plain] = qoq_jax.generate(params, [PROMPT], max_new_tokens=NEW, ignore_eos=True)
    settings = dict(presence_penalty=0.9, frequency_penalty=0.5, repetition_penalty=1.3, min_tokens=4)
    banned = params.tokenizer(plain).input_ids[0]
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0, presence_penalty=0.9, frequency_penalty=0.5,
        logit_bias={str(banned): -100}, extra_body={"repetition_penalty": 1.3, "min_tokens": 4, "ignore_eos": True},
    )  # fmt: skip
    [expected] = qoq_jax.complete(params, [PROMPT], max_new_tokens=NEW, ignore_eos=True, logit_bias={banned: -100},
                                  **settings)  # fmt: skip
    assert response.choices[0].text == expected.text != plain
    assert banned not in expected.token_ids


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("completions", dict(presence_penalty=2.5), "presence_penalty"),
        ("completions", dict(frequency_penalty=-3), "frequency_penalty"),
        ("completions", dict(repetition_penalty=0), "repetition_penalty"),
        ("completions", dict(min_tokens=-1), "min_tokens"),
        ("completions", dict(min_tokens=9, max_tokens=8), "min_tokens"),
        ("completions", dict(logprobs=21), "logprobs"),
        ("completions", dict(n=0), "n"),
        ("completions", dict(n=3, best_of=2), "best_of"),
        ("completions", dict(best_of=3, stream=True), "best_of"),
        ("completions", dict(max_tokens=-1), "max_tokens"),
        ("completions", dict(logit_bias={"x": 1}), "logit_bias"),
        ("completions", dict(logit_bias={"100000": 1}), "logit_bias"),
        ("completions", dict(logit_bias={"5": 101}), "logit_bias"),
        ("chat/completions", dict(top_logprobs=2), "top_logprobs"),
        ("chat/completions", dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        ("chat/completions", dict(n=200), "n"),
    ],
)
def test_invalid_values_are_400s_naming_the_field(client, path, body, param):
    prompt = {"messages": [{"role": "user", "content": "Hi"}]} if path.startswith("chat") else {"prompt": PROMPT}
    with pytest.raises(openai.BadRequestError) as info:
        client.post(f"/{path}", body={"model": MODEL, "max_tokens": 4, **prompt, **body}, cast_to=object)
    assert info.value.body["param"] == param, json.dumps(info.value.body)
