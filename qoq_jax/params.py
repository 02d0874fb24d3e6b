"""`Params`: a loaded model as one pytree — NNX state as leaves; graph, config and tokenizer as static data.

The module is split once (`nnx.split`) and every step function merges it inside jit, so there is no
per-call `nnx.jit` overhead. `assemble_params` is the single place weights enter the model: it checks a
complete name → array mapping against the abstract model and reports every problem at once, so a model is
either fully loaded or not at all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qoq_jax.config import ModelConfig
from qoq_jax.errors import CheckpointError
from qoq_jax.model import CausalLM, DecoderLayer
from qoq_jax.quant import QuantFormat
from qoq_jax.sharding import TensorParallel

ParamPath = tuple[str | int, ...]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    """None → float32 on CPU, bfloat16 on accelerators; names or jnp dtypes otherwise."""
    if dtype is None:
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
        return jnp.dtype(DTYPES[dtype])
    if jnp.dtype(dtype) not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise ValueError(f"dtype {dtype} is not supported (choose from {', '.join(DTYPES)})")
    return jnp.dtype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Params:
    """What `qoq_jax.load` returns and every step function takes."""

    state: nnx.State
    graphdef: Any = dataclasses.field(metadata=dict(static=True))
    config: ModelConfig = dataclasses.field(metadata=dict(static=True))
    tokenizer: Any = dataclasses.field(default=None, metadata=dict(static=True))
    quant: QuantFormat | None = dataclasses.field(default=None, metadata=dict(static=True))
    parallel: TensorParallel | None = dataclasses.field(default=None, metadata=dict(static=True))

    def model(self) -> CausalLM:
        return nnx.merge(self.graphdef, self.state)

    @property
    def dtype(self) -> jnp.dtype:
        return self.state["embed_tokens"][...].dtype

    @property
    def kv_bits(self) -> int | tuple[int, ...]:
        """Bits of the KV pages: one number, or one per layer for a mixed-precision cache."""
        if self.quant is None:
            return 16
        return self.quant.kv_bits if self.quant.layer_kv_bits is None else self.quant.layer_kv_bits

    @property
    def kv_clip(self) -> tuple[tuple[float, float], ...] | None:
        """Per layer (K, V) clip ratios of the KV quantizer, or None (full range)."""
        return None if self.quant is None else self.quant.kv_clip

    @property
    def kv_range_search(self) -> bool:
        """Whether KV writes search each vector's range (`QuantFormat.kv_range_search`)."""
        return self.quant is not None and self.quant.kv_range_search

    @property
    def kernel(self) -> str:
        """Pallas kernels or their jnp references ("auto": Pallas on GPU), for matmuls and decode attention."""
        return "auto" if self.quant is None else self.quant.kernel


def init_params(
    config: ModelConfig,
    *,
    dtype=None,
    seed: int = 0,
    tokenizer=None,
    quant: QuantFormat | None = None,
    mesh: Mesh | None = None,
) -> Params:
    """Random weights with the model's shapes (tests, benchmarks), in `quant`'s formats when given, made on the
    device, directly split over `mesh`'s tensor axis when given (never whole on one device). Two compiled
    programs: the model outside its layers, and one layer, run once per layer with that layer's key (the layers
    have the same shapes), so the compile time does not grow with the depth; the weights are those
    `CausalLM(config, rngs=nnx.Rngs(jax.random.key(seed)))` makes. To compare splits, make the weights once and
    `shard_params` them: the split program may round a rare quantized code differently."""
    dtype = resolve_dtype(dtype)
    parallel = None if mesh is None else TensorParallel.create(mesh, config, quant)
    graphdef = nnx.split(nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0), quant=quant)))[0]
    build = (lambda make, *args: make(*args)) if parallel is None else parallel.build
    static = dict(config=config, dtype=dtype, quant=quant)
    seed = jnp.int32(seed)
    outside = build(functools.partial(_random_state_outside_layers, **static), seed)
    make_layer = functools.partial(_random_layer, **static)
    flat = list(nnx.to_flat_state(outside))
    for index in range(config.num_layers):
        layer = build(make_layer, seed, jnp.int32(index))
        flat += [(("layers", index, *path), leaf) for path, leaf in nnx.to_flat_state(layer)]
    state = nnx.from_flat_state(flat)
    return Params(state=state, graphdef=graphdef, config=config, tokenizer=tokenizer, quant=quant, parallel=parallel)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "quant"))
def _random_state_outside_layers(seed, *, config: ModelConfig, dtype, quant: QuantFormat | None) -> nnx.State:
    """The embedding, final norm and LM head (the layers' computations are dead code, removed before compiling)."""
    state = nnx.split(CausalLM(config, dtype=dtype, rngs=nnx.Rngs(jax.random.key(seed)), quant=quant))[1]
    return nnx.State({name: part for name, part in state.items() if name != "layers"})


@functools.partial(jax.jit, static_argnames=("config", "dtype", "quant"))
def _random_layer(seed, index, *, config: ModelConfig, dtype, quant: QuantFormat | None) -> nnx.State:
    """Layer `index` (traced: one program serves every layer; a layer's arrays do not depend on its index)."""
    key = CausalLM.init_keys(nnx.Rngs(jax.random.key(seed)), config.num_layers)[2 + index]
    return nnx.split(DecoderLayer(config, 0, dtype=dtype, key=key, quant=quant))[1]


def shard_params(params: Params, mesh: Mesh | None) -> Params:
    """`params` split over `mesh`'s tensor axis (None: unchanged); refuses a model that does not split."""
    if mesh is None:
        return params
    parallel = TensorParallel.create(mesh, params.config, params.quant)
    if parallel == params.parallel:
        return params
    return dataclasses.replace(params, state=parallel.place(params.state), parallel=parallel)


def expected_shapes(config: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter path of the model with its shape, computed without allocating."""
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    return {path: tuple(var.shape) for path, var in nnx.to_flat_state(state)}


def assemble_params(
    config: ModelConfig,
    tensors: Mapping[ParamPath, np.ndarray],
    *,
    dtype=None,
    tokenizer=None,
    source: str = "checkpoint",
    mesh: Mesh | None = None,
) -> Params:
    """Builds `Params` from a full mapping of parameter paths to host arrays, or raises `CheckpointError`.

    With `mesh` each device receives only its shards (split over the mesh's tensor axis) straight from the host."""
    expected = expected_shapes(config)
    problems = [f"missing tensor {_name(p)} (shape {s})" for p, s in expected.items() if p not in tensors]
    problems += [f"unexpected tensor {_name(p)}" for p in tensors if p not in expected]
    problems += [
        f"tensor {_name(p)} has shape {tuple(a.shape)}, the config needs {expected[p]}"
        for p, a in tensors.items()
        if p in expected and tuple(a.shape) != expected[p]
    ]
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{source} does not match the model config:\n  {listed}")
    dtype = resolve_dtype(dtype)
    model = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = [(path, var.replace(np.asarray(tensors[path], dtype=dtype))) for path, var in nnx.to_flat_state(state)]
    state = nnx.from_flat_state(flat)
    parallel = None if mesh is None else TensorParallel.create(mesh, config)
    state = jax.device_put(state) if parallel is None else parallel.place(state)
    return Params(state=state, graphdef=graphdef, config=config, tokenizer=tokenizer, parallel=parallel)


def _name(path: ParamPath) -> str:
    return ".".join(str(part) for part in path)
