"""Penalties, logit bias, min_tokens and log-probabilities through the serving engine: under chunked prefill,
preemption and recomputation every request's tokens and log-probabilities equal `qoq_jax.complete` on its prompt
alone with the same settings; what the device batch cannot hold is refused, naming the field."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

import qoq_jax
from qoq_jax.errors import InvalidRequestError, InvalidSamplingError
from qoq_jax.sampling import SamplingParams
from serve.engine import build_engine
from serve.request import Request
from serve.runner import MAX_HELD_STOP_IDS, StepShape
from tiny_models import sharp_tiny_llama, tiny_tokenizer

# The engine's logits come another way (chunked prefill over pages, recomputation after preemption) than
# complete's: equal to float rounding of logits of magnitude ~20 on this sharp model (measured ≤ 1.2e-4).
LOGPROB_TOLERANCE = 1e-3
NEW = 24


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


@pytest.fixture(scope="module")
def engine(params):
    """Rows of 16 tokens, two per step, on 14 pages of 16: four requests of ~60 tokens preempt each other."""
    return build_engine(
        params, num_pages=14, max_num_seqs=4, max_model_len=128, page_size=16, max_num_batched_tokens=36,
        prefill_row_tokens=16, max_prefill_rows=2, warmup="none", compile_in_background=False,
    )  # fmt: skip


def _run(engine, requests):
    for request in requests:
        engine.add_request(request)
    outputs = collections.defaultdict(list)
    for _ in range(5000):
        if not engine.has_work():
            break
        for output in engine.step():
            outputs[output.request_id].append(output)
    assert not engine.has_work(), "the engine did not drain"
    return outputs


def _complete(params, request: Request):
    """`complete` on the request's prompt alone, with its settings."""
    p = request.sampling
    [completion] = qoq_jax.complete(
        params, [list(request.prompt_token_ids)], max_new_tokens=request.max_tokens, temperature=p.temperature,
        top_k=p.top_k, top_p=p.top_p, seed=[p.seed], stop_token_ids=request.stop_token_ids,
        ignore_eos=request.ignore_eos, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty, min_tokens=p.min_tokens, logit_bias=dict(p.logit_bias),
        logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
    )  # fmt: skip
    return completion


def _assert_same_logprobs(mine, theirs):
    assert [e.token_id for e in mine] == [e.token_id for e in theirs]
    for a, b in zip(mine, theirs):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        np.testing.assert_allclose([a.logprob, *(v for _, v in a.top)], [b.logprob, *(v for _, v in b.top)],
                                   atol=LOGPROB_TOLERANCE)  # fmt: skip


def test_sampling_features_and_logprobs_equal_complete_under_preemption(params, engine):
    rng = np.random.default_rng(15)

    def prompt(length):
        return tuple(int(t) for t in rng.integers(3, 300, length))

    base = tuple(int(t) for t in rng.integers(3, 300, 40))
    [greedy] = qoq_jax.generate(params, [list(base)], max_new_tokens=NEW, ignore_eos=True)
    stop_id = greedy[2]  # greedy would stop after two tokens
    settings = [
        (base, dict(presence_penalty=1.2, frequency_penalty=0.4, repetition_penalty=1.5, logprobs=4)),
        (base, dict(min_tokens=12, logprobs=0, prompt_logprobs=3)),  # with stop_token_ids=[stop_id] below
        (prompt(45), dict(temperature=0.9, top_k=20, seed=7, logit_bias={11: 6.0, 12: -100.0}, frequency_penalty=1.0)),
        (prompt(38), dict(temperature=1.1, seed=9, repetition_penalty=0.7, logprobs=2, prompt_logprobs=1)),
        (prompt(50), dict(temperature=0.8, seed=2, logprobs=5)),  # no penalties: may start on cached pages
    ]
    requests = [
        Request(f"f{i}", tokens, NEW, sampling=SamplingParams(**options), ignore_eos=True,
                stop_token_ids=(stop_id,) if "min_tokens" in options else ())  # fmt: skip
        for i, (tokens, options) in enumerate(settings)
    ]
    before = engine.stats().preemptions_total
    outputs = _run(engine, requests)
    assert engine.stats().preemptions_total > before, "the small pool should force preemption"
    for request in requests:
        expected = _complete(params, request)
        got = outputs[request.request_id]
        tokens = [t for o in got for t in o.new_token_ids]
        assert tokens == expected.token_ids, request.sampling
        assert got[-1].finish_reason == expected.finish_reason
        if request.sampling.logprobs is not None:
            _assert_same_logprobs([e for o in got for e in o.new_logprobs], expected.logprobs)
        else:
            assert all(o.new_logprobs == () for o in got)
        prompt_logprobs = [o.prompt_logprobs for o in got if o.prompt_logprobs is not None]
        if request.sampling.prompt_logprobs is None:
            assert prompt_logprobs == []
        else:
            assert len(prompt_logprobs) == 1 and got[0].prompt_logprobs is not None  # once, with the first output
            _assert_same_logprobs(list(prompt_logprobs[0]), expected.prompt_logprobs)
    held = [t for o in outputs["f1"] for t in o.new_token_ids]
    assert stop_id not in held[:12] and len(held) >= 12


def test_what_the_device_batch_cannot_hold_is_refused(params, engine):
    vocab = params.config.vocab_size
    with pytest.raises(InvalidSamplingError, match="logit_bias"):
        engine.add_request(Request("bias", (5, 6), 4, sampling=SamplingParams(logit_bias={vocab: 1.0})))
    many = tuple(range(3, 4 + MAX_HELD_STOP_IDS))
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        engine.add_request(Request("stops", (5, 6), 4, sampling=SamplingParams(min_tokens=2), stop_token_ids=many))
    engine.add_request(Request("ok", (5, 6), 4, stop_token_ids=many))  # without min_tokens nothing is held
    _run(engine, [])


def test_settings_share_the_compiled_step_programs(engine):
    """Settings are per-slot arrays, never part of a program's shape: a request with every feature runs in the
    programs a plain request of the same lengths compiled."""
    rng = np.random.default_rng(151)
    plain, featured = (tuple(int(t) for t in rng.integers(3, 300, 27)) for _ in range(2))
    _run(engine, [Request("plain", plain, 6, ignore_eos=True)])
    compiled = engine.runner.num_compiled
    sampling = SamplingParams(
        temperature=0.7, top_k=9, top_p=0.9, seed=3, presence_penalty=0.5, frequency_penalty=0.3,
        repetition_penalty=1.2, min_tokens=2, logit_bias={7: 3.0}, logprobs=3, prompt_logprobs=2,
        logprobs_mode="processed",
    )  # fmt: skip
    outputs = _run(engine, [Request("featured", featured, 6, sampling=sampling, ignore_eos=True)])
    assert sum(len(o.new_token_ids) for o in outputs["featured"]) == 6
    assert engine.runner.num_compiled == compiled


def test_plain_decode_steps_copy_no_vocabulary_wide_array(params, engine):
    """The sampler's logit processing (bias, min_tokens, penalties) runs in its own branch, and a decode step
    records only the output counts: without it XLA copies the [B, V] logits and the [slots, V] prompt marks in
    every step, whether a request asked for processing or not (measured on engine_overhead's model at 64 rows:
    23.4 ms a step against the bare decode loop's 19.8; 15.8 against 15.9 without the copies). A vocabulary-wide
    copy may only sit in a conditional's branch (the processing branch copies the logits it changes)."""
    runner = engine.runner
    program = runner._compile(StepShape(runner.decode_buckets[-1], 0, runner.width_buckets[-1]))
    vocab, hlo = params.config.vocab_size, program.as_text()
    copies = []  # (computation, copied rows) of every [rows, V] copy
    computation = None
    for line in hlo.splitlines():
        if line and not line[0].isspace():
            computation = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
        elif match := re.search(rf"= \w+\[(\d+),{vocab}\]\{{1,0\}} copy\(", line):
            copies.append((computation, int(match.group(1))))
    assert copies, "no vocabulary-wide copy at all: the HLO format changed and this test reads nothing"
    groups = re.findall(r"branch_computations=\{([^}]*)\}", hlo)
    branches = {name.strip() for group in groups for name in group.split(",")}
    assert [rows for _, rows in copies if rows == runner.num_slots + 1] == [], "the token history is copied"
    assert [c for c in copies if c[0] not in branches] == [], "a copy runs in every step"
