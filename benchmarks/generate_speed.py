"""Generation speed: `qoq_jax.complete` against transformers' `generate` on the embedded SmolLM2-135M.

Both systems load the same GGUF file (SmolLM2-135M-Instruct.Q4_1, dequantized to `--dtype`), get the same
token-id prompts (slices of 32..100 tokens of a text file, tokenized with the qoq-jax tokenizer) and decode
greedily with EOS ignored, so every row produces exactly `--new-tokens` tokens. For each (system, batch) one
untimed warm-up call with the same shapes (jax compiles on it) is followed by `--repeats` timed calls, the two
systems taking turns so that slow phases of a shared machine hit both; the reported figure is
batch * new_tokens / median wall-clock seconds. The greedy outputs of the two systems are
compared row by row (identical rows, mean common-prefix length) as context, not as a pass/fail check.

Run from the repository root:

    python benchmarks/generate_speed.py                 # batches 1 and 8, 128 new tokens, 3 repeats
    python benchmarks/generate_speed.py --smoke         # batch 1, 8 new tokens, 1 repeat
    python benchmarks/generate_speed.py --dtype bfloat16 --batches 1 8 16 --repeats 5

Writes benchmarks/results/generate-speed-<device>.json (…-smoke.json with --smoke) and a markdown table beside it
(.md), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

import qoq_jax

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "gpl-3.0.txt"
SYSTEMS = ("qoq_jax", "hf_torch")
DTYPES = ("float32", "bfloat16", "float16")
MIN_PROMPT_TOKENS = 32
MAX_PROMPT_TOKENS = 100

Prompts = list[list[int]]
Generator = Callable[[Prompts], Prompts]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, float16 on GPU")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text the prompts are sliced from")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--smoke", action="store_true", help="batch 1, 8 new tokens, 1 repeat")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.new_tokens, args.repeats = [1], 8, 1
    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "float16"
    return args


def device_info() -> dict:
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "processor": platform.processor(),
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
    }


def cpu_model_name() -> str:
    """The "model name" line of /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_prompts(tokenizer, text: str, count: int) -> Prompts:
    """`count` slices of the tokenized text, spread over it, of lengths from 32 to 100 tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    lengths = np.linspace(MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS, count).round().astype(int)
    stride = (len(ids) - MAX_PROMPT_TOKENS) // count
    if stride < 1:
        raise SystemExit(f"the text has {len(ids)} tokens; need more than {MAX_PROMPT_TOKENS + count}")
    return [list(ids[i * stride : i * stride + int(n)]) for i, n in enumerate(lengths)]


def qoq_generator(params, new_tokens: int) -> Generator:
    def generate(prompts: Prompts) -> Prompts:
        completions = qoq_jax.complete(params, prompts, max_new_tokens=new_tokens, ignore_eos=True)
        return [c.token_ids for c in completions]

    return generate


def hf_generator(dtype: str, new_tokens: int) -> Generator:
    """transformers' greedy generate on the same GGUF, left-padded batches, EOS disabled."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from converters.importing import smollm2_path

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    pad_id = 0  # any id: padded positions are masked out
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad_id, use_cache=True
    )

    def generate(prompts: Prompts) -> Prompts:
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        return output[:, width:].tolist()

    return generate


def check_lengths(outputs: Prompts, new_tokens: int) -> None:
    lengths = sorted({len(o) for o in outputs})
    if lengths != [new_tokens]:
        raise RuntimeError(f"expected {new_tokens} new tokens per row, got lengths {lengths}")


def timed_call(generate: Generator, prompts: Prompts, new_tokens: int) -> tuple[float, Prompts]:
    start = time.perf_counter()
    outputs = generate(prompts)
    seconds = time.perf_counter() - start
    check_lengths(outputs, new_tokens)
    return seconds, outputs


def benchmark_batch(generators: dict[str, Generator], prompts: Prompts, args) -> tuple[list[dict], dict]:
    """One warm-up call per system, then `repeats` rounds that time each system once in turn.

    Alternating the systems spreads slow phases of a shared machine over both instead of one. Returns a row of
    timings per system and each system's outputs of the last round.
    """
    batch = len(prompts)
    for generate in generators.values():
        timed_call(generate, prompts, args.new_tokens)
    seconds = {system: [] for system in generators}
    outputs = {}
    for _ in range(args.repeats):
        for system, generate in generators.items():
            elapsed, outputs[system] = timed_call(generate, prompts, args.new_tokens)
            seconds[system].append(elapsed)
    rows = []
    for system, all_seconds in seconds.items():
        median = statistics.median(all_seconds)
        rows.append(
            {
                "system": system,
                "batch": batch,
                "seconds_median": median,
                "tokens_per_s": batch * args.new_tokens / median,
                "all_seconds": all_seconds,
            }
        )
        print(f"{system} batch {batch}: {rows[-1]['tokens_per_s']:.1f} tokens/s (median {median:.3f} s)", flush=True)
    return rows, outputs


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(qoq_outputs: Prompts, hf_outputs: Prompts) -> dict:
    prefixes = [common_prefix(a, b) for a, b in zip(qoq_outputs, hf_outputs)]
    return {
        "rows_identical_fraction": sum(a == b for a, b in zip(qoq_outputs, hf_outputs)) / len(prefixes),
        "mean_common_prefix": statistics.mean(prefixes),
        "common_prefix_per_row": prefixes,
    }


def speedups(rows: list[dict]) -> dict:
    speed = {(r["system"], r["batch"]): r["tokens_per_s"] for r in rows}
    return {
        str(batch): speed[("qoq_jax", batch)] / speed[("hf_torch", batch)]
        for system, batch in speed
        if system == "qoq_jax" and ("hf_torch", batch) in speed
    }


def markdown_table(result: dict) -> str:
    speed = {(r["system"], r["batch"]): r for r in result["rows"]}
    device = result["device"]
    hardware = device["cpu_model"] if device["platform"] == "cpu" else device["device_kind"]
    lines = [
        f"Generation speed, SmolLM2-135M (Q4_1 GGUF dequantized to {result['dtype']}), "
        f"{result['new_tokens']} new tokens per row, greedy, median of {result['repeats']} runs, "
        f"on {hardware} ({device['platform']}, {device['cpu_count']} CPUs; load average "
        f"{result['load_average_at_start'][0]:.1f} at start)",
        "",
        "| batch | qoq_jax tokens/s | hf_torch tokens/s | speedup qoq/torch | rows identical | mean common prefix |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in result["batches"]:
        qoq, hf = speed.get(("qoq_jax", batch)), speed.get(("hf_torch", batch))
        agree = result["agreement"].get(str(batch))
        cells = [
            str(batch),
            f"{qoq['tokens_per_s']:.1f}" if qoq else "-",
            f"{hf['tokens_per_s']:.1f}" if hf else "-",
            f"{result['speedup_qoq_over_torch'][str(batch)]:.2f}x" if qoq and hf else "-",
            f"{agree['rows_identical_fraction']:.2f}" if agree else "-",
            f"{agree['mean_common_prefix']:.1f}" if agree else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for system, reason in result["missing_systems"].items():
        lines += ["", f"{system} missing: {reason}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    load_average = os.getloadavg()  # other work on the machine slows both systems alike, but say how much
    params = qoq_jax.load("smollm2", dtype=args.dtype)
    prompts = make_prompts(params.tokenizer, args.text.read_text(), max(args.batches))
    print(f"prompt lengths: {[len(p) for p in prompts]}", flush=True)

    generators, missing = {}, {}
    if "qoq_jax" in args.systems:
        generators["qoq_jax"] = qoq_generator(params, args.new_tokens)
    if "hf_torch" in args.systems:
        try:
            generators["hf_torch"] = hf_generator(args.dtype, args.new_tokens)
        except Exception as err:  # report the qoq_jax rows even when torch/transformers cannot load the model
            missing["hf_torch"] = f"{type(err).__name__}: {err}"
            print(f"hf_torch skipped: {missing['hf_torch']}", flush=True)

    rows, outputs = [], {}
    for batch in args.batches:
        batch_rows, outputs[batch] = benchmark_batch(generators, prompts[:batch], args)
        rows += batch_rows

    result = {
        "device": device_info(),
        "load_average_at_start": load_average,
        "jax_version": jax.__version__,
        "torch_version": package_version("torch"),
        "transformers_version": package_version("transformers"),
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "batches": args.batches,
        "prompt_lengths": [len(p) for p in prompts],
        "rows": rows,
        "speedup_qoq_over_torch": speedups(rows),
        "agreement": {
            str(batch): agreement(outputs[batch]["qoq_jax"], outputs[batch]["hf_torch"])
            for batch in args.batches
            if len(generators) == 2
        },
        "missing_systems": missing,
    }
    write_results(result, args.out_dir)


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_results(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-smoke" if result["smoke"] else ""
    stem = out_dir / f"generate-speed-{slug(result['device']['device_kind'])}{suffix}"
    table = markdown_table(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    print()
    print(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
