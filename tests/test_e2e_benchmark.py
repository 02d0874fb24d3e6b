"""benchmarks/e2e_throughput.py: its memory-budget arithmetic against byte counts worked out by hand for
Llama-3-8B, and a smoke run on a tiny model whose JSON is well formed and whose batches fit the budget."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from qoq_jax import make_mesh
from qoq_jax.sharding import TensorParallel

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


def test_smoke_run_writes_well_formed_json_with_batches_that_fit(tmp_path):
    """transformers (on CPU in smoke mode), QoQ and QoQ through the serving engine: the split path is the step
    functions' (test_tensor_parallel) and its budget is counted above."""
    systems = ["hf_torch", "qoq_w4a8kv4_g128", "qoq_w4a8kv4_g128_engine"]
    result = e2e.main(["--smoke", "--systems", *systems, "--out-dir", str(tmp_path)])
    [written] = tmp_path.glob("e2e-*-smoke.json")
    assert json.loads(written.read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / written.name.replace(".json", ".md")).is_file()
    assert {"device", "jax_version", "rows"} <= result.keys()
    assert [row["system"] for row in result["rows"]] == systems
    for row in result["rows"]:
        assert row["model"] == "smoke" and 1 <= row["batch"] <= 4
        used = row["weight_bytes"] + row["batch"] * row["kv_bytes_per_sequence"]
        assert used <= row["budget_bytes"]
        assert row["batch"] == 4 or used + row["kv_bytes_per_sequence"] > row["budget_bytes"], "the largest batch"
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert math.isfinite(row["ms_per_token_batch1"]) and row["ms_per_token_batch1"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 8 / row["wall_s"])
