"""benchmarks/e2e_throughput.py: its memory-budget arithmetic against byte counts worked out by hand for
Llama-3-8B, its median, and a smoke run on a tiny model whose batches fit the budget and whose tokens/s are the
tokens counted where they were made over a clock around each run."""

from __future__ import annotations

import collections
import json
import math
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from qoq_jax import make_mesh
from qoq_jax.sharding import TensorParallel
from serve.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import e2e_throughput as e2e  # noqa: E402

LLAMA3 = e2e.MODELS["Llama-3-8B"]
HIDDEN, MLP, LAYERS, VOCAB = 4096, 14336, 32, 128256
# Decoder linears (in, out) of one layer: q, k, v, o, gate, up, down.
LINEARS = [(HIDDEN, 4096), (HIDDEN, 1024), (HIDDEN, 1024), (4096, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP), (MLP, HIDDEN)]
FP16_REST = 2 * (2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN)  # embeddings, untied lm_head, norms
SHAPE = {"prompt_len": 1024, "gen_len": 512}


def g128_bytes(k: int, n: int) -> int:
    return k * n // 2 + 2 * n + 2 * (k // 128) * n  # packed uint4, fp16 s1, int8 s2 and zero per group


def chn_bytes(k: int, n: int) -> int:
    return k * n // 2 + 2 * n + 2 * n  # packed uint4, fp16 scale and zero


def test_footprints_match_hand_counted_bytes():
    f16 = jnp.dtype(jnp.float16)
    g128 = e2e.footprint(LLAMA3, e2e.SYSTEMS["qoq_w4a8kv4_g128"], f16, None, **SHAPE)
    assert g128.weight_bytes == LAYERS * sum(g128_bytes(k, n) for k, n in LINEARS) + FP16_REST
    # 1536 tokens = 24 pages of 64; per token per layer K and V of 8 heads at 64 code bytes + fp16 scale and zero.
    assert g128.kv_bytes_per_sequence == 24 * 64 * LAYERS * 2 * 8 * (64 + 4) == 53_477_376

    w16 = e2e.footprint(LLAMA3, None, f16, None, **SHAPE)
    assert w16.weight_bytes == LAYERS * sum(2 * k * n for k, n in LINEARS) + FP16_REST
    assert w16.kv_bytes_per_sequence == 24 * 64 * LAYERS * 2 * 8 * 128 * 2

    w8 = e2e.footprint(LLAMA3, e2e.SYSTEMS["w8a8kv8"], f16, None, **SHAPE)
    assert w8.weight_bytes == LAYERS * sum(k * n + 4 * n for k, n in LINEARS) + FP16_REST
    assert w8.kv_bytes_per_sequence == 24 * 64 * LAYERS * 2 * 8 * (128 + 4)

    budget = 20 * 2**30
    assert g128.max_batch(budget) == (budget - g128.weight_bytes) // 53_477_376
    assert w16.max_batch(w16.weight_bytes - 1) == 0


def test_qserve_budget_is_its_a100_footprint_scaled_to_the_device():
    f16 = jnp.dtype(jnp.float16)
    held = LAYERS * sum(chn_bytes(k, n) for k, n in LINEARS) + FP16_REST + 6400 * 64 * LAYERS * 2 * 8 * 68
    assert e2e.qserve_budget_bytes("Llama-3-8B", LLAMA3, f16, 80 * 2**30) == held
    assert e2e.qserve_budget_bytes("Llama-3-8B", LLAMA3, f16, 160 * 2**30) == 2 * held
    # On an 80 GiB device that budget holds QServe's own A100 batch of 256 in W4A8KV4.
    g128 = e2e.footprint(LLAMA3, e2e.SYSTEMS["qoq_w4a8kv4_g128"], f16, None, **SHAPE)
    assert g128.max_batch(held) >= 256


def test_tensor_parallel_footprint_is_each_devices_share():
    f16 = jnp.dtype(jnp.float16)
    quant = e2e.SYSTEMS["qoq_w4a8kv4_g128"]
    parallel = TensorParallel.create(make_mesh(2), LLAMA3, quant)
    split = e2e.footprint(LLAMA3, quant, f16, parallel, **SHAPE)
    whole = e2e.footprint(LLAMA3, quant, f16, None, **SHAPE)
    replicated = 2 * ((2 * LAYERS + 1) * HIDDEN) + LAYERS * 2 * (2 * HIDDEN)  # norms; o and down's s1 per channel
    assert split.weight_bytes == (whole.weight_bytes - replicated) // 2 + replicated
    assert split.kv_bytes_per_sequence == whole.kv_bytes_per_sequence // 2


def test_the_median_is_the_middle_run_or_the_mean_of_the_middle_two():
    timing = e2e.Timing
    assert e2e.median_timing([timing(1.0, 3.0), timing(1.0, 1.0)]) == timing(1.0, 2.0)  # totals 4 and 2 → 3
    assert e2e.median_timing([timing(0.5, 9.0), timing(1.0, 1.0), timing(1.0, 2.0)]) == timing(1.0, 2.0)
    assert e2e.median_timing([timing(None, 2.0), timing(None, 4.0)]) == timing(None, 3.0)


def test_smoke_run_reports_the_tokens_it_generated_over_the_time_it_took(tmp_path, monkeypatch):
    """transformers (on CPU in smoke mode), QoQ and QoQ through the serving engine, watched from outside: each
    timed run is clocked around the runner's `run`, and the tokens are counted where they are made (QoQ: the
    prefilled rows and the steps of its decode loop; transformers: the shape `generate` returns; the engine: the
    tokens its steps emit per request). tokens/s must be batch × gen_len over that clock
    (rel. 5%: only the call's own overhead lies between the two clocks). The split path is the step functions'
    (test_tensor_parallel) and its budget is counted above."""
    wall = collections.defaultdict(list)  # runner class → seconds of each run() call, in order
    produced = collections.defaultdict(list)  # runner class → (rows, new tokens per row) of each run() call
    for runner in (e2e.QoQRunner, e2e.HFRunner, e2e.EngineRunner):

        def clocked(self, run=runner.run):
            started = time.perf_counter()
            timing = run(self)
            wall[type(self)].append(time.perf_counter() - started)
            return timing

        monkeypatch.setattr(runner, "run", clocked)
    prefilled, decoded = [], []

    def prefill_rows(params, cache, tokens, lengths, real=e2e._prefill_rows):
        prefilled.append(int(np.count_nonzero(lengths)))
        return real(params, cache, tokens, lengths)

    def decode_greedy(params, state, tokens, *, num_steps, real=e2e._decode_greedy):
        produced[e2e.QoQRunner].append((sum(prefilled), 1 + num_steps))  # the prefill's token, then the loop's
        assert tokens.shape == (sum(prefilled),)
        prefilled.clear()
        decoded.append(num_steps)
        return real(params, state, tokens, num_steps=num_steps)

    def generate(model, prompts, *args, real=transformers.GenerationMixin.generate, **kwargs):
        output = real(model, prompts, *args, **kwargs)
        produced[e2e.HFRunner].append((output.shape[0], output.shape[1] - prompts.shape[1]))
        return output

    monkeypatch.setattr(e2e, "_prefill_rows", prefill_rows)
    monkeypatch.setattr(e2e, "_decode_greedy", decode_greedy)
    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    emitted = collections.Counter()  # request id → tokens the engine emitted for it

    def step(engine, real=Engine.step):
        outputs = real(engine)
        for output in outputs:
            emitted[output.request_id] += len(output.new_token_ids)
        return outputs

    def engine_run(runner, real=e2e.EngineRunner.run):
        emitted.clear()
        timing = real(runner)
        assert len(set(emitted.values())) == 1, emitted
        produced[e2e.EngineRunner].append((len(emitted), next(iter(emitted.values()))))
        return timing

    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr(e2e.EngineRunner, "run", engine_run)  # wraps `clocked`

    systems = ["hf_torch", "qoq_w4a8kv4_g128", "qoq_w4a8kv4_g128_engine"]
    result = e2e.main(["--smoke", "--systems", *systems, "--out-dir", str(tmp_path)])
    [written] = tmp_path.glob("e2e-*-smoke.json")
    assert json.loads(written.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / written.name.replace(".json", ".md")).is_file()
    assert {"device", "jax_version", "rows"} <= result.keys() and result["gen_len"] == 8 and result["repeats"] == 1
    assert [row["system"] for row in result["rows"]] == systems
    for row, runner in zip(result["rows"], (e2e.HFRunner, e2e.QoQRunner)):
        assert row["model"] == "smoke" and 1 <= row["batch"] <= 4
        used = row["weight_bytes"] + row["batch"] * row["kv_bytes_per_sequence"]
        assert used <= row["budget_bytes"]
        assert row["batch"] == 4 or used + row["kv_bytes_per_sequence"] > row["budget_bytes"], "the largest batch"
        # Runs: a compile run and the timed one at the batch, then the same at batch 1 for the latency.
        assert produced[runner] == [(row["batch"], 8)] * 2 + [(1, 8)] * 2, runner
        timed = wall[runner][1]
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 8 / timed, rel=0.05)
        assert row["wall_s"] <= timed
        assert math.isfinite(row["ms_per_token_batch1"]) and 0 < row["ms_per_token_batch1"] <= 1e3 * wall[runner][3]
    assert decoded == [7] * 4
