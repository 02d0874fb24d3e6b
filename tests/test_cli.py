"""The `qoq-jax` command: `generate` on a tiny model directory with its tokenizer, and the parallelism flags."""

from __future__ import annotations

import shutil
import subprocess

import jax
import pytest

import qoq_jax
from qoq_jax.errors import QoQError
from qoq_jax.sharding import make_mesh
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


# ------------------------------------------------------------------------------------------ parallelism flags


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--tensor-parallel", "0", "hi"],
        ["eval", "--text", "t.txt", "--tensor-parallel", "-1"],
        ["serve", "--tensor-parallel", "0"],
        ["serve", "--data-parallel", "0"],
        ["serve", "--data-parallel", "two"],
    ],
)
def test_parallel_sizes_below_one_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "-parallel: " in err and "≥ 1" in err and "Traceback" not in err


NUM_DEVICES = len(jax.devices())
TOO_MANY = NUM_DEVICES + 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--tensor-parallel", str(TOO_MANY), "hi"], f"needs {TOO_MANY} devices; there are {NUM_DEVICES}"),
        (
            ["eval", "--text", "t.txt", "--tensor-parallel", str(TOO_MANY)],
            f"needs {TOO_MANY} devices; there are {NUM_DEVICES}",
        ),
        (
            ["serve", "--tensor-parallel", "2", "--data-parallel", str(TOO_MANY)],
            f"tensor_parallel=2 × data_parallel={TOO_MANY} needs {2 * TOO_MANY} devices; there are {NUM_DEVICES}",
        ),
    ],
    ids=["generate", "eval", "serve"],
)
def test_more_devices_than_there_are_is_refused_before_loading(argv, message, tmp_path, capsys):
    missing = str(tmp_path / "missing")  # loading it would fail with another message: the devices are checked first
    assert main([*argv, "--model", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qoq-jax: error: ") and message in err


@pytest.mark.parametrize("command", [["generate", "hi"], ["eval", "--text", "t.txt"]])
@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_generate_and_eval_load_the_model_over_the_first_devices(command, tensor_parallel, monkeypatch):
    meshes = []

    def load(model, dtype=None, mesh=None):
        meshes.append(mesh)
        raise QoQError("loaded")  # what the commands do with a model is tested above

    monkeypatch.setattr(qoq_jax, "load", load)
    assert main([*command, "--tensor-parallel", str(tensor_parallel)]) == 2
    [mesh] = meshes
    devices = None if mesh is None else list(mesh.devices.flat)
    assert devices == (None if tensor_parallel == 1 else jax.devices()[:tensor_parallel])


@pytest.fixture
def fake_serving(monkeypatch):
    """`serve` with loading, engines and the HTTP server replaced by recorders of what they were given."""
    seen = {"loaded": []}

    def load(model, dtype=None, mesh=None):
        seen["loaded"].append((model, mesh))
        return f"params of {model}"

    def build_replicas(load, **options):
        seen["replicas"] = (load, options)
        return "replicated engine"

    monkeypatch.setattr(qoq_jax, "load", load)
    monkeypatch.setattr("serve.engine.build_engine", lambda params, **options: _Built((params, options)))
    monkeypatch.setattr("serve.engine.AsyncEngine", lambda engine: ("async engine", engine))
    monkeypatch.setattr("serve.replicas.build_replicas", build_replicas)
    monkeypatch.setattr("serve.http_server.create_app", lambda engine, **kw: seen.update(served=engine) or "app")
    monkeypatch.setattr("serve.http_server.run", lambda app, host, port: None)
    return seen


class _Built(tuple):
    """What the fake build_engine returns: its arguments, and a start-up line."""

    def describe(self) -> str:
        return "an engine"


def test_serve_with_tensor_parallel_runs_one_engine_over_the_first_devices(fake_serving):
    assert main(["serve", "--model", "m", "--tensor-parallel", "2", "--max-num-seqs", "4"]) == 0
    [(model, mesh)] = fake_serving["loaded"]
    assert model == "m" and list(mesh.devices.flat) == jax.devices()[:2]
    assert fake_serving["served"] == ("async engine", _Built(("params of m", dict(model_name="m", max_num_seqs=4))))
    assert "replicas" not in fake_serving


def test_serve_with_data_parallel_builds_replicas_that_load_over_their_meshes(fake_serving):
    assert main(["serve", "--model", "m", "--tensor-parallel", "2", "--data-parallel", "2", "--page-size", "16"]) == 0
    assert fake_serving["served"] == "replicated engine" and fake_serving["loaded"] == []
    load, options = fake_serving["replicas"]
    assert options == dict(tensor_parallel=2, data_parallel=2, model_name="m", page_size=16)
    mesh = make_mesh(2, jax.devices()[2:4])
    assert load(mesh) == "params of m" and fake_serving["loaded"] == [("m", mesh)]
