"""The `qoq-jax` command line: `qoq-jax generate --model smollm2 "The capital of France is"`."""

from __future__ import annotations

import argparse
import sys
import time

import qoq_jax
from qoq_jax.errors import QoQError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qoq-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands.add_parser("generate", help="generate text from prompts and report tokens/s"))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except QoQError as err:
        print(f"qoq-jax: error: {err}", file=sys.stderr)
        return 2


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", help="one or more prompts, generated as one batch")
    parser.add_argument("--model", default="smollm2", help='"smollm2", an HF model directory or a .gguf file')
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
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
