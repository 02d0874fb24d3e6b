"""Tensor parallelism: which part of every array each device of a mesh holds, by logical rules.

One axis of the user's mesh, "tensor", spans the devices that share one copy of the model. Every step runs the
model per device inside `shard_map` (so the Pallas kernels see plain local blocks) and the partitioner adds no
communication of its own: the model calls the collectives itself, per decoder layer one all-reduce after o_proj
and one after down_proj, and (quantized models) before each of the two a max-reduce of the per-token activation
scales, so a row-parallel layer quantizes its split input exactly as one device would.

Logical axes of the arrays (the rules of jax-llm-examples' `llama3_jax`):

* heads: q outputs, q_norm's per-head weights and o_proj inputs; mlp: gate/up outputs and down_proj inputs; vocab:
  embedding rows and lm_head columns. All split over the whole tensor group.
* kv_heads: k/v outputs, k_norm's per-head weights and the cache pools' leading axis, split over the group's first
  axis only. Internally the tensor axis is viewed as (kv shards × kv replicas): with fewer KV heads than devices
  each KV head is replicated on the devices that hold its query heads, and every device still holds whole KV heads.
* Everything else (norms, post-norms, the online input rotation's factors) is replicated.

A linear's [in, out] leaves split on `out` (column-parallel) or `in` (row-parallel); quantized weights split
their packed uint4 codes, s2/zero groups and per-channel scales the same way, so a device holds whole 64-channel
packing tiles and whole quantization groups (checked, with the reason, when the split is set up). Per-channel
activation sums are taken by each device over its own input slice, which is what its partial product needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qoq_jax.config import ModelConfig
from qoq_jax.errors import UnsupportedModelError
from qoq_jax.tensor_names import leaf_name
from qoq_jax.quant import QuantFormat

TENSOR_AXIS = "tensor"
KV_SHARD_AXIS = "tensor_kv"
KV_REPLICA_AXIS = "tensor_kv_replica"
TENSOR_AXES = (KV_SHARD_AXIS, KV_REPLICA_AXIS)

_COLUMN_PARALLEL = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads", "gate_proj": "mlp", "up_proj": "mlp"}
_ROW_PARALLEL = {"o_proj": "heads", "down_proj": "mlp"}
_PER_HEAD = {"q_norm": "heads", "k_norm": "kv_heads"}  # q/k norm weights [heads, head_dim] split with their heads
_CACHE_POOLS = ("keys", "values")
_PER_KV_HEAD = ("key_transform", "query_transform", "key_offset")  # [KV heads, ...] of the q/k transform

T = TypeVar("T")


def make_mesh(tensor_parallel: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ("tensor") mesh of the first `tensor_parallel` devices (default: this process's view of all)."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be ≥ 1; got {tensor_parallel}")
    if tensor_parallel > len(devices):
        raise ValueError(f"tensor_parallel={tensor_parallel} needs {tensor_parallel} devices; there are {len(devices)}")
    return Mesh(np.array(devices[:tensor_parallel]), (TENSOR_AXIS,))


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """How one model is split over the devices of a mesh; static and hashable (it rides in `Params`)."""

    mesh: Mesh  # the tensor axis viewed as (KV_SHARD_AXIS, KV_REPLICA_AXIS)
    shard_vocab: bool  # embeddings and lm_head split over the vocabulary (else replicated: it does not divide)

    @classmethod
    def create(cls, mesh: Mesh, config: ModelConfig, quant: QuantFormat | None = None) -> "TensorParallel":
        """Checks that `config` (in `quant`'s formats) splits over the mesh's tensor axis, or says why not."""
        if TENSOR_AXIS not in mesh.axis_names:
            raise ValueError(f"the mesh needs a {TENSOR_AXIS!r} axis; its axes are {mesh.axis_names}")
        unused = {name: size for name, size in mesh.shape.items() if name != TENSOR_AXIS and size > 1}
        if unused:
            raise ValueError(
                f"only the {TENSOR_AXIS!r} mesh axis is used, but the mesh also has {unused}: for data parallelism "
                "run one engine per device group (qoq-jax serve --data-parallel)"
            )
        devices = mesh.devices.reshape(-1)
        size = devices.size
        c = config

        def refuse(reason: str):
            raise UnsupportedModelError(f"the model cannot be split over {size} devices: {reason}")

        if c.num_heads % size:
            refuse(f"its {c.num_heads} attention heads do not divide evenly")
        if c.num_kv_heads % size and size % c.num_kv_heads:
            refuse(f"its {c.num_kv_heads} KV heads neither divide evenly nor divide the device count")
        if c.intermediate_size % size:
            refuse(f"its MLP width {c.intermediate_size} does not divide evenly")
        kv_shards = min(size, c.num_kv_heads)
        if quant is not None:
            heads, mlp = c.num_heads * c.head_dim // size, c.intermediate_size // size
            kv_heads = c.num_kv_heads // kv_shards * c.head_dim
            local_linears = {
                "q_proj": (c.hidden_size, heads),
                "k_proj": (c.hidden_size, kv_heads),
                "o_proj": (heads, c.hidden_size),
                "gate_proj": (c.hidden_size, mlp),
                "down_proj": (mlp, c.hidden_size),
            }
            for name, (num_in, num_out) in local_linears.items():
                try:
                    quant.check_linear(num_in, num_out, f"{name} on each device")
                except ValueError as error:
                    refuse(f"in {quant.weights} {error}")
        return cls(
            mesh=Mesh(devices.reshape(kv_shards, size // kv_shards), TENSOR_AXES),
            shard_vocab=c.vocab_size % size == 0,
        )

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def kv_shards(self) -> int:
        """Devices the KV heads are split over (the rest of the group holds replicas)."""
        return self.mesh.shape[KV_SHARD_AXIS]

    def partition_specs(self, tree: T) -> T:
        """The `PartitionSpec` of every leaf of params, caches or step inputs, by the logical rules."""
        return jax.tree_util.tree_map_with_path(lambda path, leaf: self._spec(leaf_name(path), leaf.ndim), tree)

    def shardings(self, tree: T) -> T:
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self.partition_specs(tree))

    def logits_spec(self, ndim: int) -> P:
        """Logits [..., vocab] stay split over the vocabulary where the LM head is."""
        return P(*([None] * (ndim - 1)), TENSOR_AXES if self.shard_vocab else None)

    def place(self, tree: T) -> T:
        """`tree` (host or device arrays) moved onto the mesh in its shardings."""
        return jax.device_put(tree, self.shardings(tree))

    def constrain(self, tree: T) -> T:
        """`tree` (traced, inside jit) held in its shardings: a step's outputs in the layout its next call
        takes, not the one XLA would propagate to them (e.g. from the vocabulary-split logits)."""
        return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

    def build(self, make: Callable[..., T], *args) -> T:
        """The arrays `make(*args)` creates, created directly in their shardings (a pool or model too big for one
        device never exists whole)."""
        return jax.jit(make, out_shardings=self.shardings(jax.eval_shape(make, *args)))(*args)

    def _spec(self, name: str, ndim: int) -> P:
        parts = name.split(".")
        linear = next((part for part in parts if part in _COLUMN_PARALLEL or part in _ROW_PARALLEL), None)
        if linear in _COLUMN_PARALLEL:  # [in, out] codes, groups; [out] scales, biases
            split = self._axes(_COLUMN_PARALLEL[linear])
            return P(None, split) if ndim == 2 else P(split)
        if linear in _ROW_PARALLEL:  # split inputs; per-output-channel leaves and biases are whole everywhere
            return P(self._axes(_ROW_PARALLEL[linear]), None) if ndim == 2 else P()
        norm = next((part for part in parts if part in _PER_HEAD), None)
        if norm is not None:
            return P(self._axes(_PER_HEAD[norm]), None)
        if "embed_tokens" in parts:
            return P(self._axes("vocab"), None)
        if "lm_head" in parts:
            return P(None, self._axes("vocab"))
        if any(part in _CACHE_POOLS or part in _PER_KV_HEAD for part in parts):  # [KV heads, pages, ...]
            return P(KV_SHARD_AXIS)
        return P()  # norms, block tables, lengths, tokens

    def _axes(self, logical: str) -> Any:
        if logical == "kv_heads":
            return KV_SHARD_AXIS
        if logical == "vocab" and not self.shard_vocab:
            return None
        return TENSOR_AXES
