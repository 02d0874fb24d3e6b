"""The serving engine without HTTP: every request's output equals `qoq_jax.generate` on its prompt alone, under
preemption, chunked prefill, prefix caching, sampling and stop rules; steps overlap (the next step is dispatched
before the last one's tokens are read) and a finished sequence never emits a token past its stop; a step that
fails ends its request alone; warm-up compiles every shape the engine runs; bad requests are refused."""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
import pytest
from near_ties import assert_equal_up_to_a_near_tie
from tiny_models import TINY_CONFIGS, sharp_tiny_llama, tiny_tokenizer

import qoq_jax
from qoq_jax.errors import InvalidRequestError, InvalidSamplingError, PromptTooLongError
from qoq_jax.sampling import SamplingParams
from serve.engine import build_engine
from serve.request import EngineDeadError, OverloadedError, Request
from serve.runner import InFlightStep, ModelRunner

# Rows of 16 tokens, two per step: a 60-token prompt takes two steps. Widths 1, 2, 4 and 8 pages.
SMALL = dict(
    max_num_seqs=8,
    max_model_len=128,
    page_size=16,
    max_num_batched_tokens=40,
    prefill_row_tokens=16,
    max_prefill_rows=2,
    warmup="none",
    compile_in_background=False,
)


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


@pytest.fixture(scope="module")
def engine(params):
    """A pool of 20 pages (2 full sequences) makes 8 seats compete for pages."""
    return build_engine(params, num_pages=20, **SMALL)


def _run(engine, requests):
    for request in requests:
        engine.add_request(request)
    tokens, texts = collections.defaultdict(list), collections.defaultdict(str)
    reasons = {}
    for _ in range(5000):  # a livelock fails the test instead of hanging it
        if not engine.has_work():
            break
        waiting = engine.scheduler.waiting
        assert not any(s.request_id in engine.kv_cache for s in waiting), "a waiting sequence holds pages"
        for output in engine.step():
            assert output.request_id not in reasons, "an output after the finish"
            tokens[output.request_id] += output.new_token_ids
            texts[output.request_id] += output.new_text
            assert output.num_generated_tokens == len(tokens[output.request_id])
            if output.finished:
                reasons[output.request_id] = output.finish_reason
    assert not engine.has_work(), "the engine did not drain in 5000 steps"
    return tokens, texts, reasons


def _random_requests(rng, count, prefix=(), longest=60, **kwargs):
    return [
        Request(
            f"r{i}",
            tuple(prefix) + tuple(int(t) for t in rng.integers(3, 300, int(rng.integers(1, longest)))),
            int(rng.integers(1, 40)),
            **kwargs,
        )
        for i in range(count)
    ]


def test_outputs_equal_generate_alone_under_preemption_and_chunking(params, engine):
    """10 long requests (prompts in rows of 16, up to 110 tokens each) on 20 pages of 16 tokens: the youngest are
    preempted and recomputed, and every output is still generate's."""
    rng = np.random.default_rng(1)
    requests = [
        Request(f"p{i}", tuple(int(t) for t in rng.integers(3, 300, int(rng.integers(20, 60)))), 50, ignore_eos=True)
        for i in range(10)
    ]
    before = engine.stats()
    tokens, _, reasons = _run(engine, requests)
    stats = engine.stats()
    assert stats.preemptions_total > before.preemptions_total, "the small pool should force preemption"
    assert stats.kv_pages_used == 0 and stats.running_requests == stats.waiting_requests == 0
    expected = qoq_jax.generate(
        params, [list(r.prompt_token_ids) for r in requests], max_new_tokens=50, ignore_eos=True
    )
    for request, want in zip(requests, expected):
        assert tokens[request.request_id] == want and reasons[request.request_id] == "length", request


def test_mixed_requests_finish_as_generate_says(params, engine):
    rng = np.random.default_rng(2)
    requests = _random_requests(rng, 12)
    tokens, _, reasons = _run(engine, requests)
    for request in requests:
        [expected] = qoq_jax.generate(params, [list(request.prompt_token_ids)], max_new_tokens=request.max_tokens)
        assert tokens[request.request_id] == expected, request
        assert reasons[request.request_id] == ("length" if len(expected) == request.max_tokens else "stop")


def test_shared_prefixes_hit_the_prefix_cache_with_unchanged_outputs(params, engine):
    rng = np.random.default_rng(3)
    prefix = tuple(int(t) for t in rng.integers(3, 300, 40))  # 2 full pages of 16
    requests = _random_requests(rng, 4, prefix=prefix, longest=30)
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


def test_steps_overlap_and_nothing_is_emitted_past_a_stop(params, engine, monkeypatch):
    """Every step's tokens are read after the next step was dispatched (while there is one), no device-to-host
    transfer happens while a step is planned and dispatched, and a sequence stopped by a token that the next
    (already dispatched) step extended emits nothing after it."""
    rng = np.random.default_rng(4)
    prompts = [tuple(int(t) for t in rng.integers(3, 300, 12)) for _ in range(3)]
    full = qoq_jax.generate(params, [list(p) for p in prompts], max_new_tokens=20, ignore_eos=True)
    stop_token = full[0][5]  # request 0 stops at its 6th token (never emitted); the others run to 20
    requests = [
        Request(f"o{i}", prompt, 20, stop_token_ids=(stop_token,) if i == 0 else (), ignore_eos=True)
        for i, prompt in enumerate(prompts)
    ]
    read_steps, late = set(), []
    read, dispatch = InFlightStep.result, ModelRunner.dispatch

    def reading(step):
        read_steps.add(step.index)
        return read(step)

    def guarded(runner, scheduled):
        with jax.transfer_guard_device_to_host("disallow"):
            step = dispatch(runner, scheduled)
        if step.index - 1 in read_steps:
            late.append(step.index)
        return step

    monkeypatch.setattr(InFlightStep, "result", reading)
    monkeypatch.setattr(ModelRunner, "dispatch", guarded)
    tokens, _, reasons = _run(engine, requests)
    assert len(read_steps) >= 20 and not late
    assert tokens["o0"] == full[0][: full[0].index(stop_token)] and reasons["o0"] == "stop"
    assert [tokens["o1"], tokens["o2"]] == full[1:] and reasons["o1"] == reasons["o2"] == "length"


def test_a_failing_step_ends_its_request_alone(params, engine, monkeypatch):
    """A request whose step raises (once on dispatch, as an argument error would; once while it runs on the device,
    which takes a restart on a fresh pool) ends with an error; the others, in the same steps, still equal generate;
    the engine serves on."""
    rng = np.random.default_rng(5)
    requests = _random_requests(rng, 5)
    poison = requests[2].prompt_token_ids
    dispatch = ModelRunner.dispatch
    failures = []

    def failing(runner, scheduled):
        if any(c.seq.request.prompt_token_ids == poison for c in scheduled.chunks):
            failures.append(len(failures))
            if len(failures) == 1:
                raise RuntimeError("an argument the device refuses")
            step = dispatch(runner, scheduled)

            def result():
                raise RuntimeError("the device failed while running the step")

            step.result = result
            return step
        return dispatch(runner, scheduled)

    monkeypatch.setattr(ModelRunner, "dispatch", failing)
    restarts = engine.stats().engine_restarts_total
    for round_ in range(2):
        renamed = [dataclasses.replace(r, request_id=f"{r.request_id}-{round_}") for r in requests]
        tokens, _, reasons = _run(engine, renamed)
        for request in renamed:
            if request.prompt_token_ids == poison:
                assert reasons[request.request_id] == "error" and not tokens[request.request_id]
                continue
            [expected] = qoq_jax.generate(params, [list(request.prompt_token_ids)], max_new_tokens=request.max_tokens)
            assert tokens[request.request_id] == expected, request
    assert len(failures) >= 2 and engine.stats().engine_restarts_total == restarts + 1
    assert engine.stats().requests_failed_total >= 2


def test_repeated_failures_without_a_culprit_stop_the_engine(params, monkeypatch):
    """Once the device is gone every step fails: the first (three proven requests, none new) makes them
    suspects and restarts the device state; each suspect then runs alone and is ended; the fourth failure in a
    row stops the engine."""
    engine = build_engine(params, num_pages=20, **SMALL)
    dispatch, calls = ModelRunner.dispatch, []

    def failing_later(runner, scheduled):
        calls.append(None)
        if len(calls) > 3:
            raise RuntimeError("the device is gone")
        return dispatch(runner, scheduled)

    monkeypatch.setattr(ModelRunner, "dispatch", failing_later)
    for name, last in (("a", 7), ("b", 8), ("c", 9)):
        engine.add_request(Request(name, (5, 6, last), 20, ignore_eos=True))
    ended = {}
    with pytest.raises(EngineDeadError, match="4 steps in a row failed"):
        for _ in range(50):
            ended.update((o.request_id, o.finish_reason) for o in engine.step() if o.finished)
    assert ended == {"a": "error", "b": "error"}
    assert engine.stats().engine_restarts_total == 3 and engine.stats().requests_failed_total == 2


def test_abort_frees_pages_and_ends_the_request(engine):
    engine.add_request(Request("long", tuple(range(3, 40)), 80, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().kv_pages_used > 0
    engine.abort("long")
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs if o.finished] == [("long", "abort")]
    assert engine.stats().kv_pages_used == 0


def test_warmup_compiled_every_shape(params):
    """With warm-up "all" (two XLA compilations at once), serving a varied workload compiles nothing more."""
    options = {**SMALL, "max_num_seqs": 1, "max_model_len": 32, "max_num_batched_tokens": 16, "max_prefill_rows": 1}
    engine = build_engine(params, num_pages=4, **{**options, "warmup": "all", "compile_threads": 2})
    compiled = engine.runner.num_compiled
    assert compiled == len(engine.runner.all_shapes()) == 2 * 3  # widths 1, 2 × decode, chunk, both
    rng = np.random.default_rng(6)
    _run(engine, [Request(f"w{i}", tuple(int(t) for t in rng.integers(3, 300, n)), 32 - n) for i, n in
                  enumerate((1, 5, 16, 17, 30))])  # fmt: skip
    assert engine.runner.num_compiled == compiled


def test_covering_set_runs_a_decode_step_in_at_most_eight_times_its_rows(params):
    """Every step shape has a warm-up program covering it at its own width; a decode-only step's has at most 8× its
    rows (the covering set at 256 seats: 1, 8, 64, 256 decode rows, the chunk rows alone and with 256)."""
    runner = ModelRunner(params, num_pages=8, page_size=16, pages_per_seq=8, max_num_seqs=256, max_prefill_rows=4,
                         prefill_row_tokens=16, compile_in_background=False)  # fmt: skip
    cover = runner.cover_shapes()
    assert len(cover) == len(runner.width_buckets) * 6 and set(cover) <= set(runner.all_shapes())
    for shape in runner.all_shapes():
        best = min((c for c in cover if c.covers(shape)), key=lambda c: c.cost(runner.row_tokens))
        assert best.width == shape.width
        if not shape.chunk_rows:
            assert (best.chunk_rows, best.decode_rows <= 8 * shape.decode_rows) == (0, True), (shape, best)


def test_steps_in_a_covering_program_are_counted(params):
    """With the covering warm-up and no background compilation, 2- and 4-row decodes run in the 8-row program:
    counted in the stats, each such step once, and nothing else is compiled."""
    options = {**SMALL, "max_model_len": 16, "max_num_batched_tokens": 16, "max_prefill_rows": 1}
    engine = build_engine(params, num_pages=8, **{**options, "warmup": "cover"})
    assert engine.runner.num_compiled == 4  # width 1: 1 and 8 decode rows, the chunk row alone and with 8
    shapes = []
    dispatch = engine.runner.dispatch
    engine.runner.dispatch = lambda scheduled: shapes.append(engine.runner.shape_of(scheduled)) or dispatch(scheduled)
    _run(engine, [Request(f"c{i}", (5 + i, 6, 7), 6) for i in range(3)])
    covered = [s for s in shapes if s not in engine.runner.cover_shapes()]
    assert {(2, 0, 1), (4, 0, 1)} <= {dataclasses.astuple(s) for s in covered}  # and mixed steps, in (8, 1)
    assert engine.stats().steps_in_larger_program_total == len(covered)
    assert engine.runner.num_compiled == 4


def test_bad_requests_are_refused(params, engine):
    with pytest.raises(PromptTooLongError, match="context of 128"):
        engine.add_request(Request("a", tuple(range(3, 103)), 29))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request(Request("b", (), 5))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request(Request("c", (1, 10**6), 5))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request(Request("d", (1, 2), 0))
    with pytest.raises(InvalidSamplingError, match="top_k"):
        engine.add_request(Request("f", (1, 2), 3, SamplingParams(top_k=2**40)))
    engine.add_request(Request("e", (5, 6), 3))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(Request("e", (5, 6), 3))
    _run(engine, [])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        build_engine(params, num_pages=7, **SMALL)


def test_overload_is_refused(params):
    engine = build_engine(params, max_waiting=2, **{**SMALL, "max_num_seqs": 1})
    engine.add_request(Request("a", (5, 6), 3))
    engine.add_request(Request("b", (5, 6), 3))
    engine.add_request(Request("c", (5, 6), 3))
    with pytest.raises(OverloadedError):
        engine.add_request(Request("d", (5, 6), 3))


def test_defaults_are_sized_from_the_kv_budget(params):
    """256 seats when the pool holds 256 sequences of up to 2048 tokens (here the model's 512), fewer (a power of
    two) when it holds fewer; the budget is every decode plus 512 prompt tokens."""
    assert params.config.max_context == 512
    big = build_engine(params, num_pages=256 * 512 // 64, warmup="none")
    assert (big.config.max_num_seqs, big.config.max_num_batched_tokens) == (256, 256 + 512)
    small = build_engine(params, num_pages=100 * 512 // 64, warmup="none")
    assert small.config.max_num_seqs == 64 and small.config.max_prefill_rows * small.config.prefill_row_tokens >= 512


def test_w4a8kv4_outputs_equal_generate_under_chunking_prefix_hits_and_preemption():
    """On a W4A8KV4 model every attention reads keys and values as the pages hold them, however the prompt got
    there (rows of 16 tokens, a cached prefix, a recompute after preemption), so greedy tokens equal generate's
    (up to a near-tie a flipped quantized code may decide either way: see tests/near_ties.py)."""
    config = qoq_jax.ModelConfig.from_hf(TINY_CONFIGS["llama_quantizable"]().to_dict())
    params = qoq_jax.init_params(config, seed=3, quant=qoq_jax.QuantFormat("w4a8-g128", group_size=64, kv_bits=4))
    engine = build_engine(params, num_pages=20, **SMALL)
    rng = np.random.default_rng(7)
    prefix = tuple(int(t) for t in rng.integers(3, 300, 33))  # two full pages, shared by every prompt
    requests = [
        Request(f"q{i}", prefix + tuple(int(t) for t in rng.integers(3, 300, int(rng.integers(5, 30)))), 40,
                ignore_eos=True)
        for i in range(8)
    ]  # fmt: skip
    tokens, _, _ = _run(engine, requests[:1])
    more, _, _ = _run(engine, requests[1:])
    tokens.update(more)
    stats = engine.stats()
    assert stats.preemptions_total > 0 and stats.prefix_cache_hit_tokens_total >= 7 * 32
    prompts = [list(r.prompt_token_ids) for r in requests]
    expected = qoq_jax.generate(params, prompts, max_new_tokens=40, ignore_eos=True)
    for request, prompt, want in zip(requests, prompts, expected):
        assert_equal_up_to_a_near_tie(params, prompt, tokens[request.request_id], want, request.request_id)
