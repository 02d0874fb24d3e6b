"""Perplexity of SmolLM2 (or any model) under every quantization recipe and QoQ ablation, in one run.

    python benchmarks/accuracy.py                      # SmolLM2 on ../shared/data/gpl-3.0.txt
    python benchmarks/accuracy.py --only fp g128 gchn  # a subset

Writes benchmarks/results/accuracy-<model>.json (rewritten after every row, so a long run keeps what it has)
and a markdown table beside it. Calibration text defaults to CPython's bundled documentation (`pydoc`), so
the evaluation text is never seen during calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import jax

import qoq_jax
from converters.calibration_data import calibration_tokens, default_calibration_size
from converters.qoq import RECIPES, quantize_model

RESULTS = Path(__file__).parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpl-3.0.txt"

ROWS = {  # name → (method, precision, recipe or None for the float model)
    "fp": ("FP", "float (the model dtype)", None),
    "rtn-w8a8": ("RTN", "W8A8 (KV16)", RECIPES["rtn-w8a8"]),
    "rtn-w4a16-g128": ("RTN", "W4A16 g128", RECIPES["rtn-w4a16-g128"]),
    "gptq-w4a16-g128": ("GPTQ", "W4A16 g128", RECIPES["gptq-w4a16-g128"]),
    "rtn-w4a16-progressive": ("RTN", "W4A16 g128, QoQ's progressive format", RECIPES["rtn-w4a16-progressive"]),
    "rtn-w4a8kv4-g128": ("RTN", "W4A8KV4 g128", RECIPES["rtn-w4a8kv4-g128"]),
    "g128": ("QoQ", "W4A8KV4 g128", RECIPES["g128"]),
    "gchn": ("QoQ", "W4A8KV4 per-channel", RECIPES["gchn"]),
    **{
        f"g128-no-{stage}": (
            f"QoQ without {stage}",
            "W4A8KV4 g128",
            dataclasses.replace(RECIPES["g128"], **{stage: False}),
        )
        for stage in ("rotate", "smooth_attention", "smooth_linear", "gptq", "reorder")
    },
    "g128-kv8": ("QoQ", "W4A8KV8 g128", dataclasses.replace(RECIPES["g128"], kv_bits=8)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--calib", nargs="+", default=["pydoc"])
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--calib-seq-len", type=int, default=None)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--only", nargs="+", choices=sorted(ROWS), default=None, help="run these rows, keeping the file's others"
    )
    args = parser.parse_args()

    params = qoq_jax.load(args.model, dtype=args.dtype)
    text = args.text.read_text(encoding="utf-8")
    default_samples, default_len = default_calibration_size()
    tokens = calibration_tokens(
        params.tokenizer,
        args.calib,
        num_samples=args.samples or default_samples,
        seq_len=args.calib_seq_len or default_len,
    )
    seq_lens = [n for n in args.seq_lens if n <= params.config.max_context]
    name = Path(str(args.model)).stem.lower()
    report = {
        "device": jax.devices()[0].device_kind
        if jax.default_backend() != "cpu"
        else f"cpu ({platform.processor() or platform.machine()})",
        "jax_version": jax.__version__,
        "model": str(args.model),
        "dtype": params.dtype.name,
        "text": args.text.name,
        "calibration": {"source": args.calib, "samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])},
        "rows": [],
    }
    existing = RESULTS / f"accuracy-{name}.json"
    if args.only and existing.is_file():
        report["rows"] = [r for r in json.loads(existing.read_text())["rows"] if r["name"] not in args.only]
    for row in args.only or ROWS:
        method, precision, recipe = ROWS[row]
        started = time.perf_counter()
        model, quantized = (params, {}) if recipe is None else quantize_model(params, recipe, tokens)
        seconds = time.perf_counter() - started
        entry = {
            "name": row,
            "method": method,
            "precision": precision,
            "group_size": quantized.get("group_size"),
            "quantize_seconds": round(seconds, 1),
        }
        for seq_len in seq_lens:
            result = qoq_jax.perplexity(model, text, seq_len=seq_len, progress=True)
            entry[f"ppl_{seq_len}"] = round(result.perplexity, 4)
            entry[f"chunks_{seq_len}"] = result.num_chunks
        report["rows"].append(entry)
        report["rows"].sort(key=lambda r: list(ROWS).index(r["name"]))
        print(json.dumps(entry), flush=True)
        _write(report, seq_lens, name)


def _write(report: dict, seq_lens: list[int], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"accuracy-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = report["rows"]
    fp = next((r for r in rows if r["name"] == "fp"), None)
    header = "| method | precision | " + " | ".join(f"ppl @{n}" for n in seq_lens) + " | quantize s |"
    lines = [
        f"# Perplexity of {report['model']} on {report['text']} ({report['device']}, jax {report['jax_version']}, "
        f"{report['dtype']})",
        "",
        f"Calibration: {report['calibration']['samples']} × {report['calibration']['seq_len']} tokens of "
        f"{', '.join(report['calibration']['source'])}. Non-overlapping chunks, tail dropped; "
        "quantized models attend over K/V after their KV round trip. In brackets: change against FP. "
        "Quantize seconds are wall time on the machine named above, shared with other jobs.",
        "",
        header,
        "|" + "---|" * (3 + len(seq_lens)),
    ]
    for r in rows:
        cells = []
        for n in seq_lens:
            value = r.get(f"ppl_{n}")
            delta = f" ({100 * (value / fp[f'ppl_{n}'] - 1):+.1f}%)" if fp and r is not fp and value else ""
            cells.append(f"{value:.3f}{delta}" if value else "–")
        precision = r["precision"]
        if r.get("group_size") and "g128" in precision and r["group_size"] != 128:
            precision = precision.replace("g128", f"g128 recipe, groups of {r['group_size']}")
        lines.append(f"| {r['method']} | {precision} | " + " | ".join(cells) + f" | {r['quantize_seconds']} |")
    (RESULTS / f"accuracy-{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
