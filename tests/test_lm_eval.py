"""lm-evaluation-harness against `qoq-jax serve`: a loglikelihood task defined in a local YAML over a local JSON
Lines file (no hub), scored through /v1/completions (echo + logprobs), item by item equal to `qoq_jax.forward`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

import qoq_jax
from tiny_models import build_hf_model, save_hf_model, tiny_tokenizer

SERVER_START_TIMEOUT_S = 300
TASK = "qoq_tiny_loglikelihood"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpl_text):
    directory = save_hf_model(build_hf_model("llama", seed=3), tmp_path_factory.mktemp("tiny-llama"))
    tiny_tokenizer(gpl_text).save_pretrained(directory)
    return directory


class _Server:
    """`qoq-jax serve` in a subprocess on a free loopback port; its stderr is drained by a thread."""

    def __init__(self, args: list[str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "serve", *args, "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            found = re.search(r"serving on (http://\S+/v1)", line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()

    def wait(self) -> str:
        if not self._ready.wait(SERVER_START_TIMEOUT_S) or self.url is None:
            self.stop()
            pytest.fail("qoq-jax serve did not start:\n" + "".join(self.lines[-40:]))
        return self.url

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _items(gpl_text: str, count: int, seed: int) -> list[dict]:
    """Context / continuation pairs cut from the license's sentences at random word boundaries."""
    rng = np.random.default_rng(seed)
    sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s+", gpl_text) if 60 < len(s.strip()) < 200]
    items = []
    for index in rng.choice(len(sentences), size=count, replace=False):
        words = sentences[index].split()
        cut = int(rng.integers(3, len(words) - 2))
        items.append({"context": " ".join(words[:cut]), "continuation": " " + " ".join(words[cut:])})
    return items


def test_lm_eval_loglikelihoods_through_the_server_equal_forward(model_dir, gpl_text, tmp_path, monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    items = _items(gpl_text, count=6, seed=7)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))

    server = _Server(
        ["--model", str(model_dir), "--dtype", "float32", "--served-model-name", "tiny", "--max-num-seqs", "4",
         "--max-model-len", "128", "--page-size", "16", "--warmup", "none"]
    )
    try:
        url = server.wait()
        from lm_eval import simple_evaluate
        from lm_eval.models.openai_completions import LocalCompletionsAPI
        from lm_eval.tasks import TaskManager

        lm = LocalCompletionsAPI(
            base_url=f"{url}/completions", model="tiny", tokenizer=str(model_dir), tokenizer_backend="huggingface",
            tokenized_requests=True, batch_size=3, max_retries=1, timeout=120, max_length=128,
        )
        results = simple_evaluate(
            model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
            log_samples=True, bootstrap_iters=0,
        )
    finally:
        server.stop()

    params = qoq_jax.load(str(model_dir), dtype="float32")
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    scores = []
    for sample, item in zip(samples, items):
        (loglikelihood, is_greedy), = sample["filtered_resps"]
        context, continuation = lm._encode_pair(item["context"], item["continuation"])
        tokens = context + continuation
        logits = np.asarray(qoq_jax.forward(params, jnp.asarray([tokens]))[0], np.float64)
        logprobs = logits - logits.max(-1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
        positions = np.arange(len(context) - 1, len(tokens) - 1)
        expected = logprobs[positions, continuation].sum()
        np.testing.assert_allclose(loglikelihood, expected, atol=1e-4 * len(continuation))
        assert is_greedy == bool(np.all(logprobs[positions].argmax(-1) == continuation))
        scores.append(expected)
    assert len(set(np.round(scores, 3))) == len(items)  # distinct items, distinct scores
