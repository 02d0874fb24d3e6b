"""The `qoq-jax` command line.

    qoq-jax quantize --model smollm2 --recipe g128 --output smollm2-g128
    qoq-jax generate --model smollm2-g128 "The capital of France is"
    qoq-jax eval --model smollm2-g128 --text ../shared/data/gpl-3.0.txt --seq-len 512
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import qoq_jax
from qoq_jax.params import DTYPES
from qoq_jax.errors import QoQError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qoq-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands.add_parser("generate", help="generate text from prompts and report tokens/s"))
    _add_quantize(commands.add_parser("quantize", help="calibrate a model with QoQ and save a quantized checkpoint"))
    _add_eval(commands.add_parser("eval", help="perplexity on a text file (non-overlapping chunks)"))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (QoQError, ValueError) as err:
        print(f"qoq-jax: error: {err}", file=sys.stderr)
        return 2


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    from converters.calibration_data import CPU_SAMPLES, CPU_SEQ_LEN, RECIPE_SAMPLES, RECIPE_SEQ_LEN
    from converters.qoq import RECIPES

    parser.add_argument("--model", default="smollm2", help='"smollm2", an HF model directory or a .gguf file')
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="g128")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument(
        "--calib",
        nargs="+",
        default=["pydoc"],
        help="calibration text files, or pydoc (CPython's bundled documentation, offline), pileval, wikitext",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"calibration samples (default {RECIPE_SAMPLES} on GPU as the recipe, {CPU_SAMPLES} on CPU)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help=f"tokens per sample (default {RECIPE_SEQ_LEN} GPU, {CPU_SEQ_LEN} CPU)"
    )
    parser.add_argument("--group-size", type=int, choices=[64, 128], default=None, help="g128 group (default: auto)")
    parser.add_argument("--kv-bits", type=int, choices=[4, 8, 16], default=None, help="KV cache bits (default: recipe)")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration samples per jitted pass")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint (atomically)")
    parser.set_defaults(run=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from converters.calibration_data import calibration_tokens, default_calibration_size
    from converters.qoq import RECIPES, quantize_model

    recipe = RECIPES[args.recipe]
    overrides = {"group_size": args.group_size, "kv_bits": args.kv_bits}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    params = qoq_jax.load(args.model, dtype=args.dtype)
    if params.tokenizer is None:
        raise qoq_jax.UnsupportedModelError(f"{args.model} has no tokenizer to encode the calibration text with")
    samples, seq_len = default_calibration_size()
    tokens = calibration_tokens(
        params.tokenizer, args.calib, num_samples=args.samples or samples, seq_len=args.seq_len or seq_len
    )
    quantized, report = quantize_model(params, recipe, tokens, batch_size=args.batch_size)
    report["calibration"]["source"] = list(args.calib)
    report["source_model"] = str(args.model)
    path = qoq_jax.save_checkpoint(quantized, args.output, recipe=report, overwrite=args.overwrite)
    print(
        f"[{recipe.name}: {report['calibration']['samples']}×{report['calibration']['seq_len']} calibration tokens, "
        f"{report['seconds']:.0f} s; checkpoint written to {path}]",
        file=sys.stderr,
    )
    return 0


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="checkpoint dir, HF dir, .gguf or smollm2")
    parser.add_argument("--text", required=True, help="UTF-8 text file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    params = qoq_jax.load(args.model, dtype=args.dtype)
    text = Path(args.text).read_text(encoding="utf-8")
    result = qoq_jax.perplexity(params, text, seq_len=args.seq_len, batch_size=args.batch_size, progress=True)
    print(f"perplexity {result.perplexity:.4f}")
    print(
        f"[{args.model}: {result.num_chunks} chunks of {result.seq_len} tokens from {result.num_tokens}, "
        f"{params.dtype.name}, {'float' if params.quant is None else params.quant.weights + f' KV{params.kv_bits}'}]",
        file=sys.stderr,
    )
    return 0


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", help="one or more prompts, generated as one batch")
    parser.add_argument("--model", default="smollm2", help='"smollm2", an HF model directory or a .gguf file')
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed compile run (tokens/s then includes compilation)"
    )
    parser.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    params = qoq_jax.load(args.model, dtype=args.dtype)
    load_seconds = time.perf_counter() - started
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
    )
    if not args.no_warmup:
        qoq_jax.complete(params, args.prompts, **options)
    started = time.perf_counter()
    completions = qoq_jax.complete(params, args.prompts, **options)
    seconds = time.perf_counter() - started
    for prompt, completion in zip(args.prompts, completions):
        print(f"{prompt}{completion.text}")
        print()
    new_tokens = sum(len(c.token_ids) for c in completions)
    compiled = "" if args.no_warmup else ", compiled beforehand"
    print(
        f"[{new_tokens} tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s; batch {len(completions)}, "
        f"{params.dtype.name}, {args.model} loaded in {load_seconds:.1f} s{compiled}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
