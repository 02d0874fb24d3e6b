"""Data parallelism: two engine replicas on CPU devices 0 and 1 behind the HTTP server, and the router on
stand-in replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request

import jax
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import qoq_jax
from serve.http_server import create_app
from serve.replicas import ReplicatedEngine, build_replicas, device_groups
from serve.request import EngineStats, Request, RequestOutput
from loopback import serving
from tiny_models import sharp_tiny_llama, tiny_tokenizer

MODEL = "tiny-llama"
# Per replica one seat, so two shapes to compile (decode batches of 1, prompt chunks of one row of 16 tokens);
# requests beyond a replica's seat wait in its queue.
ENGINE_OPTIONS = dict(
    max_num_seqs=1,
    max_model_len=64,
    page_size=16,
    num_pages=8,
    max_num_batched_tokens=16,
    prefill_row_tokens=16,
    max_prefill_rows=1,
)
# 12 to 16 tokens each: qoq_jax.generate's references all pad to one compiled shape.
PROMPTS = ["This License applies to", "The Program refers to", "To modify a work means", "A covered work means"]
NEW = 12


@pytest.fixture(scope="module")
def params(gpl_text):
    return sharp_tiny_llama(tokenizer=tiny_tokenizer(gpl_text))


@dataclasses.dataclass
class Served:
    url: str
    engine: ReplicatedEngine
    loaded_on: list[list[jax.Device]]  # the devices of each mesh `load` was asked for


@pytest.fixture(scope="module")
def served(params):
    loaded_on = []

    def load(mesh):  # host params: build_replicas moves them onto the mesh
        loaded_on.append(list(mesh.devices.flat))
        return params

    engine = build_replicas(
        load, tensor_parallel=1, data_parallel=2, devices=jax.devices()[:2], model_name=MODEL, **ENGINE_OPTIONS
    )
    with serving(create_app(engine, model_name=MODEL)) as url:
        yield Served(url, engine, loaded_on)


def _wait_idle(engine, timeout: float = 10.0) -> EngineStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats.running_requests == 0 and stats.waiting_requests == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_replica_runs_on_its_own_device(served):
    devices = jax.devices()
    assert served.loaded_on == [[devices[0]], [devices[1]]]
    for replica, device in zip(served.engine.replicas, devices):
        assert {d for leaf in jax.tree.leaves(replica.params.state) for d in leaf.devices()} == {device}


def test_concurrent_completions_spread_over_replicas_and_match_generate(served, params):
    async def complete_all():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(
                *[
                    client.completions.create(
                        model=MODEL, prompt=p, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True}
                    )
                    for p in PROMPTS
                ]
            )

    responses = asyncio.run(complete_all())
    for prompt, response in zip(PROMPTS, responses):
        [choice] = response.choices
        assert choice.text == qoq_jax.generate(params, [prompt], max_new_tokens=NEW, ignore_eos=True)[0], prompt
        assert response.usage.completion_tokens == NEW
    _wait_idle(served.engine)
    each = [replica.stats() for replica in served.engine.replicas]
    assert all(s.generation_tokens_total > 0 for s in each), "both replicas should have served requests"
    assert sum(s.generation_tokens_total for s in each) >= NEW * len(PROMPTS)
    assert served.engine.loads == [0, 0]

    metrics = _metrics(served.url)
    assert metrics["qoq_generation_tokens_total"] == sum(s.generation_tokens_total for s in each)
    assert metrics["qoq_prompt_tokens_total"] == sum(s.prompt_tokens_total for s in each)
    assert metrics["qoq_kv_pages_total"] == 2 * ENGINE_OPTIONS["num_pages"]


def test_health_and_context_come_from_the_replicas(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=64)
    client.close()
    assert served.engine.alive and served.engine.max_model_len == ENGINE_OPTIONS["max_model_len"]


# ------------------------------------------------------------------------------------------- routing, no server


class _HeldReplica:
    """A stand-in replica whose requests stay outstanding until `finish` releases them."""

    def __init__(self, stats: EngineStats | None = None):
        self.served: list[str] = []
        self._done: dict[str, asyncio.Event] = {}
        self.alive = True
        self._stats = stats

    def stats(self) -> EngineStats:
        return self._stats

    def finish(self, request_id: str) -> None:
        self._done[request_id].set()

    async def generate(self, request: Request):
        self.served.append(request.request_id)
        self._done[request.request_id] = asyncio.Event()
        await self._done[request.request_id].wait()
        yield RequestOutput(request.request_id, (1,), "", 1, 1, finish_reason="stop")


def test_router_sends_each_request_to_the_least_loaded_replica():
    async def scenario():
        first, second = _HeldReplica(), _HeldReplica()
        router = ReplicatedEngine([first, second])
        tasks = {}

        async def submit(request_id: str):
            async def consume():
                return [o async for o in router.generate(Request(request_id, (1,), max_tokens=1))]

            tasks[request_id] = asyncio.create_task(consume())
            await asyncio.sleep(0)  # the stream starts, and is routed

        for request_id in ("a", "b", "c"):  # a burst: each counts as soon as it is routed; ties → replica 0
            await submit(request_id)
        assert (first.served, second.served, router.loads) == (["a", "c"], ["b"], [2, 1])
        second.finish("b")
        await tasks["b"]
        assert router.loads == [2, 0]
        await submit("d")
        await submit("e")
        assert (first.served, second.served, router.loads) == (["a", "c"], ["b", "d", "e"], [2, 2])
        tasks["e"].cancel()  # a consumer that stops early releases its replica's slot
        await asyncio.gather(tasks["e"], return_exceptions=True)
        assert router.loads == [2, 1]
        await submit("f")
        assert second.served[-1] == "f"
        for replica, request_id in ((first, "a"), (first, "c"), (second, "d"), (second, "f")):
            replica.finish(request_id)
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert router.loads == [0, 0]

    asyncio.run(scenario())


def test_stats_are_summed_and_alive_needs_every_replica():
    def stats(value: int) -> EngineStats:
        return EngineStats(**{f.name: value * (i + 1) for i, f in enumerate(dataclasses.fields(EngineStats))})

    replicas = [_HeldReplica(stats(1)), _HeldReplica(stats(10))]
    router = ReplicatedEngine(replicas)
    assert router.stats() == stats(11)
    assert router.alive
    replicas[1].alive = False
    assert not router.alive


def test_replica_groups_are_consecutive_and_too_many_devices_are_refused():
    devices = jax.devices()
    assert device_groups(2, 2) == [devices[0:2], devices[2:4]]
    assert device_groups(1, 3, devices[:3]) == [[d] for d in devices[:3]]

    def load(mesh):
        raise AssertionError("nothing should be loaded for a split the devices cannot hold")

    with pytest.raises(ValueError, match="tensor_parallel=2 × data_parallel=3 needs 6 devices; there are 4"):
        build_replicas(load, tensor_parallel=2, data_parallel=3, model_name=MODEL)
    with pytest.raises(ValueError, match="data_parallel must be ≥ 1"):
        build_replicas(load, tensor_parallel=1, data_parallel=0, model_name=MODEL)
