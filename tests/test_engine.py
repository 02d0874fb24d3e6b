"""The serving engine without HTTP: every request's output equals `qoq_jax.generate` on its prompt alone, under
preemption, chunked prefill, prefix caching, sampling and stop rules; aborts free pages; warm-up compiles every
shape the engine runs; bad requests are refused."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from tiny_models import sharp_tiny_llama, tiny_tokenizer

import qoq_jax
from qoq_jax.errors import InvalidRequestError, PromptTooLongError
from qoq_jax.sampling import SamplingParams
from serve.engine import _decode_and_sample, _prefill_and_sample, build_engine
from serve.request import OverloadedError, Request

SMALL = dict(max_num_seqs=8, max_model_len=128, page_size=16, max_prefill_chunk=32, max_prefill_rows=2)


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


@pytest.fixture(scope="module")
def engine(params):
    """Warmed up once; a pool of 20 pages (2 full sequences) makes 8 seats compete for pages."""
    return build_engine(params, num_pages=20, **SMALL)


def _run(engine, requests):
    for request in requests:
        engine.add_request(request)
    tokens, texts = collections.defaultdict(list), collections.defaultdict(str)
    reasons = {}
    for _ in range(5000):  # a livelock fails the test instead of hanging it
        if not engine.has_work():
            break
        assert not any(s.request_id in engine.allocator for s in engine.waiting), "a waiting sequence holds pages"
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
            texts[output.request_id] += output.new_text
            if output.finished:
                assert output.request_id not in reasons, "a request finished twice"
                reasons[output.request_id] = output.finish_reason
    assert not engine.has_work(), "the engine did not drain in 5000 steps"
    return tokens, texts, reasons


def _random_requests(rng, count, prefix=(), **kwargs):
    return [
        Request(
            f"r{i}",
            tuple(prefix) + tuple(int(t) for t in rng.integers(3, 300, int(rng.integers(1, 60)))),
            int(rng.integers(1, 40)),
            **kwargs,
        )
        for i in range(count)
    ]


def test_outputs_equal_generate_alone_under_preemption_and_chunking(params, engine):
    """10 long requests (prompts chunked at 32 tokens, up to 110 tokens each) on 20 pages of 16 tokens: the
    youngest are preempted and recomputed, and every output is still generate's."""
    rng = np.random.default_rng(201)
    requests = [
        Request(f"p{i}", tuple(int(t) for t in rng.integers(3, 300, int(rng.integers(20, 60)))), 50, ignore_eos=True)
        for i in range(10)
    ]
    before = engine.stats()
    tokens, _, reasons = _run(engine, requests)
    stats = engine.stats()
    assert stats.preemptions_total > before.preemptions_total, "the small pool should force preemption"
    assert stats.kv_pages_used == 0 and stats.running_requests == stats.waiting_requests == 0
    for request in requests:
        prompt = list(request.prompt_token_ids)
        [expected] = qoq_jax.generate(params, [prompt], max_new_tokens=50, ignore_eos=True)
        assert tokens[request.request_id] == expected and reasons[request.request_id] == "length", request


def test_mixed_requests_finish_as_generate_says(params, engine):
    rng = np.random.default_rng(202)
    requests = _random_requests(rng, 12)
    tokens, _, reasons = _run(engine, requests)
    for request in requests:
        [expected] = qoq_jax.generate(params, [list(request.prompt_token_ids)], max_new_tokens=request.max_tokens)
        assert tokens[request.request_id] == expected, request
        assert reasons[request.request_id] == ("length" if len(expected) == request.max_tokens else "stop")


def test_shared_prefixes_hit_the_prefix_cache_with_unchanged_outputs(params, engine):
    rng = np.random.default_rng(203)
    prefix = tuple(int(t) for t in rng.integers(3, 300, 40))  # 2 full pages of 16
    requests = _random_requests(rng, 4, prefix=prefix)
    first, _, _ = _run(engine, requests[:1])
    hits = engine.stats().prefix_cache_hit_tokens_total
    tokens, _, _ = _run(engine, requests[1:])
    assert engine.stats().prefix_cache_hit_tokens_total - hits >= 3 * 32
    for request in requests:
        [expected] = qoq_jax.generate(params, [list(request.prompt_token_ids)], max_new_tokens=request.max_tokens)
        assert {**first, **tokens}[request.request_id] == expected


def test_sampling_seeds_and_stop_strings_match_generate(params, engine):
    text = "This License applies to"
    prompt = params.tokenizer(text).input_ids
    sampled = Request("s", tuple(prompt), 24, SamplingParams(temperature=0.9, top_p=0.8, top_k=50, seed=7))
    [full] = qoq_jax.generate(params, [prompt], max_new_tokens=24, ignore_eos=True)
    stop = full[6:9]
    stop_text = params.tokenizer.decode(stop, skip_special_tokens=True).strip()
    stopped = Request("t", tuple(prompt), 24, stop=(stop_text,), ignore_eos=True)
    tokens, texts, reasons = _run(engine, [sampled, stopped])
    [expected] = qoq_jax.generate(params, [prompt], max_new_tokens=24, temperature=0.9, top_p=0.8, top_k=50, seed=7)
    assert tokens["s"] == expected
    [expected] = qoq_jax.complete(params, [text], max_new_tokens=24, ignore_eos=True, stop=[stop_text])
    assert texts["t"] == expected.text and tokens["t"] == expected.token_ids
    assert reasons["t"] == "stop" and stop_text not in texts["t"]


def test_abort_frees_pages_and_ends_the_request(engine):
    engine.add_request(Request("long", tuple(range(3, 40)), 80, ignore_eos=True))
    engine.step()
    assert engine.stats().kv_pages_used > 0
    engine.abort("long")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("long", "abort")]
    assert engine.stats().kv_pages_used == 0 and not engine.has_work()


def test_warmup_compiled_every_shape(params, engine):
    """Serving after warm-up never compiles: the jit caches do not grow over a varied workload."""
    sizes = (_decode_and_sample._cache_size(), _prefill_and_sample._cache_size())
    _run(engine, _random_requests(np.random.default_rng(204), 9))
    assert (_decode_and_sample._cache_size(), _prefill_and_sample._cache_size()) == sizes


def test_bad_requests_are_refused(params, engine):
    with pytest.raises(PromptTooLongError, match="context of 128"):
        engine.add_request(Request("a", tuple(range(3, 103)), 29))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request(Request("b", (), 5))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request(Request("c", (1, 10**6), 5))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request(Request("d", (1, 2), 0))
    engine.add_request(Request("e", (5, 6), 3))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(Request("e", (5, 6), 3))
    _run(engine, [])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        build_engine(params, num_pages=7, warmup=False, **SMALL)


def test_overload_is_refused(params):
    engine = build_engine(params, max_waiting=2, warmup=False, **SMALL)
    engine.add_request(Request("a", (5, 6), 3))
    engine.add_request(Request("b", (5, 6), 3))
    with pytest.raises(OverloadedError):
        engine.add_request(Request("c", (5, 6), 3))
