"""Engine overhead: the serving engine's decode throughput against the bare compiled decode loop, same run.

A tiny random Llama (device-cheap, so the host's share shows) with SmolLM2's real tokenizer (so detokenizing and
stop-string checks cost what they cost in serving) decodes N sequences together, N = 64, 256, 512. Per N:

* engine: N requests of real text (the license, `--prompt-tokens` tokens each, all different), `--new-tokens`
  each, greedy, ignore_eos, a stop string each (so the stop check runs on every token), driven by `Engine.step()`
  as the server drives it. Measured over the window where all N sequences decode (after the last prompt is in,
  before the first finishes): generated tokens/s and the host's time per step split into schedule (inbox and
  scheduler), prepare (inputs and dispatch), outputs (stop rules, detokenizing, deltas) and wait (blocked on the
  device for the previous step's tokens: what the host did not have to do), as the engine thread's CPU time (on a
  CPU device the host's wall time stretches while the step computes on the same two cores) and as wall time.
* bare: the same model, batch and block-table width, `decode_step` + `sample` compiled and dispatched back to
  back with the sampled tokens fed on the device and nothing read back, as many steps as the window; with the
  CPU time of its calls (XLA's own dispatch, which the engine's prepare time holds too).

The two alternate `--repeats` times; medians are reported (engine / bare: the median of each engine run's rate
over the bare run right after it), with the machine's load average at the start (the machine is shared: trust the
within-run ratio). Goals on the 2-core CPU: engine ≥ 0.95× bare at 256 sequences, host ≤ 2 ms per step at 256.

    python benchmarks/engine_overhead.py

Writes benchmarks/results/engine-overhead-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import qoq_jax  # noqa: E402
from qoq_jax.kv_cache import PagedKVCache  # noqa: E402
from qoq_jax.sampling import SamplingBatch, SamplingParams, sample  # noqa: E402
from qoq_jax.steps import DecodeState, decode_step  # noqa: E402
from serve.engine import build_engine  # noqa: E402
from serve.request import Request  # noqa: E402

TEXT = REPO.parent / "shared" / "data" / "gpl-3.0.txt"
GOAL_RATIO, GOAL_HOST_MS, GOAL_BATCH = 0.95, 2.0, 256
PAGE_SIZE = 16
MIN_WINDOW_STEPS = 32  # steps with every sequence decoding, per run


def tiny_model(tokenizer, args) -> qoq_jax.Params:
    config = qoq_jax.ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 32,
        num_kv_heads=max(1, args.hidden // 128),
        head_dim=32,
        max_context=args.prompt_tokens + args.new_tokens + PAGE_SIZE,
    )
    params = qoq_jax.init_params(config, seed=0)
    return dataclasses.replace(params, tokenizer=tokenizer)


def prompts(tokenizer, count: int, length: int) -> list[tuple[int, ...]]:
    """`count` different windows of the license, `length` tokens each."""
    ids = tokenizer(TEXT.read_text()).input_ids
    stride = max(1, (len(ids) - length) // count)
    return [tuple(ids[(i * stride) % (len(ids) - length) :][:length]) for i in range(count)]


def run_engine(engine, requests: list[Request]) -> dict:
    """Drives `engine` until `requests` finish; measures the window where all of them decode."""
    for request in requests:
        engine.add_request(request)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    start = engine.stats().prompt_tokens_total
    times = engine.step_times
    window = None
    finished = 0
    while engine.has_work():
        outputs = engine.step()
        finished += sum(o.finished for o in outputs)
        stats = engine.stats()
        if window is None and stats.prompt_tokens_total - start >= prompt_tokens:
            window = (time.perf_counter(), stats.generation_tokens_total, dataclasses.replace(times))
        elif window is not None and len(window) == 3 and finished:
            window += (time.perf_counter(), stats.generation_tokens_total, dataclasses.replace(times))
    t0, g0, s0, t1, g1, s1 = window
    steps = s1.steps - s0.steps
    if steps < MIN_WINDOW_STEPS:
        raise SystemExit(
            f"only {steps} steps with all {len(requests)} sequences decoding: raise --new-tokens or --prompt-budget"
        )
    parts = [f.name for f in dataclasses.fields(s1) if f.name != "steps"]
    host = {part: (getattr(s1, part) - getattr(s0, part)) / steps * 1e3 for part in parts}
    return {
        "tokens_per_s": (g1 - g0) / (t1 - t0),
        "steps": steps,
        "host_ms_per_step": host["schedule_cpu"] + host["prepare_cpu"] + host["outputs_cpu"],
        "host_wall_ms_per_step": host["schedule"] + host["prepare"] + host["outputs"],
        "split_ms_per_step": host,
    }


@functools.partial(jax.jit, donate_argnames=("state",))
def _bare_step(params, state, tokens, sampling):
    state, logits = decode_step(params, state, tokens)
    return state, sample(logits, sampling, state.lengths)


def run_bare(params, batch: int, width: int, start_length: int, steps: int) -> dict:
    config = params.config
    cache = PagedKVCache.for_batch(
        config, batch, width * PAGE_SIZE, page_size=PAGE_SIZE, dtype=params.dtype, kv_bits=params.kv_bits
    )
    state = DecodeState(cache=cache, lengths=jnp.full((batch,), start_length, jnp.int32))
    sampling = SamplingBatch.stack([SamplingParams()] * batch)
    tokens = jnp.zeros((batch,), jnp.int32)
    state, tokens = _bare_step(params, state, tokens, sampling)  # compile
    jax.block_until_ready(tokens)
    started, dispatch = time.perf_counter(), 0.0
    for _ in range(steps):
        called = time.thread_time()
        state, tokens = _bare_step(params, state, tokens, sampling)
        dispatch += time.thread_time() - called
    jax.block_until_ready(tokens)
    rate = batch * steps / (time.perf_counter() - started)
    return {"tokens_per_s": rate, "dispatch_ms_per_step": dispatch / steps * 1e3}


def measure(params, tokenizer, batch: int, args) -> dict:
    texts = prompts(tokenizer, batch, args.prompt_tokens)
    engine = build_engine(
        params,
        max_num_seqs=batch,
        max_model_len=args.prompt_tokens + args.new_tokens,
        page_size=PAGE_SIZE,
        num_pages=batch * -(-(args.prompt_tokens + args.new_tokens) // PAGE_SIZE),
        max_num_batched_tokens=batch + args.prompt_budget,
        max_prefill_rows=args.prompt_budget // PAGE_SIZE,  # the default (512 tokens) leaves 512 no decode window
        prefix_caching=False,
        warmup="none",
    )
    width = engine.runner.width_buckets[-1]  # the lengths stay within the last bucket: see main's check

    def requests(round_: int) -> list[Request]:
        return [
            Request(f"{round_}-{i}", prompt, args.new_tokens, stop=("\n\n\n\n\n",), ignore_eos=True)
            for i, prompt in enumerate(texts)
        ]

    run_engine(engine, requests(-1))  # compiles what the workload needs
    engine.runner.wait_for_compilations()
    run_engine(engine, requests(-2))
    engine_rows, bare_rows = [], []
    for round_ in range(args.repeats):
        engine_rows.append(run_engine(engine, requests(round_)))
        bare_rows.append(run_bare(params, batch, width, args.prompt_tokens, engine_rows[-1]["steps"]))
    engine_rate = statistics.median(r["tokens_per_s"] for r in engine_rows)
    bare_rate = statistics.median(r["tokens_per_s"] for r in bare_rows)
    # Each engine run against the bare run right after it: the machine's speed drifts between runs, and a ratio
    # of medians can pair a fast engine run with a slow bare one.
    ratios = [e["tokens_per_s"] / b["tokens_per_s"] for e, b in zip(engine_rows, bare_rows)]
    split = {
        part: statistics.median(r["split_ms_per_step"][part] for r in engine_rows)
        for part in engine_rows[0]["split_ms_per_step"]
    }
    row = {
        "batch": batch,
        "width_pages": width,
        "engine_tokens_per_s": engine_rate,
        "bare_tokens_per_s": bare_rate,
        "engine_over_bare": statistics.median(ratios),
        "engine_over_bare_runs": ratios,
        "host_ms_per_step": statistics.median(r["host_ms_per_step"] for r in engine_rows),
        "host_wall_ms_per_step": statistics.median(r["host_wall_ms_per_step"] for r in engine_rows),
        "bare_dispatch_ms_per_step": statistics.median(r["dispatch_ms_per_step"] for r in bare_rows),
        "split_ms_per_step": split,
        "window_steps": [r["steps"] for r in engine_rows],
        "engine_runs": engine_rows,
        "bare_runs": bare_rows,
    }
    print(
        f"batch {batch}: engine {engine_rate:.0f} tok/s, bare {bare_rate:.0f} tok/s ({row['engine_over_bare']:.3f}x), "
        f"host {row['host_ms_per_step']:.2f} ms/step CPU ({row['host_wall_ms_per_step']:.2f} wall)",
        flush=True,
    )
    return row


def markdown(result: dict) -> str:
    lines = [
        f"Engine overhead on {result['device']} ({result['cpu_count']} CPUs, load {result['load_average_start']}): "
        f"tiny random Llama ({result['model']}) with SmolLM2's tokenizer, prompts of {result['prompt_tokens']} tokens, "
        f"{result['new_tokens']} new tokens, medians of {result['repeats']} alternating runs (engine / bare: the "
        "median of each engine run over the bare run after it)",
        "",
        "Host ms per step: the engine thread's CPU time (wall time in brackets: on a CPU device it stretches while the",
        "step computes on the same cores); wait: wall time blocked on the device for the previous step's tokens;",
        "bare dispatch: the CPU time of the bare loop's calls of its compiled step (XLA's own, in prepare too).",
        "",
        "| sequences | engine tok/s | bare loop tok/s | engine / bare | host ms/step | schedule | prepare | outputs "
        "| wait | bare dispatch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        split = row["split_ms_per_step"]
        cells = [f"{split[p + '_cpu']:.2f} ({split[p]:.2f})" for p in ("schedule", "prepare", "outputs")]
        lines.append(
            f"| {row['batch']} | {row['engine_tokens_per_s']:.0f} | {row['bare_tokens_per_s']:.0f} | "
            f"{row['engine_over_bare']:.3f} | {row['host_ms_per_step']:.2f} ({row['host_wall_ms_per_step']:.2f}) | "
            f"{' | '.join(cells)} | {split['wait']:.2f} | {row['bare_dispatch_ms_per_step']:.2f} |"
        )
    goals = result["goals"]
    lines += ["", f"Goals at {GOAL_BATCH}: engine/bare ≥ {GOAL_RATIO}: {goals['ratio_met']}; "
              f"host ≤ {GOAL_HOST_MS} ms/step: {goals['host_met']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--prompt-tokens", type=int, default=140)
    parser.add_argument("--new-tokens", type=int, default=112)
    parser.add_argument("--prompt-budget", type=int, default=2048, help="prompt tokens per step beside the decodes")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    first, last = args.prompt_tokens // PAGE_SIZE + 1, -(-(args.prompt_tokens + args.new_tokens) // PAGE_SIZE)
    if 1 << (first - 1).bit_length() != 1 << (last - 1).bit_length():
        parser.error("prompt and new tokens must keep every length in one power-of-two bucket of pages")
    load = os.getloadavg()
    tokenizer = qoq_jax.load("smollm2").tokenizer
    params = tiny_model(tokenizer, args)
    rows = [measure(params, tokenizer, batch, args) for batch in args.batches]
    at_goal = next((r for r in rows if r["batch"] == GOAL_BATCH), None)
    device = jax.devices()[0]
    result = {
        "benchmark": "engine_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine() if device.platform == "cpu" else device.device_kind,
        "platform": device.platform,
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "load_average_start": [round(x, 2) for x in load],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "model": f"hidden {args.hidden}, {args.layers} layers, vocab {len(tokenizer)}, float32",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "page_size": PAGE_SIZE,
        "repeats": args.repeats,
        "rows": rows,
        "goals": {
            "ratio_met": None if at_goal is None else at_goal["engine_over_bare"] >= GOAL_RATIO,
            "host_met": None if at_goal is None else at_goal["host_ms_per_step"] <= GOAL_HOST_MS,
        },
    }
    out = args.out or REPO / "benchmarks" / "results" / f"engine-overhead-{device.platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
