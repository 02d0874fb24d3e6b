"""The OpenAI-compatible HTTP server on the real engine over a tiny random model: real HTTP on loopback, the
official `openai` client, raw requests for what the client hides (the SSE wire format, malformed JSON)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import qoq_jax
from serve import cli
from serve.engine import AsyncEngine, build_engine
from serve.http_server import create_app
from serve.request import EngineStats
from serve.runner import ModelRunner
from loopback import serving
from tiny_models import sharp_tiny_llama, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vllm_side_by_side  # noqa: E402

MODEL = "tiny-llama"
# Few shapes: decode batches of 1 and 2, prompt chunks of one row of 16 tokens, each compiled when first needed.
ENGINE_OPTIONS = dict(
    max_num_seqs=2,
    max_model_len=128,
    page_size=16,
    num_pages=16,
    max_num_batched_tokens=64,
    prefill_row_tokens=16,
    max_prefill_rows=1,
    warmup="none",
    compile_in_background=False,
)
# Prompts of at most 16 tokens and 12 new tokens keep qoq_jax.generate's references to one compiled shape.
PROMPT = "This License applies to"
OTHER_PROMPT = "The Program refers to"
NEW = 12


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


@dataclasses.dataclass
class Served:
    url: str
    engine: AsyncEngine
    client: openai.OpenAI


@pytest.fixture(scope="module")
def served(params):
    engine = AsyncEngine(build_engine(params, model_name=MODEL, **ENGINE_OPTIONS))
    with serving(create_app(engine, model_name=MODEL)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield Served(url, engine, client)
        client.close()


def _wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> EngineStats:
    """Waits for the engine to have no running or waiting request; returns its stats then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats.running_requests == 0 and stats.waiting_requests == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def _raw(url: str, *, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    """(status, text) of a GET, or a POST of `body`, without any client library's checks."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. 'qoq_requests_finished_total{finish_reason=length}'."""
    status, text = _raw(f"{url}/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


# ------------------------------------------------------------------------------------------------ completions


def test_greedy_completion_matches_generate(served, params):
    response = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0)
    [expected] = qoq_jax.complete(params, [PROMPT], max_new_tokens=NEW)
    [choice] = response.choices
    assert choice.text == expected.text and choice.index == 0
    assert choice.finish_reason == expected.finish_reason
    assert response.object == "text_completion" and response.id.startswith("cmpl-") and response.model == MODEL
    assert abs(response.created - time.time()) < 60
    usage = response.usage
    assert usage.prompt_tokens == len(params.tokenizer(PROMPT).input_ids)
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_completion_concatenates_to_the_same_text(served):
    options = dict(model=MODEL, prompt="Each licensee is addressed as", max_tokens=20, temperature=0)
    whole = served.client.completions.create(**options, extra_body={"ignore_eos": True})
    stream = served.client.completions.create(
        **options, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    *content, finish, usage = chunks
    assert len(content) >= 2, "the text should arrive in pieces"
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert all(c.choices[0].finish_reason is None for c in content)
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].text == ""
    assert usage.choices == [] and usage.usage == whole.usage and usage.usage.completion_tokens == 20
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" and c.model == MODEL for c in chunks)


def test_token_id_prompt_and_a_batch_of_prompts(served, params):
    ids = params.tokenizer(OTHER_PROMPT).input_ids
    [expected_ids] = qoq_jax.generate(params, [ids], max_new_tokens=NEW, ignore_eos=True)
    single = served.client.completions.create(
        model=MODEL, prompt=ids, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True}
    )
    assert single.choices[0].text == params.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert single.usage.prompt_tokens == len(ids)

    prompts = [PROMPT, OTHER_PROMPT]
    batch = served.client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = [qoq_jax.complete(params, [p], max_new_tokens=NEW, ignore_eos=True)[0] for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [e.text for e in expected]
    assert batch.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert batch.usage.completion_tokens == 2 * NEW

    stream = served.client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=NEW, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    texts = ["", ""]
    for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [e.text for e in expected]


def test_stop_strings_cut_the_text(served, params):
    options = dict(model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True})
    full = served.client.completions.create(**options).choices[0].text
    stop = full[10:13]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    cut = served.client.completions.create(**options, stop=[stop, "never-there"])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in served.client.completions.create(**options, stop=stop, stream=True))
    assert streamed == cut.choices[0].text
    [expected] = qoq_jax.generate(params, [PROMPT], max_new_tokens=NEW, ignore_eos=True, stop=[stop])
    assert cut.choices[0].text == expected


# ------------------------------------------------------------------------------------------------------- chat


def test_chat_completion_matches_generate_and_streams_openai_chunks(served, params):
    messages = [{"role": "user", "content": "Hello"}]
    response = served.client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=NEW, temperature=0
    )
    [expected] = qoq_jax.complete(params, [messages], max_new_tokens=NEW)
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)

    chunks = list(
        served.client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, *content, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in content)
    assert "".join(c.choices[0].delta.content for c in content) == expected.text
    assert finish.choices[0].finish_reason == expected.finish_reason and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage == response.usage
    assert all(c.object == "chat.completion.chunk" and c.id == first.id for c in chunks)


def test_chat_stream_wire_format(served):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    status, text = _raw(f"{served.url}/v1/chat/completions", body=json.dumps(body).encode())
    assert status == 200
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"] is not None
    assert "usage" not in payloads[0], "usage appears only with stream_options.include_usage"


# ----------------------------------------------------------------------------------------------------- errors


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return info.value


def test_request_errors_answer_in_openai_shape(served):
    create = served.client.completions.create
    too_long = _error(lambda: create(model=MODEL, prompt=PROMPT, max_tokens=200))
    assert too_long.status_code == 400 and too_long.body["code"] == "context_length_exceeded"
    long_stream = _error(lambda: create(model=MODEL, prompt="word " * 200, max_tokens=1, stream=True))
    assert long_stream.status_code == 400 and long_stream.body["code"] == "context_length_exceeded"
    chat_too_long = _error(
        lambda: served.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 200}]
        )
    )
    assert chat_too_long.status_code == 400 and chat_too_long.body["param"] == "messages"

    temperature = _error(lambda: create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=-1))
    assert temperature.status_code == 400 and temperature.body["param"] == "temperature"
    top_p = _error(lambda: create(model=MODEL, prompt=PROMPT, max_tokens=4, top_p=0))
    assert top_p.status_code == 400 and top_p.body["param"] == "top_p"
    n = _error(lambda: create(model=MODEL, prompt=PROMPT, max_tokens=4, n=0))
    assert n.status_code == 400 and n.body["param"] == "n"
    logprobs = _error(lambda: create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=21))
    assert logprobs.status_code == 400 and logprobs.body["param"] == "logprobs"
    bad_token = _error(lambda: create(model=MODEL, prompt=[5, 10_000], max_tokens=4))
    assert bad_token.status_code == 400 and "token ids" in bad_token.body["message"]

    unknown = _error(lambda: create(model="gpt-4", prompt=PROMPT, max_tokens=4))
    assert unknown.status_code == 404 and unknown.body["code"] == "model_not_found"
    assert _wait_idle(served.engine).running_requests == 0


def _post(url: str, body: dict) -> tuple[int, dict]:
    """(status, JSON answer) of a raw POST; json.dumps escapes a lone surrogate as valid JSON (\\ud800)."""
    status, text = _raw(url, body=json.dumps(body).encode())
    return status, json.loads(text)


def _assert_openai_error(status: int, answer: dict, param: str | None) -> None:
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], answer
    assert error["type"] == "invalid_request_error" and error["param"] == param, answer


def test_top_k_past_int32_is_400_and_the_server_answers_the_next_request(served, params):
    """top_k ≥ 2**31 once killed the engine thread (500, then 503 for everything); now it never reaches it."""
    url = f"{served.url}/v1/completions"
    for top_k in (2**31, 2**40):
        for stream in (False, True):
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "top_k": top_k, "stream": stream}
            _assert_openai_error(*_post(url, body), "top_k")
    assert _raw(f"{served.url}/health")[0] == 200
    response = served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0)
    assert response.choices[0].text == qoq_jax.generate(params, [PROMPT], max_new_tokens=NEW)[0]


def test_text_that_is_not_unicode_is_400(served):
    """A lone surrogate (valid JSON, not valid Unicode) in any text field is refused by name, never a 500."""
    completions, chat = f"{served.url}/v1/completions", f"{served.url}/v1/chat/completions"
    base = {"model": MODEL, "max_tokens": 2}
    for url, body, param in [
        (completions, {**base, "prompt": "\ud800abc"}, "prompt"),
        (completions, {**base, "prompt": ["fine", "\udfff"]}, "prompt"),
        (completions, {**base, "prompt": PROMPT, "stop": ["\ud800"]}, "stop"),
        (completions, {**base, "model": "\ud800", "prompt": PROMPT}, "model"),
        (chat, {**base, "messages": [{"role": "user", "content": "hi \ud83d"}]}, "messages"),
        (chat, {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages"),
        (chat, {**base, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"\ud800": "x"}}, "logit_bias"),
    ]:
        _assert_openai_error(*_post(url, body), param)
    assert _raw(f"{served.url}/health")[0] == 200


def test_values_past_what_their_dtype_holds_are_400(served):
    """temperature 1e39 would become float32 infinity (uniform sampling); ids past int32 would overflow."""
    url = f"{served.url}/v1/completions"
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for change, param in [
        ({"temperature": 1e39}, "temperature"),
        ({"top_p": -1e39}, "top_p"),
        ({"stop_token_ids": [5, 2**40]}, "stop_token_ids"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"prompt": [5, 2**63]}, "prompt"),
    ]:
        _assert_openai_error(*_post(url, {**base, **change}), param)
    assert _raw(f"{served.url}/health")[0] == 200


def test_malformed_bodies_are_400_not_422(served):
    url = f"{served.url}/v1/completions"
    for body, param in [
        (b'{"model": "tiny-llama", "prompt": ', None),  # not JSON
        (json.dumps({"model": MODEL}).encode(), "prompt"),  # missing field
        (json.dumps({"model": MODEL, "prompt": "x", "temperature": "hot"}).encode(), "temperature"),  # wrong type
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -1}).encode(), "max_tokens"),  # out of range
        (json.dumps([1, 2]).encode(), None),  # not an object
    ]:
        status, text = _raw(url, body=body)
        error = json.loads(text)["error"]
        assert status == 400, (body, text)
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    status, text = _raw(f"{served.url}/v1/nothing-here")
    assert status == 404 and "error" in json.loads(text)


def test_api_key_is_required_when_configured(served):
    app = create_app(served.engine, model_name=MODEL, api_key="s3cret")
    with serving(app, lifespan="off") as url:  # the engine is already running under the module's server
        for key in ("wrong", None):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            status, text = _raw(f"{url}/v1/models", headers=headers)
            assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        assert _raw(f"{url}/health")[0] == 200  # health checks need no key


def test_full_queue_answers_503(params):
    """One seat and one waiting place: with one request running and one waiting, the next gets 503."""
    options = {**ENGINE_OPTIONS, "max_num_seqs": 1}
    engine = AsyncEngine(build_engine(params, model_name=MODEL, max_waiting=1, **options))
    with serving(create_app(engine, model_name=MODEL)) as url:

        async def scenario():
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            long = dict(model=MODEL, prompt=PROMPT, max_tokens=100, extra_body={"ignore_eos": True})
            running = await client.completions.create(**long, stream=True)
            await anext(aiter(running))
            waiting = asyncio.create_task(client.completions.create(**long))
            deadline = time.monotonic() + 10
            while engine.stats().waiting_requests < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stats = engine.stats()
            assert (stats.running_requests, stats.waiting_requests) == (1, 1)
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
            waiting.cancel()  # the waiting client goes away before its first token: it leaves the queue at once
            deadline = time.monotonic() + 10
            while engine.stats().waiting_requests and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            left = engine.stats()
            await running.close()
            await client.close()
            return info.value, left

        overloaded, left = asyncio.run(scenario())
        assert overloaded.status_code == 503 and overloaded.body["code"] == "overloaded"
        assert (left.running_requests, left.waiting_requests) == (1, 0)
        stats = _wait_idle(engine)
        assert (stats.running_requests, stats.waiting_requests, stats.kv_pages_used) == (0, 0, 0)
        assert stats.generation_tokens_total < 100, "both long requests should have been aborted, not run out"


# ----------------------------------------------------------------------------------- models, health, metrics


def test_models_and_health(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert served.client.models.retrieve(MODEL).id == MODEL
    status, text = _raw(f"{served.url}/health")
    assert status == 200 and json.loads(text)["status"] == "ok"


def test_metrics_follow_the_engine_and_requests(served):
    before = _metrics(served.url)
    response = served.client.completions.create(
        model=MODEL, prompt="Preamble of the license", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    after = _metrics(served.url)
    assert after["qoq_generation_tokens_total"] - before["qoq_generation_tokens_total"] == 10
    computed = after["qoq_prompt_tokens_total"] - before["qoq_prompt_tokens_total"]
    hits = after["qoq_prefix_cache_hit_tokens_total"] - before["qoq_prefix_cache_hit_tokens_total"]
    assert computed + hits == response.usage.prompt_tokens and computed >= 1
    key = "qoq_requests_finished_total{finish_reason=length}"
    assert after[key] - before[key] == 1
    for histogram in ("qoq_time_to_first_token_seconds", "qoq_time_per_output_token_seconds"):
        assert after[f"{histogram}_count"] - before[f"{histogram}_count"] == 1
        assert after[f"{histogram}_sum"] > before[f"{histogram}_sum"]
    assert after["qoq_generation_throughput_tokens_per_second"] > 0
    assert after["qoq_prompt_throughput_tokens_per_second"] > 0
    stats = served.engine.stats()
    assert after["qoq_kv_pages_total"] == stats.kv_pages_total == ENGINE_OPTIONS["num_pages"]
    assert after["qoq_kv_pages_used"] + after["qoq_kv_pages_free"] == stats.kv_pages_total
    assert after["qoq_requests_running"] == 0 and after["qoq_requests_waiting"] == 0
    assert "qoq_preemptions_total" in after
    assert after["qoq_steps_in_larger_program_total"] <= served.engine.stats().steps_in_larger_program_total
    attention = served.engine.attention  # on CPU: the jnp references and XLA
    for phase, implementation in (("decode", "reference"), ("extend", "reference"), ("prefill", "xla")):
        assert getattr(attention, phase) == implementation
        assert after[f"qoq_attention_implementation{{implementation={implementation},phase={phase}}}"] == 1


def test_cancelled_stream_aborts_its_request_and_frees_its_pages(served):
    baseline = _wait_idle(served.engine)
    aborted_before = _metrics(served.url)["qoq_requests_finished_total{finish_reason=abort}"]
    stream = served.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=100, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    during = served.engine.stats()
    assert during.running_requests == 1 and during.kv_pages_used > baseline.kv_pages_used
    stream.close()
    after = _wait_idle(served.engine)
    assert after.running_requests == 0 and after.kv_pages_used == baseline.kv_pages_used
    assert after.generation_tokens_total - baseline.generation_tokens_total < 100, "it should not have run to the end"
    assert _metrics(served.url)["qoq_requests_finished_total{finish_reason=abort}"] == aborted_before + 1


def test_a_request_failing_on_the_device_fails_alone(served, params, monkeypatch):
    """A request whose step fails on the device: 500 in OpenAI's shape for a whole answer, an error event for a
    stream; requests running beside it still answer as `generate` does, /health stays 200 and the engine serves
    the next request."""
    poison = "Poisoned prompt for the device"
    poison_ids = tuple(params.tokenizer(poison).input_ids)
    dispatch = ModelRunner.dispatch

    def failing(runner, scheduled):
        if any(tuple(c.seq.request.prompt_token_ids) == poison_ids for c in scheduled.chunks):
            raise RuntimeError("the device refused this request's inputs")
        return dispatch(runner, scheduled)

    def failing_later(runner, scheduled):  # once it has streamed 3 tokens
        if any(tuple(s.request.prompt_token_ids) == poison_ids and s.num_tokens > len(poison_ids) + 3
               for s in scheduled.decode):  # fmt: skip
            raise RuntimeError("the device refused this request's inputs")
        return dispatch(runner, scheduled)

    monkeypatch.setattr(ModelRunner, "dispatch", failing)
    before = _metrics(served.url)

    async def scenario():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as client:
            good = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW, temperature=0)
            bad = client.completions.create(model=MODEL, prompt=poison, max_tokens=NEW, temperature=0)
            return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(scenario())
    assert good.choices[0].text == qoq_jax.generate(params, [PROMPT], max_new_tokens=NEW)[0]
    assert isinstance(bad, openai.InternalServerError) and bad.status_code == 500
    assert bad.body["type"] == "server_error" and "refused this request" in bad.body["message"]
    monkeypatch.setattr(ModelRunner, "dispatch", failing_later)
    body = {"model": MODEL, "prompt": poison, "max_tokens": NEW, "stream": True, "temperature": 0}
    status, text = _raw(f"{served.url}/v1/completions", body=json.dumps(body).encode())
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]" and len(events) >= 3  # some text, then the error
    assert json.loads(events[-2])["error"]["type"] == "server_error" and json.loads(events[0])["choices"][0]["text"]
    assert _raw(f"{served.url}/health")[0] == 200
    after = _metrics(served.url)
    assert after["qoq_requests_failed_total"] - before["qoq_requests_failed_total"] == 2
    key = "qoq_requests_finished_total{finish_reason=error}"
    assert after[key] - before[key] == 2
    monkeypatch.undo()
    again = served.client.completions.create(model=MODEL, prompt=OTHER_PROMPT, max_tokens=NEW, temperature=0)
    assert again.choices[0].text == qoq_jax.generate(params, [OTHER_PROMPT], max_new_tokens=NEW)[0]


# -------------------------------------------------------------------------------------------------------- CLI


class _Described:
    def describe(self) -> str:
        return "sized and described"


def test_serve_command_passes_engine_options(monkeypatch, params, capsys):
    seen = {}
    monkeypatch.setattr(qoq_jax, "load", lambda model, dtype=None, mesh=None: params)
    monkeypatch.setattr("serve.engine.build_engine", lambda p, **kw: seen.update(build=kw) or _Described())
    monkeypatch.setattr("serve.engine.AsyncEngine", lambda engine: engine)
    monkeypatch.setattr("serve.http_server.create_app", lambda e, **kw: seen.update(app=kw) or "app")
    monkeypatch.setattr("serve.http_server.run", lambda app, host, port: seen.update(run=(app, host, port)))
    argv = ["serve", "--model", "some-dir", "--port", "8123", "--api-key", "k", "--max-num-seqs", "8"]
    argv += ["--max-num-batched-tokens", "40", "--warmup", "none", "--no-prefix-caching"]
    assert cli.main([*argv, "--max-model-len", "256", "--page-size", "32", "--kv-memory-gb", "0.5"]) == 0
    assert seen["build"] == dict(
        model_name="some-dir", max_num_seqs=8, max_num_batched_tokens=40, max_model_len=256, page_size=32,
        kv_memory_bytes=2**29, warmup="none", prefix_caching=False,
    )  # fmt: skip
    assert "[some-dir: sized and described]" in capsys.readouterr().err
    assert seen["app"] == dict(model_name="some-dir", api_key="k", logprobs_mode="raw")
    assert seen["run"] == ("app", "127.0.0.1", 8123)


def test_client_gone_before_a_whole_answer_aborts_its_request(served):
    baseline = _wait_idle(served.engine)

    async def scenario():
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
        request = asyncio.create_task(
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=110, extra_body={"ignore_eos": True})
        )
        deadline = time.monotonic() + 10
        while served.engine.stats().generation_tokens_total < baseline.generation_tokens_total + 2:
            assert time.monotonic() < deadline and not request.done()
            await asyncio.sleep(0.002)
        request.cancel()  # the client hangs up while the server collects the answer
        await client.close()

    asyncio.run(scenario())
    after = _wait_idle(served.engine)
    assert after.running_requests == 0 and after.kv_pages_used == baseline.kv_pages_used
    assert after.generation_tokens_total - baseline.generation_tokens_total < 110


# --------------------------------------------------------------------------------------------- load over HTTP

# 8 seats, chunks of two rows of 32 tokens, and 12 pages of 16 tokens (1.5 full-length sequences), so
# 32 clients at once force preemptions.
BUSY_OPTIONS = dict(
    max_num_seqs=8, max_model_len=128, page_size=16, num_pages=12, prefill_row_tokens=32, max_prefill_rows=2,
    warmup="none", compile_in_background=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def busy(params):
    engine = AsyncEngine(build_engine(params, model_name=MODEL, **BUSY_OPTIONS))
    with serving(create_app(engine, model_name=MODEL)) as url:
        yield Served(url, engine, None)


def _concurrent_completions(url: str, prompts: list[str], max_tokens: list[int]) -> list[str]:
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            responses = await asyncio.gather(
                *[
                    client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
                    for p, n in zip(prompts, max_tokens)
                ]
            )
        return [r.choices[0].text for r in responses]

    return asyncio.run(run())


def test_32_concurrent_clients_each_get_generates_output_despite_preemption(busy, params, gpl_text):
    """Mixed prompt (4..60 words) and output (1..40 tokens) lengths from 32 clients at once: every request
    completes, the small pool preempts some, and each greedy text is `generate` on that prompt alone."""
    rng = np.random.default_rng(213)
    words = gpl_text.split()
    starts = rng.integers(0, len(words) - 60, 32)
    prompts = [" ".join(words[s : s + int(rng.integers(4, 60))]) for s in starts]
    prompts = [p for p in prompts if len(params.tokenizer(p).input_ids) <= 80][:32]
    max_tokens = [int(rng.integers(1, 41)) for _ in prompts]
    before = _metrics(busy.url)
    texts = _concurrent_completions(busy.url, prompts, max_tokens)
    after = _metrics(busy.url)
    assert after["qoq_preemptions_total"] > before["qoq_preemptions_total"]
    for prompt, limit, text in zip(prompts, max_tokens, texts):
        assert text == qoq_jax.generate(params, [prompt], max_new_tokens=limit)[0], prompt
    stats = _wait_idle(busy.engine)
    assert stats.kv_pages_used == 0 and stats.running_requests == 0


def test_shared_prefixes_hit_the_prefix_cache(busy, params, gpl_text):
    """A 48-token shared prefix: after one request computed it, three more reuse its full pages (the hits show in
    /metrics) and still answer as `generate` does."""
    prefix_words = gpl_text.split()[100:160]
    prefix = " ".join(prefix_words)
    while len(params.tokenizer(prefix).input_ids) > 48:
        prefix_words = prefix_words[:-1]
        prefix = " ".join(prefix_words)
    prompts = [f"{prefix} {tail}" for tail in ("one", "two copies", "three more words", "four")]
    before = _metrics(busy.url)
    texts = _concurrent_completions(busy.url, prompts[:1], [8])
    texts += _concurrent_completions(busy.url, prompts[1:], [8, 8, 8])
    after = _metrics(busy.url)
    full_pages = (len(params.tokenizer(prefix).input_ids) // 16) * 16
    assert full_pages >= 32
    hits = after["qoq_prefix_cache_hit_tokens_total"] - before["qoq_prefix_cache_hit_tokens_total"]
    assert hits >= 3 * full_pages
    for prompt, text in zip(prompts, texts):
        assert text == qoq_jax.generate(params, [prompt], max_new_tokens=8)[0]


def test_serve_load_measures_the_server_and_the_scripts_read_its_summary(served, tmp_path, monkeypatch):
    """vllm_side_by_side's `load` (benchmarks/serve_load.py in a subprocess, streamed, ignore_eos) against the
    server: every request completes with all its tokens, and what it returns is serve_load's summary as
    `read_summary` gives it to vllm_side_by_side and http_overhead (both once read a `summary` key serve_load never
    wrote); the side-by-side's medians and ratios come out of it."""
    monkeypatch.setattr(vllm_side_by_side, "SERVED_MODEL", MODEL)
    out = tmp_path / "load.json"
    spec = dict(rate="inf", requests=3, prompt=5, output=5)
    summary = vllm_side_by_side.load(served.url, spec, out, seed=0)["summary"]
    assert "requests" not in summary and len(json.loads(out.read_text())["requests"]) == 3
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (3, 0, 15)
    assert summary["output_token_throughput"] == pytest.approx(15 / summary["duration_s"])
    runs = [
        {"system": system, "dtype": "float32", "round": 0, "workload": workload, "summary": summary}
        for system in ("qoq-jax", "vllm")
        for workload in ("concurrent", "sparse")
    ]
    options = argparse.Namespace(dtypes=["float32"], workloads=["concurrent", "sparse"], max_model_len=128,
                                 max_num_seqs=2, rounds=1)  # fmt: skip
    result = vllm_side_by_side.summarize(runs, options, "0.0")
    assert [goal["ratio"] for goal in result["goals"].values()] == [1.0, 1.0]
    assert result["rows"][0]["output_tokens_per_s"] == summary["output_token_throughput"]
    assert "| float32 | sparse | vllm |" in vllm_side_by_side.markdown(result)
