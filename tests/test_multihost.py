"""Multi-host start-up as the README documents it, on one machine: two processes of two CPU devices each join
through `jax.distributed.initialize`, build one 4-device tensor mesh over both and generate SPMD; every process
gets the tokens one process computes alone on a 4-device mesh of its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import qoq_jax
from qoq_jax import ModelConfig, QuantFormat

CONFIG = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    max_context=128,
)
PROMPTS = [[1, 2, 3, 4, 5], list(range(40, 70))]

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import qoq_jax
    config, prompts = qoq_jax.ModelConfig(**json.loads(sys.argv[3])), json.loads(sys.argv[4])
    quant = qoq_jax.QuantFormat("w4a8-g128", kv_bits=4, group_size=128)
    mesh = qoq_jax.make_mesh(4)
    assert len(mesh.devices.flat) == 4 and len(jax.local_devices()) == 2
    params = qoq_jax.init_params(config, quant=quant, seed=2, mesh=mesh)
    print("TOKENS", json.dumps(qoq_jax.generate(params, prompts, max_new_tokens=6, decode_chunk=6)), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_what_one_process_does():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    address = f"127.0.0.1:{_free_port()}"
    args = [json.dumps(CONFIG), json.dumps(PROMPTS)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, address, str(rank), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        quant = QuantFormat("w4a8-g128", kv_bits=4, group_size=128)
        params = qoq_jax.init_params(ModelConfig(**CONFIG), quant=quant, seed=2, mesh=qoq_jax.make_mesh(4))
        expected = qoq_jax.generate(params, PROMPTS, max_new_tokens=6, decode_chunk=6)
        for worker in workers:
            out, _ = worker.communicate(timeout=300)
            assert worker.returncode == 0, out[-3000:]
            outputs.append(out)
    finally:
        for worker in workers:
            worker.kill()
    for out in outputs:
        [line] = [line for line in out.splitlines() if line.startswith("TOKENS ")]
        assert json.loads(line.removeprefix("TOKENS ")) == expected
