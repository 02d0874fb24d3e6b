"""HTTP overhead: `qoq-jax serve` under N concurrent streaming clients against the same engine driven in-process.

The engine's own throughput is what `Engine.step()` delivers on the requests of `benchmarks/serve_load.py` (the
same prompts, tokenized as the server does, the same max_tokens, ignore_eos, the server's default sampling of
temperature 1), all added at once: output tokens / time from the first request to the last token. The served
throughput is serve_load's own figure for the same requests against `qoq-jax serve` with the same engine options
(the server tokenizes, streams server-sent events and runs its event loop beside the engine thread). Each side
runs the workload once untimed first (its step programs compile), then `--rounds` timed runs, alternating.
Goal: served ≥ 0.8× the engine's own throughput with 256 clients.

    python benchmarks/http_overhead.py --clients 256

Writes benchmarks/results/http-overhead-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import serve_load  # noqa: E402
from vllm_side_by_side import free_port, server, wait_for_compilations  # noqa: E402

GOAL = 0.8


def load_args(args, url: str, out: Path) -> list[str]:
    return [url, "--model", "smollm2", "--request-rate", "inf", "--num-requests", str(args.clients),
            "--prompt-len", str(args.prompt_words), str(args.prompt_words),
            "--output-len", str(args.output_tokens), str(args.output_tokens), "--seed", "0", "--warmup", "0",
            "--timeout", "3600", "--out", str(out)]  # fmt: skip


def engine_options(args) -> dict:
    return dict(max_num_seqs=args.clients, max_model_len=args.max_model_len)


def run_engine(args) -> list[dict]:
    """The engine in this process on serve_load's requests: an untimed run, then `rounds` timed ones."""
    import qoq_jax
    from qoq_jax.sampling import SamplingParams
    from serve.engine import build_engine
    from serve.request import Request

    params = qoq_jax.load(args.model, dtype=args.dtype)
    engine = build_engine(params, **engine_options(args))
    spec_args = serve_load.parse_args(load_args(args, "http://unused", Path("unused")))
    words, _ = serve_load.load_words(spec_args.corpus)
    specs = serve_load.make_requests(spec_args, words, args.clients, spec_args.seed)
    prompts = [tuple(params.tokenizer(spec.prompt).input_ids) for spec in specs]
    runs = []
    for round_ in range(args.rounds + 1):
        started, load = time.perf_counter(), os.getloadavg()
        for i, (prompt, spec) in enumerate(zip(prompts, specs)):
            sampling = SamplingParams(temperature=1.0, seed=i)
            engine.add_request(Request(f"{round_}-{i}", prompt, spec.max_tokens, sampling, ignore_eos=True))
        generated = engine.stats().generation_tokens_total
        while engine.has_work():
            engine.step()
        seconds = time.perf_counter() - started
        tokens = engine.stats().generation_tokens_total - generated
        if round_ == 0:
            engine.runner.wait_for_compilations()
            continue
        runs.append({"output_tokens_per_s": tokens / seconds, "seconds": seconds, "load_average_start": load})
        print(f"engine: {tokens / seconds:.1f} output tok/s", file=sys.stderr, flush=True)
    return runs


def run_http(args) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "serve.cli", "serve", "--model", args.model, "--dtype", args.dtype,
               "--port", str(port), "--served-model-name", "smollm2", "--max-num-seqs", str(args.clients),
               "--max-model-len", str(args.max_model_len)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = []
    logs = Path(tempfile.mkdtemp(prefix="http-overhead-"))
    with server(command, env, url, logs / "server.log", timeout=3600):
        for round_ in range(args.rounds + 1):
            out = logs / f"load-{round_}.json"
            load = os.getloadavg()
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), *load_args(args, url, out)],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            summary = serve_load.read_summary(out)
            if round_ == 0:
                wait_for_compilations(url)
                continue
            runs.append({"output_tokens_per_s": summary["output_token_throughput"], "summary": summary,
                         "load_average_start": load})  # fmt: skip
            print(f"http: {summary['output_token_throughput']:.1f} output tok/s", file=sys.stderr, flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import jax

    device = jax.devices()[0]
    load = os.getloadavg()
    engine_runs = run_engine(args)
    http_runs = run_http(args)
    engine_rate = statistics.median(r["output_tokens_per_s"] for r in engine_runs)
    http_rate = statistics.median(r["output_tokens_per_s"] for r in http_runs)
    result = {
        "benchmark": "http_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine() if device.platform == "cpu" else device.device_kind,
        "cpu_count": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load],
        "model": args.model,
        "dtype": args.dtype,
        "clients": args.clients,
        "prompt_words": args.prompt_words,
        "output_tokens": args.output_tokens,
        "engine_output_tokens_per_s": engine_rate,
        "http_output_tokens_per_s": http_rate,
        "http_over_engine": http_rate / engine_rate,
        "goal": {"ratio": GOAL, "met": http_rate / engine_rate >= GOAL},
        "engine_runs": engine_runs,
        "http_runs": http_runs,
    }
    out = args.out or REPO / "benchmarks" / "results" / f"http-overhead-{device.platform}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = (
        f"HTTP overhead on {result['device']} ({result['cpu_count']} CPUs, load {result['load_average_start']}): "
        f"{args.model} {args.dtype}, {args.clients} streaming clients at once, {args.prompt_words}-word prompts, "
        f"{args.output_tokens} output tokens, medians of {args.rounds}\n\n"
        "| engine in-process tok/s | served over HTTP tok/s | served / engine | goal ≥ 0.8 |\n|---:|---:|---:|---|\n"
        f"| {engine_rate:.1f} | {http_rate:.1f} | {http_rate / engine_rate:.3f} | {result['goal']['met']} |\n"
    )
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
