"""QoQ on every model family, as a sanity check of the whole pipeline per family: a tiny model of each (the test
suite's quantizable shapes, made from transformers' own config classes and imported from the directory it saves)
is trained on the first 85% of the GPL text, then quantized (RTN and QoQ, W4A8KV4 g128) with calibration windows
of that same training text, and its perplexity measured on the held-out last 15% and on the first 15% (seen in
training: how much of what the model memorized each format keeps).

    python benchmarks/families.py                        # every family, 300 AdamW steps of 8 × 128 tokens
    python benchmarks/families.py --families qwen3 gemma2 --steps 200
    python benchmarks/families.py --families qwen3 --seeds 0 1 2 --ablations --out /tmp/qwen3.json

`--seeds` trains, calibrates and measures each family once per seed (a held-out perplexity of these overfit
models moves by a few percent with the seed alone); `--ablations` adds rows of QoQ g128 with one stage off
(its KV stages count as one), to find which stage a family's result owes to.

Training runs our own model (its float forward matches transformers to ~1e-6, tests/test_families.py) as one
compiled step with optax: on a shared 2-core CPU, transformers' eager training is ~10× slower. Writes
benchmarks/results/families-<device>.json and a markdown table beside it. A random tiny model would give every
method the same near-uniform perplexity; a trained one has something to lose, so QoQ < RTN is a real check.
These are CPU figures of 0.5M-parameter models: they say the per-family transforms and formats work, not what
quantization costs a real model of the family.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import qoq_jax  # noqa: E402
from converters.qoq import RECIPES, quantize_model  # noqa: E402
from qoq_jax.kv_cache import NoKVCache  # noqa: E402
from tiny_models import build_hf_model, save_hf_model, tiny_tokenizer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "gpl-3.0.txt"
FAMILIES = {  # family → the tiny model of tests/tiny_models.py (hidden 128, MLP 256, 2 layers, 4 heads of 32)
    "llama": "llama_quantizable",
    "qwen3": "qwen3_quantizable",
    "gemma2": "gemma2_quantizable",
    "gemma3": "gemma3_quantizable",
    "phi4-mini": "phi4_mini_quantizable",
}
RECIPE_ROWS = ("rtn-w4a8kv4-g128", "g128")
ABLATED_STAGES = ("rotate", "reorder", "smooth_attention", "smooth_linear", "gptq", "kv_stages")
TRAIN_FRACTION = 0.85


def train(params: qoq_jax.Params, ids: np.ndarray, *, steps: int, seq_len: int, batch: int, seed: int):
    """AdamW (cosine decay, clipped gradients) on next-token cross-entropy over random windows of `ids`; returns
    the trained Params and the mean loss of the last 50 steps."""
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(3e-3, steps)))
    state = jax.tree.map(jnp.copy, params.state)  # the step donates its state; the caller keeps `params`
    opt_state = optimizer.init(state)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(state, opt_state, windows):
        def loss(state):
            model = nnx.merge(params.graphdef, state)
            inputs, targets = windows[:, :-1], windows[:, 1:]
            positions = jnp.broadcast_to(jnp.arange(seq_len), inputs.shape)
            hidden, _ = model(inputs, positions, jnp.ones(inputs.shape, bool), NoKVCache())
            log_probs = jax.nn.log_softmax(model.logits(hidden))
            return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

        value, grads = jax.value_and_grad(loss)(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, value

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - seq_len - 1, batch)
        windows = jnp.asarray(np.stack([ids[s : s + seq_len + 1] for s in starts]), jnp.int32)
        state, opt_state, value = step(state, opt_state, windows)
        losses.append(float(value))
    return dataclasses.replace(params, state=state), float(np.mean(losses[-50:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="of the model, training and calibration")
    parser.add_argument("--ablations", action="store_true", help="also QoQ g128 with each stage off")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/families-<device>.json")
    args = parser.parse_args()

    text = args.text.read_text(encoding="utf-8")
    split = int(len(text) * TRAIN_FRACTION)
    train_text, held_out = text[:split], text[split:]
    seen = text[: len(text) - split]  # as long as the held-out part
    tokenizer = tiny_tokenizer(text)
    train_ids = np.asarray(tokenizer(train_text).input_ids, np.int32)
    device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else None
    report = {
        "device": device or f"cpu ({platform.processor() or platform.machine()})",
        "jax_version": jax.__version__,
        "load_average_at_start": os.getloadavg(),
        "text": args.text.name,
        "train_tokens": int(len(train_ids)),
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "seeds": args.seeds,
        "calibration": {"samples": args.calib_samples, "seq_len": args.seq_len, "source": "the training text"},
        "rows": [],
    }
    out = args.out or RESULTS / f"families-{'cpu' if device is None else device.replace(' ', '-').lower()}.json"
    recipes = {name: RECIPES[name] for name in RECIPE_ROWS}
    if args.ablations:
        recipes |= {f"g128-no-{stage}": _without(RECIPES["g128"], stage) for stage in ABLATED_STAGES}
    for family in args.families:
        for seed in args.seeds:
            row = measure_family(family, seed, args, tokenizer, train_ids, held_out, seen, recipes)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            _write(report, out)


def _without(recipe, stage: str):
    if stage == "kv_stages":
        return dataclasses.replace(recipe.weight_recipe(), name=f"{recipe.name}-no-{stage}")
    return dataclasses.replace(recipe, name=f"{recipe.name}-no-{stage}", **{stage: False})


def measure_family(family, seed, args, tokenizer, train_ids, held_out, seen, recipes) -> dict:
    """Trains the family's tiny model with `seed`, quantizes it with each recipe (calibration windows drawn with
    the same seed) and measures every perplexity."""
    name = FAMILIES[family]
    starts = np.random.default_rng(seed).integers(0, len(train_ids) - args.seq_len, args.calib_samples)
    calibration = np.stack([train_ids[s : s + args.seq_len] for s in starts])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        save_hf_model(build_hf_model(name, seed=seed), Path(directory))
        tokenizer.save_pretrained(directory)
        initial = qoq_jax.load(directory, dtype="float32")
    params, train_loss = train(initial, train_ids, steps=args.steps, seq_len=args.seq_len, batch=args.batch, seed=seed)
    row = {
        "family": family,
        "seed": seed,
        "model": name,
        "architecture": params.config.architecture,
        "train_loss": round(train_loss, 4),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    for method in ("fp", *recipes):
        started = time.perf_counter()
        model = params
        if method != "fp":
            model, _ = quantize_model(params, recipes[method], calibration, progress=False)
        for split_name, split_text in (("", held_out), ("seen_", seen)):
            ppl = qoq_jax.perplexity(model, split_text, seq_len=args.seq_len).perplexity
            row[f"ppl_{split_name}{method}"] = round(ppl, 4)
        row[f"seconds_{method}"] = round(time.perf_counter() - started, 1)
    row["qoq_better_than_rtn"] = all(
        row[f"ppl_{split}g128"] < row[f"ppl_{split}rtn-w4a8kv4-g128"] for split in ("", "seen_")
    )
    return row


def _write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# QoQ per model family: tiny trained models ({report['device']}, jax {report['jax_version']})",
        "",
        f"Each model trained {report['steps']} steps of {report['batch']} × {report['seq_len']} tokens on the first "
        f"{int(100 * TRAIN_FRACTION)}% of {report['text']} ({report['train_tokens']} tokens of a 300-token BPE), "
        f"calibrated on {report['calibration']['samples']} × "
        f"{report['calibration']['seq_len']} tokens of that text, perplexity @{report['seq_len']} on the held-out "
        "rest and on as much text the model was trained on (float32; quantized models attend over their KV4 round "
        "trip). In brackets: change against FP.",
        "",
        "| family | seed | architecture | text | FP | RTN W4A8KV4 g128 | QoQ W4A8KV4 g128 | QoQ < RTN |",
        "|---|---:|---|---|---|---|---|---|",
    ]
    ablations = [key[4:] for key in report["rows"][0] if key.startswith("ppl_g128-no-")]
    for row in report["rows"]:
        for split_name, label in (("", "held out"), ("seen_", "trained on")):
            fp = row[f"ppl_{split_name}fp"]
            values = [row[f"ppl_{split_name}{r}"] for r in RECIPE_ROWS]
            verdict = "yes" if values[1] < values[0] else "**no**"
            start = f"| {row['family']} | {row['seed']} | {row['architecture']} | {label} | {fp:.3f} | "
            lines.append(start + " | ".join(_change(value, fp) for value in values) + f" | {verdict} |")
    if ablations:
        lines += ["", "QoQ g128 with one stage off (change against FP):", "",
                  "| family | seed | text | QoQ g128 | " + " | ".join(a.replace("g128-", "") for a in ablations) + " |",
                  "|---|---:|---|---|" + "---|" * len(ablations)]  # fmt: skip
        for row in report["rows"]:
            for split_name, label in (("", "held out"), ("seen_", "trained on")):
                fp = row[f"ppl_{split_name}fp"]
                cells = [_change(row[f"ppl_{split_name}{r}"], fp) for r in ("g128", *ablations)]
                lines.append(f"| {row['family']} | {row['seed']} | {label} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _change(value: float, fp: float) -> str:
    return f"{value:.3f} ({100 * (value / fp - 1):+.1f}%)"


if __name__ == "__main__":
    main()
