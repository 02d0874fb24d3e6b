"""Data parallelism for the server: independent engine replicas, one per device group, behind one router.

Where tensor parallelism does not pay (a model that fits one device, whose all-reduces would cost more than
they save), each device group runs its own copy of the model with its own KV pool and its own engine thread:

    devices   [0 1 | 2 3 | 4 5 | 6 7]        tensor_parallel=2, data_parallel=4
    replicas   AsyncEngine × 4, each over a 2-device "tensor" mesh
    requests   → the replica with the fewest outstanding requests

`ReplicatedEngine` has the interface the HTTP server uses (start, shutdown, alive, stats, generate, params,
max_model_len, attention), so `create_app` serves it like one `AsyncEngine`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

import jax
from jax.sharding import Mesh

from qoq_jax.errors import InvalidRequestError
from qoq_jax.params import Params
from qoq_jax.sharding import make_mesh
from serve.engine import AsyncEngine, Engine, build_engine
from serve.request import EngineStats, Request, RequestOutput


class ReplicatedEngine:
    """Several `AsyncEngine`s serving the same model, each request routed to the least loaded one.

    A replica's load is its outstanding requests: those routed to it whose streams have not ended. The router
    counts them itself, on the event loop, rather than reading the engines' queues: a request counts from the
    moment it is routed, so a burst spreads evenly, and no count is read while an engine thread moves requests
    between its queues. Ties go to the lowest index."""

    def __init__(self, replicas: Sequence[AsyncEngine]):
        if not replicas:
            raise ValueError("a ReplicatedEngine needs at least one replica")
        self.replicas = list(replicas)
        self._routes: dict[str, int] = {}  # request id → the replica serving it, until its stream ends

    @property
    def alive(self) -> bool:
        """Every replica is running: the server reports unhealthy as soon as one has stopped."""
        return all(replica.alive for replica in self.replicas)

    @property
    def error(self) -> BaseException | None:
        """The first replica's loop failure, if any has failed."""
        return next((replica.error for replica in self.replicas if replica.error is not None), None)

    @property
    def params(self) -> Params:
        """The first replica's params; every replica holds the same model (and tokenizer)."""
        return self.replicas[0].params

    @property
    def max_model_len(self) -> int:
        """The context every replica can serve."""
        return min(replica.max_model_len for replica in self.replicas)

    @property
    def attention(self):
        """What runs attention: the same model on the same kind of devices in every replica."""
        return self.replicas[0].attention

    @property
    def loads(self) -> list[int]:
        """Outstanding requests per replica."""
        loads = [0] * len(self.replicas)
        for index in self._routes.values():
            loads[index] += 1
        return loads

    async def start(self) -> None:
        for replica in self.replicas:
            await replica.start()

    async def shutdown(self) -> None:
        await asyncio.gather(*(replica.shutdown() for replica in self.replicas))

    def stats(self) -> EngineStats:
        """Every field summed over the replicas (gauges and counters alike are per-replica amounts)."""
        each = [replica.stats() for replica in self.replicas]
        return EngineStats(**{f.name: sum(getattr(s, f.name) for s in each) for f in dataclasses.fields(EngineStats)})

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """The request's outputs from the least loaded replica; stopping early aborts it there."""
        if request.request_id in self._routes:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        loads = self.loads
        index = loads.index(min(loads))
        self._routes[request.request_id] = index
        try:
            async with contextlib.aclosing(self.replicas[index].generate(request)) as outputs:
                async for output in outputs:
                    yield output
        finally:
            del self._routes[request.request_id]


def device_groups(
    tensor_parallel: int, data_parallel: int, devices: Sequence[jax.Device] | None = None
) -> list[list[jax.Device]]:
    """`data_parallel` consecutive groups of `tensor_parallel` devices (default: all of this process's), or a
    ValueError saying why the devices cannot hold them."""
    devices = list(jax.devices() if devices is None else devices)
    for name, value in (("tensor_parallel", tensor_parallel), ("data_parallel", data_parallel)):
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1; got {value}")
    needed = tensor_parallel * data_parallel
    if needed > len(devices):
        raise ValueError(
            f"tensor_parallel={tensor_parallel} × data_parallel={data_parallel} needs {needed} devices; there are "
            f"{len(devices)}"
        )
    return [devices[start : start + tensor_parallel] for start in range(0, needed, tensor_parallel)]


def build_replicas(
    load: Callable[[Mesh], Params],
    *,
    tensor_parallel: int,
    data_parallel: int,
    devices: Sequence[jax.Device] | None = None,
    model_name: str = "qoq-jax",
    **engine_options,
) -> ReplicatedEngine:
    """One engine per device group, each over the params `load` gives for its group's "tensor" mesh (params
    it returns elsewhere are moved onto the mesh); `engine_options` are `build_engine`'s. The device split is
    checked before anything is loaded. Models load one after another (each load may hold a whole copy in host
    memory); the replicas then compile their shapes concurrently, as compilation runs on the host's cores."""
    meshes = [make_mesh(tensor_parallel, group) for group in device_groups(tensor_parallel, data_parallel, devices)]
    warmup = engine_options.pop("warmup", True)
    engines = [
        build_engine(load(mesh), model_name=model_name, mesh=mesh, warmup=False, **engine_options) for mesh in meshes
    ]
    if warmup:
        with concurrent.futures.ThreadPoolExecutor(len(engines), thread_name_prefix="qoq-jax-warmup") as pool:
            list(pool.map(Engine.warmup, engines))
    return ReplicatedEngine([AsyncEngine(engine) for engine in engines])
