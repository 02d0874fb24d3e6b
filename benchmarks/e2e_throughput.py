"""End-to-end generation throughput in QServe's methodology, every system measured in the same run.

QServe's `qserve_benchmark.py` (../shared/spec/qserve-runtime.md §6): random weights with the real model's shapes,
`batch` prompts of 1024 random token ids, 512 generated tokens each, the largest batch whose weights and KV pages
fit one memory budget (the same budget for every system), prefill included: tokens/s = batch × 512 / wall time.

Each system runs on the same qoq-jax step functions (non-IFB, as QServe's benchmark mode): the weights are made at
random directly in their format on the device (`init_params`, split over the mesh with --tensor-parallel), the
KV pool holds exactly the batch's pages, the prompts are prefilled `--prefill-rows` rows per call into it, then
all 511 decode steps run greedily inside one compiled loop (no host round trip until the end), the cache
donated throughout. One untimed run compiles; the median of `--repeats` timed runs is reported.

* Systems: qoq_w4a8kv4_g128, qoq_w4a8kv4_chn (QoQ W4A8KV4, the Pallas GEMMs and KV4 decode attention on GPU),
  qoq_w4a8kv4_g128_kv_stages (g128 as this library's default recipe stores it: plus the q/k transform after RoPE
  and the per-token range search of each K and V written; what those cost per step is its gap to qoq_w4a8kv4_g128),
  w8a8kv8 (XLA int8 GEMMs, KV8 pages), w16a16kv16 (plain JAX in --dtype, KV16 pages), and hf_torch
  (transformers' `generate` with a static cache, fp16, when torch sees a CUDA device); and
  qoq_w4a8kv4_g128_engine: the same model, budget and batch served by the serving engine (`serve.engine`: the
  requests added at once, continuous batching with chunked prefill, the host's bookkeeping overlapped with the
  device), so the headline figure is also the one a server's users get.
* Budget: --memory-budget-gb per device; by default what QServe's A100 run of the model held (its W4A8 weights
  plus its page count, at the exact KV4 page size) scaled by this device's memory over the A100's 80 GiB.
* Batch-1 latency: ms per output token of the decode loop at batch 1 after a 1024-token prompt.

Run from the repository root:

    python benchmarks/e2e_throughput.py                                   # Llama-3-8B, every system
    python benchmarks/e2e_throughput.py --models Llama-3-8B Llama-2-13B --systems qoq_w4a8kv4_g128 w16a16kv16
    python benchmarks/e2e_throughput.py --tensor-parallel 2               # each system over 2 devices
    python benchmarks/e2e_throughput.py --profile /tmp/trace              # + a jax.profiler trace of the qoq run
    python benchmarks/e2e_throughput.py --smoke                           # a tiny model in seconds, any machine

Writes benchmarks/results/e2e-<device>.json (-smoke / -tp<N> suffixes) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import device_description  # noqa: E402

from qoq_jax import DecodeState, ModelConfig, PagedKVCache, QuantFormat, RopeConfig  # noqa: E402
from qoq_jax import decode_step, init_params, make_mesh, prefill  # noqa: E402
from qoq_jax.kv_cache import kv_bytes_per_page  # noqa: E402
from qoq_jax.model import CausalLM  # noqa: E402
from qoq_jax.sharding import TensorParallel  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGE_SIZE = 64
A100_MEMORY_BYTES = 80 * 2**30
XLA_DEFAULT_MEMORY_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default: bytes_limit is this share

MODELS = {
    "Llama-3-8B": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, max_context=8192, rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
    ),
    "Llama-2-7B": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
        head_dim=128, max_context=4096, rms_norm_eps=1e-5,
    ),
    "Mistral-7B": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, max_context=32768, rms_norm_eps=1e-5, rope=RopeConfig(theta=1000000.0),
        architecture="MistralForCausalLM",
    ),
    "Llama-2-13B": ModelConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40,
        head_dim=128, max_context=4096, rms_norm_eps=1e-5,
    ),
}  # fmt: skip
SMOKE_MODEL = ModelConfig(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=64, max_context=256,
)  # fmt: skip
QSERVE_A100 = {  # benchmark_a100.sh: (batch, pages), and the README's tokens/s
    "Llama-3-8B": (256, 6400, 3005),
    "Llama-2-7B": (128, 3200, 2908),
    "Mistral-7B": (256, 6400, 2970),
    "Llama-2-13B": (128, 3200, 1741),
}
QSERVE_A100_FORMAT = QuantFormat("w4a8-chn", kv_bits=4)  # benchmark_a100.sh: --group-size -1
SYSTEMS = {
    "qoq_w4a8kv4_g128": QuantFormat("w4a8-g128", kv_bits=4, group_size=128),
    # What the default `g128` recipe makes: the same, plus its KV4 stages (q/k transform, per-token range search).
    "qoq_w4a8kv4_g128_kv_stages": QuantFormat(
        "w4a8-g128", kv_bits=4, group_size=128, qk_transform=True, kv_range_search=True
    ),
    "qoq_w4a8kv4_chn": QuantFormat("w4a8-chn", kv_bits=4),
    "w8a8kv8": QuantFormat("w8a8", kv_bits=8),
    "w16a16kv16": None,
}
HF_TORCH = "hf_torch"
ENGINE = "qoq_w4a8kv4_g128_engine"  # the g128 model through serve.engine
GOAL = {"model": "Llama-3-8B", "device": "H100", "vs_w16a16": 2.0, "vs_w8a8kv8": 1.3, "tokens_per_s": 6000}


# --------------------------------------------------------------------------------------------------
# The memory budget
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Footprint:
    """A system's bytes on each device: weights, and the KV pages of one sequence of the benchmark."""

    weight_bytes: int
    kv_bytes_per_sequence: int

    def max_batch(self, budget_bytes: int) -> int:
        """The largest batch whose weights and KV pages fit the budget (0: not even one sequence)."""
        return max(0, (budget_bytes - self.weight_bytes) // self.kv_bytes_per_sequence)


def pages_per_sequence(prompt_len: int, gen_len: int) -> int:
    return math.ceil((prompt_len + gen_len) / PAGE_SIZE)


def weight_bytes(config: ModelConfig, quant: QuantFormat | None, dtype, parallel: TensorParallel | None) -> int:
    """Exact bytes of the model's arrays on one device (its shards under tensor parallelism), from shapes alone."""
    abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0), quant=quant)))[1]
    leaves = jax.tree.leaves(abstract)
    if parallel is None:
        shapes = [leaf.shape for leaf in leaves]
    else:
        shardings = jax.tree.leaves(parallel.shardings(abstract))
        shapes = [sharding.shard_shape(leaf.shape) for leaf, sharding in zip(leaves, shardings)]
    return sum(math.prod(shape) * leaf.dtype.itemsize for shape, leaf in zip(shapes, leaves))


def footprint(config, quant, dtype, parallel, *, prompt_len: int, gen_len: int) -> Footprint:
    kv_bits = 16 if quant is None else quant.kv_bits
    kv_shards = 1 if parallel is None else parallel.kv_shards
    page_bytes = kv_bytes_per_page(config, PAGE_SIZE, kv_bits, dtype, kv_shards=kv_shards)
    return Footprint(weight_bytes(config, quant, dtype, parallel), pages_per_sequence(prompt_len, gen_len) * page_bytes)


def qserve_budget_bytes(name: str, config: ModelConfig, dtype, device_memory_bytes: int) -> int:
    """What QServe's A100 run of the model held (W4A8 per-channel weights plus its KV4 pages, at their exact
    size), scaled to a device of `device_memory_bytes`."""
    _, pages, _ = QSERVE_A100[name]
    held = weight_bytes(config, QSERVE_A100_FORMAT, dtype, None) + pages * kv_bytes_per_page(
        config, PAGE_SIZE, 4, dtype
    )
    return held * device_memory_bytes // A100_MEMORY_BYTES


def device_memory_bytes() -> int | None:
    """The first device's physical memory as XLA sees it (its bytes_limit over the default client fraction)."""
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"] / XLA_DEFAULT_MEMORY_FRACTION) if "bytes_limit" in stats else None


# --------------------------------------------------------------------------------------------------
# Running one system
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, donate_argnames=("cache",))
def _prefill_rows(params, cache, tokens, lengths):
    state, logits = prefill(params, tokens, lengths, cache=cache)
    return state.cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_steps",), donate_argnames=("state",))
def _decode_greedy(params, state: DecodeState, tokens, *, num_steps: int):
    """`num_steps` greedy decode steps in one compiled loop."""

    def step(_, carry):
        state, tokens = carry
        state, logits = decode_step(params, state, tokens)
        return state, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, num_steps, step, (state, tokens))


@dataclasses.dataclass
class Timing:
    prefill_s: float | None  # None: included in decode_s
    decode_s: float

    @property
    def total_s(self) -> float:
        return (self.prefill_s or 0.0) + self.decode_s


class QoQRunner:
    """One system's weights and a KV pool for `batch` sequences, and QServe's benchmark loop over them."""

    def __init__(self, config, quant, dtype, mesh, *, batch: int, prompt_len: int, gen_len: int, prefill_rows: int):
        self.params = init_params(config, dtype=dtype, quant=quant, mesh=mesh, seed=0)
        self.batch, self.prompt_len, self.gen_len = batch, prompt_len, gen_len
        self.prefill_rows = min(prefill_rows, batch)
        per_seq = pages_per_sequence(prompt_len, gen_len)
        self.tables = np.arange(batch * per_seq, dtype=np.int32).reshape(batch, per_seq)

        def empty_pool():
            return PagedKVCache.init(
                config,
                num_pages=batch * per_seq,
                page_size=PAGE_SIZE,
                block_tables=jnp.zeros((1, per_seq), jnp.int32),
                dtype=self.params.dtype,
                kv_bits=self.params.kv_bits,
                kv_clip=self.params.kv_clip,
                kv_range_search=self.params.kv_range_search,
                kernel=self.params.kernel,
            )

        parallel = self.params.parallel
        self.pool = jax.jit(empty_pool)() if parallel is None else parallel.build(empty_pool)
        self.prompts = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len), dtype=np.int32)

    def run(self) -> Timing:
        started = time.perf_counter()
        cache, first = self.pool, []
        rows = self.prefill_rows
        for start in range(0, self.batch, rows):
            count = min(rows, self.batch - start)
            tokens = np.zeros((rows, self.prompt_len), np.int32)
            tables = np.zeros((rows, self.tables.shape[1]), np.int32)
            lengths = np.zeros((rows,), np.int32)  # padding rows: length 0, nothing written
            tokens[:count], tables[:count] = self.prompts[start : start + count], self.tables[start : start + count]
            lengths[:count] = self.prompt_len
            cache, sampled = _prefill_rows(
                self.params, dataclasses.replace(cache, block_tables=tables), tokens, lengths
            )
            first.append(sampled[:count])
        first = jnp.concatenate(first)
        first.block_until_ready()
        prefilled = time.perf_counter()
        state = DecodeState(
            dataclasses.replace(cache, block_tables=self.tables), jnp.full((self.batch,), self.prompt_len, jnp.int32)
        )
        state, last = _decode_greedy(self.params, state, first, num_steps=self.gen_len - 1)
        last.block_until_ready()
        self.pool = state.cache
        return Timing(prefilled - started, time.perf_counter() - prefilled)


def measure(runner, repeats: int, profile_dir: Path | None = None) -> Timing:
    runner.run()  # compiles
    trace = jax.profiler.trace(str(profile_dir)) if profile_dir else contextlib.nullcontext()
    with trace:
        timings = [runner.run() for _ in range(repeats)]
    return median_timing(timings)


def median_timing(timings: list[Timing]) -> Timing:
    """The run of median total time; for an even count, the mean of the middle two (part by part, so the
    total is the median of the totals)."""
    ordered = sorted(timings, key=lambda t: t.total_s)
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    prefills = [t.prefill_s for t in middle]
    return Timing(
        None if None in prefills else sum(prefills) / len(middle), sum(t.decode_s for t in middle) / len(middle)
    )


class EngineRunner:
    """The serving engine over the same model and an exactly sized pool: `batch` requests at once, greedy,
    `gen_len` tokens each, timed from their arrival to the last token (prefill included)."""

    def __init__(self, config, dtype, mesh, *, batch: int, prompt_len: int, gen_len: int, prefill_rows: int):
        from serve.engine import build_engine

        params = init_params(config, dtype=dtype, quant=SYSTEMS["qoq_w4a8kv4_g128"], mesh=mesh, seed=0)
        self.engine = build_engine(
            params,
            max_num_seqs=batch,
            max_model_len=prompt_len + gen_len,
            page_size=PAGE_SIZE,
            num_pages=batch * pages_per_sequence(prompt_len, gen_len),
            max_num_batched_tokens=batch + prefill_rows * prompt_len,
            prefill_row_tokens=PAGE_SIZE,
            prefix_caching=False,
            warmup="none",  # the compile run compiles the programs this workload runs, and only those
        )
        self.prompts = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len)).tolist()
        self.gen_len, self.runs = gen_len, 0

    def run(self) -> Timing:
        from serve.request import Request

        engine, self.runs = self.engine, self.runs + 1
        started = time.perf_counter()
        for i, prompt in enumerate(self.prompts):
            engine.add_request(Request(f"{self.runs}-{i}", tuple(prompt), self.gen_len, ignore_eos=True))
        while engine.has_work():
            engine.step()
        elapsed = time.perf_counter() - started
        if self.runs == 1:  # the compile run: let the programs it found missing finish compiling
            engine.runner.wait_for_compilations()
        return Timing(None, elapsed)


class HFRunner:
    """transformers' `generate` with a static cache, random weights: the outside peer (fp16 on a CUDA device; on
    CPU, for --smoke only, in --dtype). Its time includes its prefill, which it does not report apart."""

    def __init__(self, config: ModelConfig, dtype: str, *, batch: int, prompt_len: int, gen_len: int):
        import torch
        import transformers

        hf_config = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim, max_position_embeddings=config.max_context, rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope.theta, tie_word_embeddings=config.tie_word_embeddings,
        )  # fmt: skip
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(self.device):  # made where it runs, in its dtype: never a float32 copy of the model
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
        self.model = model.eval()
        self.gen_len = gen_len
        self.prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), device=self.device)

    def run(self) -> Timing:
        self._synchronize()
        started = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(
                self.prompts, attention_mask=self.torch.ones_like(self.prompts), max_new_tokens=self.gen_len,
                min_new_tokens=self.gen_len, do_sample=False, cache_implementation="static", pad_token_id=0,
            )  # fmt: skip
        self._synchronize()
        return Timing(None, time.perf_counter() - started)

    def _synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def hf_footprint(config: ModelConfig, dtype, *, prompt_len: int, gen_len: int) -> Footprint:
    """16-bit weights and a static KV16 cache of prompt + generated tokens per row."""
    return Footprint(
        weight_bytes(config, None, dtype, None), (prompt_len + gen_len) * kv_bytes_per_page(config, 1, 16, dtype)
    )


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["Llama-3-8B"])
    parser.add_argument(
        "--systems", nargs="+", choices=[*SYSTEMS, ENGINE, HF_TORCH], default=[*SYSTEMS, ENGINE, HF_TORCH]
    )
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="GiB per device for weights + KV")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=1024, help="cap on the computed batch")
    parser.add_argument("--prefill-rows", type=int, default=16, help="prompts per prefill call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    parser.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency runs")
    parser.add_argument("--profile", type=Path, default=None, help="write a jax.profiler trace of qoq_w4a8kv4_g128")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, short prompts, a small budget")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "float16"
    if args.smoke:
        args.models, args.prompt_len, args.gen_len, args.repeats, args.prefill_rows = ["smoke"], 32, 8, 1, 2
        args.memory_budget_gb = args.memory_budget_gb or 6 / 1024
        args.max_batch = min(args.max_batch, 4)
    return args


def model_config(name: str) -> ModelConfig:
    return SMOKE_MODEL if name == "smoke" else MODELS[name]


def budget_bytes(args, name: str, config: ModelConfig) -> int:
    if args.memory_budget_gb is not None:
        return int(args.memory_budget_gb * 2**30)
    memory = device_memory_bytes()
    if memory is None:
        raise SystemExit("no device memory figure on this platform: pass --memory-budget-gb")
    return qserve_budget_bytes(name, config, jnp.dtype(args.dtype), memory)


def benchmark_model(args, name: str, mesh) -> list[dict]:
    config = model_config(name)
    dtype = jnp.dtype(args.dtype)
    budget = budget_bytes(args, name, config)
    shape = {"prompt_len": args.prompt_len, "gen_len": args.gen_len}
    rows = []
    for system in sorted(args.systems, key=lambda s: s != HF_TORCH):  # torch first, before JAX's memory pool grows
        if system == HF_TORCH:
            if not (args.smoke or torch_cuda_available()) or args.tensor_parallel > 1:
                print(f"[{name} {system}: skipped (needs torch with CUDA, one device)]", flush=True)
                continue
            fits = hf_footprint(config, dtype, **shape)
        else:
            quant = SYSTEMS["qoq_w4a8kv4_g128" if system == ENGINE else system]
            parallel = None if mesh is None else TensorParallel.create(mesh, config, quant)
            fits = footprint(config, quant, dtype, parallel, **shape)
        batch = min(fits.max_batch(budget), args.max_batch)
        row = {
            "system": system,
            "model": name,
            "batch": batch,
            "tokens_per_s": None,
            "ms_per_token_batch1": None,
            "budget_bytes": budget,
            "weight_bytes": fits.weight_bytes,
            "kv_bytes_per_sequence": fits.kv_bytes_per_sequence,
        }
        rows.append(row)
        if batch == 0:
            print(f"[{name} {system}: the weights leave no room for one sequence in the budget]", flush=True)
            continue
        row.update(run_system(args, config, system, mesh, batch))
        print(format_row(row), flush=True)
    return rows


def run_system(args, config, system: str, mesh, batch: int) -> dict:
    shape = {"prompt_len": args.prompt_len, "gen_len": args.gen_len}

    def runner(batch_size: int):
        if system == HF_TORCH:
            return HFRunner(config, args.dtype, batch=batch_size, **shape)
        if system == ENGINE:
            return EngineRunner(config, args.dtype, mesh, batch=batch_size, prefill_rows=args.prefill_rows, **shape)
        return QoQRunner(
            config, SYSTEMS[system], args.dtype, mesh, batch=batch_size, prefill_rows=args.prefill_rows, **shape
        )

    def per_token_ms(timing: Timing) -> float:
        """Decode time per step; the whole time (prefill included) per generated token where the system does not
        report its prefill apart (transformers, the engine)."""
        return 1e3 * timing.decode_s / (args.gen_len if timing.prefill_s is None else args.gen_len - 1)

    profile = args.profile if system == "qoq_w4a8kv4_g128" else None
    timing = measure(runner(batch), args.repeats, profile)
    result = {
        "tokens_per_s": batch * args.gen_len / timing.total_s,
        "wall_s": timing.total_s,
        "prefill_s": timing.prefill_s,
        "decode_ms_per_step": per_token_ms(timing),
    }
    if not args.no_latency:
        result["ms_per_token_batch1"] = per_token_ms(measure(runner(1), args.repeats))
    if system == HF_TORCH and torch_cuda_available():
        import torch

        torch.cuda.empty_cache()  # hand the freed memory back before JAX runs
    jax.clear_caches()
    return result


def format_row(row: dict) -> str:
    def number(value, spec):
        return "–" if value is None else format(value, spec)

    return (
        f"| {row['model']} | {row['system']} | {row['batch']} | {number(row['tokens_per_s'], '.0f')} | "
        f"{number(row['ms_per_token_batch1'], '.2f')} | {row['weight_bytes'] / 2**20:.1f} | "
        f"{row['kv_bytes_per_sequence'] / 2**20:.1f} |"
    )


TABLE_HEADER = (
    "| model | system | batch | tokens/s | ms/token @1 | weights MiB/device | KV MiB/seq/device |\n"
    "|---|---|---|---|---|---|---|"
)


def goals(rows: list[dict], device: str) -> dict | None:
    """The issue's goal, judged where its model was measured."""
    by_system = {r["system"]: r["tokens_per_s"] for r in rows if r["model"] == GOAL["model"] and r["tokens_per_s"]}
    qoq = by_system.get("qoq_w4a8kv4_g128")
    if qoq is None:
        return None
    judged = {"device_matches": GOAL["device"] in device, "qoq_tokens_per_s": qoq}
    for baseline, key in (("w16a16kv16", "vs_w16a16"), ("w8a8kv8", "vs_w8a8kv8")):
        if baseline in by_system:
            judged[key] = {"ratio": qoq / by_system[baseline], "goal": GOAL[key]}
            judged[key]["met"] = judged[key]["ratio"] >= GOAL[key]
    judged["absolute"] = {"goal": GOAL["tokens_per_s"], "met": qoq >= GOAL["tokens_per_s"]}
    judged["qserve_a100_tokens_per_s"] = QSERVE_A100[GOAL["model"]][2]
    return judged


def main(argv=None) -> dict:
    args = parse_args(argv)
    if HF_TORCH in args.systems:  # JAX would otherwise take 75% of the GPU at start-up, leaving torch the rest
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    load_average = os.getloadavg()
    mesh = make_mesh(args.tensor_parallel) if args.tensor_parallel > 1 else None
    slug, device = device_description()
    print(TABLE_HEADER, flush=True)
    rows = [row for name in args.models for row in benchmark_model(args, name, mesh)]
    result = {
        "device": device,
        "load_average_at_start": load_average,
        "jax_version": jax.__version__,
        "dtype": args.dtype,
        "tensor_parallel": args.tensor_parallel,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "method": "QServe qserve_benchmark.py: random weights, random prompts, largest batch in the budget, "
        "tokens/s = batch × gen_len / wall time including prefill (median of repeats after a compile run); "
        "ms_per_token_batch1 = decode time per step at batch 1 (hf_torch and the engine: the whole time per "
        "generated token)",
        "rows": rows,
        "goal": goals(rows, device),
    }
    suffix = ("-smoke" if args.smoke else "") + (f"-tp{args.tensor_parallel}" if args.tensor_parallel > 1 else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"e2e-{slug}{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = "\n".join([TABLE_HEADER, *map(format_row, rows)])
    title = f"# End-to-end throughput on {device} (jax {jax.__version__}, {args.dtype}, TP {args.tensor_parallel})"
    if args.smoke:
        title += "\n\nA smoke run on a tiny model: it checks the machinery and measures nothing about speed."
    (args.out_dir / f"e2e-{slug}{suffix}.md").write_text(f"{title}\n\n{result['method']}\n\n{table}\n")
    return result


if __name__ == "__main__":
    main()
