"""The `qoq-jax` command line.

    qoq-jax quantize --model smollm2 --recipe g128 --output smollm2-g128
    qoq-jax generate --model smollm2-g128 "The capital of France is"
    qoq-jax eval --model smollm2-g128 --text ../shared/data/gpl-3.0.txt --seq-len 512
    qoq-jax serve --model smollm2-g128 --port 8000
    qoq-jax serve --model smollm2-g128 --tensor-parallel 2 --data-parallel 4

--tensor-parallel N splits the model over N devices; serve's --data-parallel M runs M independent replicas of it,
each on its own N devices, and sends each request to the least loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jax.sharding import Mesh

import qoq_jax
from qoq_jax.errors import QoQError
from qoq_jax.params import DTYPES, Params, shard_params
from qoq_jax.sharding import make_mesh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qoq-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands.add_parser("generate", help="generate text from prompts and report tokens/s"))
    _add_quantize(commands.add_parser("quantize", help="calibrate a model with QoQ and save a quantized checkpoint"))
    _add_eval(commands.add_parser("eval", help="perplexity on a text file (non-overlapping chunks)"))
    _add_serve(commands.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, metrics)"))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (QoQError, ValueError, OSError) as err:
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
    params = qoq_jax.load(args.model, dtype=args.dtype)
    quantized, report = _quantized(
        params,
        args.recipe,
        source=args.model,
        calib=args.calib,
        samples=args.samples,
        seq_len=args.seq_len,
        group_size=args.group_size,
        kv_bits=args.kv_bits,
        batch_size=args.batch_size,
    )
    report["source_model"] = str(args.model)
    path = qoq_jax.save_checkpoint(quantized, args.output, recipe=report, overwrite=args.overwrite)
    recipe = report["recipe"]["name"]
    print(
        f"[{recipe}: {report['calibration']['samples']}×{report['calibration']['seq_len']} calibration tokens, "
        f"{report['seconds']:.0f} s; checkpoint written to {path}]",
        file=sys.stderr,
    )
    _print_disabled_stages(report)
    return 0


def _print_disabled_stages(report: dict) -> None:
    """Calibration stages a NaN/Inf scale turned off (recorded in the checkpoint's recipe report too)."""
    for entry in report.get("disabled_stages", []):
        print(f"[warning: layer {entry['layer']}: {entry['stage']} disabled ({entry['reason']})]", file=sys.stderr)


def _quantized(
    params,
    recipe_name: str,
    *,
    source: str,
    calib=("pydoc",),
    samples: int | None = None,
    seq_len: int | None = None,
    group_size: int | None = None,
    kv_bits: int | None = None,
    batch_size: int = 4,
):
    """QoQ-quantizes imported float params with a named recipe, calibrated on `calib` texts; returns the
    quantized params and the calibration report (what `quantize` saves and `serve --recipe` serves)."""
    from converters.calibration_data import calibration_tokens, default_calibration_size
    from converters.qoq import RECIPES, quantize_model

    recipe = RECIPES[recipe_name]
    overrides = {"group_size": group_size, "kv_bits": kv_bits}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if params.tokenizer is None:
        raise qoq_jax.UnsupportedModelError(f"{source} has no tokenizer to encode the calibration text with")
    default_samples, default_seq_len = default_calibration_size()
    tokens = calibration_tokens(
        params.tokenizer, list(calib), num_samples=samples or default_samples, seq_len=seq_len or default_seq_len
    )
    quantized, report = quantize_model(params, recipe, tokens, batch_size=batch_size)
    report["calibration"]["source"] = list(calib)
    return quantized, report


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="checkpoint dir, HF dir, .gguf or smollm2")
    parser.add_argument("--text", required=True, help="UTF-8 text file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    _add_tensor_parallel(parser)
    parser.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    params = qoq_jax.load(args.model, dtype=args.dtype, mesh=_tensor_mesh(args.tensor_parallel))
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
    _add_tensor_parallel(parser)
    parser.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    mesh = _tensor_mesh(args.tensor_parallel)
    started = time.perf_counter()
    params = qoq_jax.load(args.model, dtype=args.dtype, mesh=mesh)
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


def _add_serve(parser: argparse.ArgumentParser) -> None:
    from converters.qoq import RECIPES

    parser.add_argument(
        "--model",
        default="smollm2",
        help='a quantized checkpoint directory, "smollm2", an HF model directory or a .gguf',
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 requests")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="quantize an imported float model with this recipe (pydoc calibration) before serving",
    )
    parser.add_argument("--served-model-name", default=None, help="the model id clients ask for (default --model)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=None,
        help="sequences decoded together (default: sized from the KV pool, as vLLM does: as many sequences of up to "
        "2048 tokens as the pages hold, the largest power of two up to 256; 256 for an 8B W4A8KV4 model on an "
        "80-141 GB GPU)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=None,
        help="tokens per step, decodes plus prompt chunks (default: max-num-seqs + 512)",
    )
    parser.add_argument(
        "--max-model-len", type=_positive_int, default=None, help="prompt + generated tokens per request"
    )
    parser.add_argument("--page-size", type=_positive_int, default=None, help="tokens per KV cache page (default 64)")
    parser.add_argument(
        "--kv-memory-gb",
        type=float,
        default=None,
        help="KV cache memory per device in GiB (default: 90%% of the device's memory beside the weights; 4 GiB "
        "on a CPU)",
    )
    parser.add_argument(
        "--warmup",
        choices=["all", "cover", "none"],
        default=None,
        help="step programs compiled before serving: all of them, a covering set (default: at every table width, "
        "decode programs of 1, 8, 64, ... rows and max-num-seqs, and the most prompt-chunk rows alone and with "
        "max-num-seqs decode rows; the rest compile in the background as needed), or none",
    )
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not share cached prompt pages")
    parser.add_argument(
        "--logprobs-mode",
        choices=["raw", "processed"],
        default="raw",
        help="what logprobs report: the model's own distribution (raw, as OpenAI and vLLM do) or the one sampled "
        "from, after penalties, logit bias, temperature, top-k and top-p (processed)",
    )
    _add_tensor_parallel(parser)
    parser.add_argument(
        "--data-parallel",
        type=_positive_int,
        default=1,
        metavar="M",
        help="independent replicas of the model, each on its own --tensor-parallel devices, requests going to the "
        "least loaded (default 1)",
    )
    parser.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from serve.engine import AsyncEngine, build_engine
    from serve.http_server import create_app, run
    from serve.replicas import build_replicas, device_groups

    device_groups(args.tensor_parallel, args.data_parallel)  # refuses a split the devices cannot hold, unloaded
    load = _serving_params(args)
    name = args.served_model_name or str(args.model).rstrip("/")
    options = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
        "page_size": args.page_size,
        "kv_memory_bytes": None if args.kv_memory_gb is None else int(args.kv_memory_gb * 2**30),
        "warmup": args.warmup,
        "prefix_caching": False if args.no_prefix_caching else None,
    }
    options = {k: v for k, v in options.items() if v is not None}
    print(f"[{name}: compiling the engine's step programs…]", file=sys.stderr, flush=True)
    if args.data_parallel == 1:  # one engine, no router
        built = build_engine(load(_tensor_mesh(args.tensor_parallel)), model_name=name, **options)
        print(f"[{name}: {built.describe()}]", file=sys.stderr, flush=True)
        engine = AsyncEngine(built)
    else:
        engine = build_replicas(
            load,
            tensor_parallel=args.tensor_parallel,
            data_parallel=args.data_parallel,
            model_name=name,
            **options,
        )
    app = create_app(engine, model_name=name, api_key=args.api_key, logprobs_mode=args.logprobs_mode)
    try:
        run(app, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


def _serving_params(args: argparse.Namespace) -> Callable[[Mesh | None], Params]:
    """How each engine gets the model for its mesh: loaded straight into the mesh's shardings, or, with --recipe,
    imported and quantized once, then split over each mesh."""
    if args.recipe is None:
        return lambda mesh: qoq_jax.load(args.model, dtype=args.dtype, mesh=mesh)
    params, report = _quantized(qoq_jax.load(args.model, dtype=args.dtype), args.recipe, source=args.model)
    print(
        f"[{args.recipe}: quantized with {report['calibration']['samples']}×{report['calibration']['seq_len']} "
        f"calibration tokens in {report['seconds']:.0f} s]",
        file=sys.stderr,
    )
    _print_disabled_stages(report)
    return functools.partial(shard_params, params)


def _add_tensor_parallel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensor-parallel",
        type=_positive_int,
        default=1,
        metavar="N",
        help="split the model over N devices (default 1)",
    )


def _positive_int(text: str) -> int:
    """An argparse type: a clear usage error for anything but an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1; got {value}")
    return value


def _tensor_mesh(tensor_parallel: int) -> Mesh | None:
    """The "tensor" mesh of the first N devices; None for one, where the model runs unsplit."""
    return None if tensor_parallel == 1 else make_mesh(tensor_parallel)


if __name__ == "__main__":
    sys.exit(main())
