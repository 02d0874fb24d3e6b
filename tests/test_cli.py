"""The `qoq-jax generate` command on a tiny model directory with its tokenizer."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import qoq_jax
from serve.cli import main
from tiny_models import build_hf_model, save_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpl_text):
    directory = save_hf_model(build_hf_model("llama", seed=5), tmp_path_factory.mktemp("cli"))
    tiny_tokenizer(gpl_text).save_pretrained(directory)
    return directory


def test_generate_prints_the_continuation_and_tokens_per_second(model_dir, capsys):
    prompt = "The GNU General Public License"
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "12", prompt]) == 0
    out, err = capsys.readouterr()
    [expected] = qoq_jax.generate(qoq_jax.load(model_dir), [prompt], max_new_tokens=12)
    assert out.startswith(prompt + expected)
    assert "tokens/s" in err and "batch 1" in err


def test_errors_exit_with_a_message(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hello"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_console_script_is_installed(model_dir):
    assert shutil.which("qoq-jax"), "the qoq-jax console script is not on PATH (pip install -e .)"
    run = subprocess.run(
        ["qoq-jax", "generate", "--model", str(model_dir), "--max-new-tokens", "4", "--no-warmup", "Hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hi") and "tokens/s" in run.stderr
