"""Perplexity of SmolLM2 (or any model) under every quantization recipe, QoQ ablation and KV4 option, in one run.

    python benchmarks/accuracy.py                      # SmolLM2: the committed table
    python benchmarks/accuracy.py --only fp g128 gchn  # a subset, replacing those rows in the file

Texts: `../shared/data/gpl-3.0.txt` at 512 and 2048 tokens (the goal's text; only 3 chunks of 2048) and
`benchmarks/data/licenses.txt` at 2048 (15 chunks: Apache-2.0, Artistic, BSD, CC0-1.0, GFDL-1.3, GPL-2,
LGPL-2.1, LGPL-3, MPL-1.1 and MPL-2.0 as Debian's base-files ships them in /usr/share/common-licenses,
concatenated in that order with two newlines after each). Calibration: 16 × 512 tokens of CPython's bundled
documentation (`pydoc`), disjoint from both texts.

Writes benchmarks/results/accuracy-<model>.json (rewritten after every row, so a long run keeps what it has)
and a markdown table beside it. Every row records its calibration, texts and the code's git commit, so rows
from different runs are visible as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import qoq_jax
from converters.calibration_data import calibration_tokens
from converters.qoq import RECIPES, Recipe, calibrate_kv, quantize_model
from qoq_jax.kv_cache import kv_bytes_per_token

RESULTS = Path(__file__).parent / "results"
GPL_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpl-3.0.txt"
LONG_TEXT = Path(__file__).parent / "data" / "licenses.txt"
CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN = 16, 512
_KV_BUDGET_DTYPE = jnp.bfloat16  # KV16 rows are counted as served (bf16), whatever dtype the CPU run uses

_QSERVE = RECIPES["g128-qserve"]
_KV_OPTIONS = {  # row → (what it adds to the reference g128 recipe, the recipe fields)
    "g128-center": ("centred keys", {"center_keys": True}),
    "g128-rotate-qk": ("rotated q/k", {"rotate_qk": True}),
    "g128-center-rotate": ("centred + rotated q/k", {"center_keys": True, "rotate_qk": True}),
    "g128-kv-clip": ("centred + rotated, KV clip search", {"center_keys": True, "rotate_qk": True,
                                                            "kv_clip_search": True}),
    "g128-smooth-search": ("centred + rotated, α search", {"center_keys": True, "rotate_qk": True,
                                                            "smooth_attention_search": True}),
    "g128-learn-qk": ("centred + rotated + learned q/k", {"center_keys": True, "rotate_qk": True,
                                                          "learn_qk": True}),
    "g128-range-search": ("per-token KV range search", {"kv_range_search": True}),
}

ROWS: dict[str, tuple[str, str, Recipe | None]] = {  # name → (method, precision, recipe or None for the float model)
    "fp": ("FP", "float (the model dtype)", None),
    "rtn-w8a8": ("RTN", "W8A8 (KV16)", RECIPES["rtn-w8a8"]),
    "rtn-w4a16-g128": ("RTN", "W4A16 g128", RECIPES["rtn-w4a16-g128"]),
    "gptq-w4a16-g128": ("GPTQ", "W4A16 g128", RECIPES["gptq-w4a16-g128"]),
    "rtn-w4a16-progressive": ("RTN", "W4A16 g128, QoQ's progressive format", RECIPES["rtn-w4a16-progressive"]),
    "rtn-w4a8kv4-g128": ("RTN", "W4A8KV4 g128", RECIPES["rtn-w4a8kv4-g128"]),
    "g128": ("QoQ (this library's default)", "W4A8KV4 g128", RECIPES["g128"]),
    "g128-thorough": ("QoQ, longer q/k training", "W4A8KV4 g128", RECIPES["g128-thorough"]),
    "g128-qserve": ("QoQ as QServe", "W4A8KV4 g128", _QSERVE),
    "gchn": ("QoQ", "W4A8KV4 per-channel", RECIPES["gchn"]),
    **{
        f"g128-no-{stage}": (
            f"QoQ as QServe without {stage}", "W4A8KV4 g128", dataclasses.replace(_QSERVE, **{stage: False})
        )
        for stage in ("rotate", "smooth_attention", "smooth_linear", "gptq", "reorder")
    },
    **{
        name: (f"QoQ as QServe + {what}", "W4A8KV4 g128", dataclasses.replace(_QSERVE, name=name, **fields))
        for name, (what, fields) in _KV_OPTIONS.items()
    },
    "g128-kv8-layers": (
        "QoQ default + KV8 in the 3 worst layers", "W4A8 g128, mixed KV4/KV8",
        dataclasses.replace(RECIPES["g128"], name="g128-kv8-layers", kv8_layers=3),
    ),
    "g128-clip-not-range": (
        "QoQ default with the per-layer KV clip search instead of the range search", "W4A8KV4 g128",
        dataclasses.replace(RECIPES["g128"], name="g128-clip-not-range", kv_clip_search=True, kv_range_search=False),
    ),
    "g128-kv-clip-search": (
        "QoQ default + per-layer KV clip search", "W4A8KV4 g128",
        dataclasses.replace(RECIPES["g128"], name="g128-kv-clip-search", kv_clip_search=True),
    ),
    "g128-kv8": ("QoQ as QServe", "W4A8KV8 g128", dataclasses.replace(_QSERVE, name="g128-kv8", kv_bits=8)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", type=Path, default=GPL_TEXT)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--long-text", type=Path, default=LONG_TEXT, help="a second, longer text")
    parser.add_argument("--long-seq-lens", type=int, nargs="*", default=[2048])
    parser.add_argument("--calib", nargs="+", default=["pydoc"])
    parser.add_argument("--samples", type=int, default=CALIBRATION_SAMPLES)
    parser.add_argument("--calib-seq-len", type=int, default=CALIBRATION_SEQ_LEN)
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--only", nargs="+", choices=sorted(ROWS), default=None, help="run these rows, keeping the file's others"
    )
    args = parser.parse_args()

    params = qoq_jax.load(args.model, dtype=args.dtype)
    tokens = calibration_tokens(params.tokenizer, args.calib, num_samples=args.samples, seq_len=args.calib_seq_len)
    evaluations = [(args.text, n) for n in args.seq_lens] + [(args.long_text, n) for n in args.long_seq_lens]
    evaluations = [(path, n) for path, n in evaluations if n <= params.config.max_context]
    texts = {path: path.read_text(encoding="utf-8") for path, _ in evaluations}
    name = Path(str(args.model)).stem.lower()
    run = {
        "calibration": {"source": args.calib, "samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])},
        "texts": {path.name: hashlib.sha256(text.encode()).hexdigest()[:16] for path, text in texts.items()},
        "commit": _commit(),
    }
    report = {
        "device": jax.devices()[0].device_kind
        if jax.default_backend() != "cpu"
        else f"cpu ({platform.processor() or platform.machine()})",
        "jax_version": jax.__version__,
        "model": str(args.model),
        "dtype": params.dtype.name,
        "evaluations": [f"{path.name}@{n}" for path, n in evaluations],
        "rows": [],
    }
    existing = RESULTS / f"accuracy-{name}.json"
    if args.only and existing.is_file():
        report["rows"] = [r for r in json.loads(existing.read_text())["rows"] if r["name"] not in args.only]
    weights = {}  # weight recipe → (Params, report): rows that differ only in KV stages share their weights
    for row in args.only or ROWS:
        method, precision, recipe = ROWS[row]
        if recipe is None:
            model, quantized = params, {"seconds": 0.0}
        else:
            key = dataclasses.replace(recipe.weight_recipe(), name="")
            if key not in weights:
                weights[key] = quantize_model(params, recipe.weight_recipe(), tokens)
            model, quantized = calibrate_kv(weights[key], recipe, tokens) if recipe.kv_stages else weights[key]
        entry = {
            "name": row,
            "method": method,
            "precision": precision,
            "stages": quantized.get("stages", []),
            "group_size": quantized.get("group_size"),
            "kv_bits": model.kv_bits,
            "kv_bytes_per_token": kv_bytes_per_token(model.config, model.kv_bits, _KV_BUDGET_DTYPE),
            "qk_transform_flops_per_token": _transform_flops(model),
            "quantize_seconds": quantized["seconds"],  # weights (shared or not) + KV stages, as one run of the recipe
            **run,
        }
        records = ("kv_layers", "smooth_attention", "kv_seconds")
        entry.update({key: quantized[key] for key in records if key in quantized})
        for path, seq_len in evaluations:
            started = time.perf_counter()
            result = qoq_jax.perplexity(model, texts[path], seq_len=seq_len, progress=True)
            key = f"{path.stem}@{seq_len}"
            entry[f"ppl {key}"] = round(result.perplexity, 4)
            entry[f"chunks {key}"] = result.num_chunks
            entry[f"eval_seconds {key}"] = round(time.perf_counter() - started, 1)
        report["rows"].append(entry)
        report["rows"].sort(key=lambda r: list(ROWS).index(r["name"]))
        print(json.dumps({k: v for k, v in entry.items() if k != "kv_layers"}), flush=True)
        _write(report, name)


def _transform_flops(params) -> int:
    """Extra FLOPs per token of the q/k transform: per layer k − μ, then q·A⁻ᵀ and k·A per head (2 per MAC)."""
    if params.quant is None or not params.quant.qk_transform:
        return 0
    c = params.config
    return c.num_layers * (2 * (c.num_heads + c.num_kv_heads) * c.head_dim**2 + c.num_kv_heads * c.head_dim)


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _write(report: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"accuracy-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = report["rows"]
    keys = [e.replace(".txt", "") for e in report["evaluations"]]
    fp = next((r for r in rows if r["name"] == "fp"), None)
    runs = {json.dumps([r["calibration"], r["texts"], r["commit"]]) for r in rows}
    lines = [
        f"# Perplexity of {report['model']} ({report['device']}, jax {report['jax_version']}, {report['dtype']})",
        "",
        "Non-overlapping chunks, tail dropped; quantized models attend over K/V after their KV round trip. In "
        "brackets: change against FP. KV bytes per token over all layers, K and V, codes plus fp16 scale and "
        "zero (KV16 counted at bf16). Quantize seconds are wall time on the machine named above, shared with "
        "other jobs.",
        "",
    ]
    if len(runs) == 1 and rows:
        c = rows[0]["calibration"]
        lines += [f"Every row: calibration {c['samples']} × {c['seq_len']} tokens of {', '.join(c['source'])}, "
                  f"commit {rows[0]['commit']}.", ""]
    else:
        lines += ["**Rows come from different runs** (calibration / texts / commit in the run column).", ""]
    header = "| method | precision | " + " | ".join(f"ppl {k}" for k in keys) + " | KV B/token | quantize s |"
    lines += [header + (" run |" if len(runs) > 1 else ""), "|" + "---|" * (4 + len(keys) + (len(runs) > 1))]
    for r in rows:
        cells = []
        for key in keys:
            value = r.get(f"ppl {key}")
            delta = f" ({100 * (value / fp[f'ppl {key}'] - 1):+.1f}%)" if fp and r is not fp and value else ""
            cells.append(f"{value:.3f}{delta}" if value else "–")
        precision = r["precision"]
        if r.get("group_size") and "g128" in precision and r["group_size"] != 128:
            precision = precision.replace("g128", f"g128 recipe, groups of {r['group_size']}")
        line = f"| {r['method']} | {precision} | " + " | ".join(cells) + f" | {r['kv_bytes_per_token']} | "
        line += f"{r['quantize_seconds']} |"
        if len(runs) > 1:
            c = r["calibration"]
            line += f" {c['samples']}×{c['seq_len']} {','.join(c['source'])} @{r['commit']} |"
        lines.append(line)
    (RESULTS / f"accuracy-{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
