"""What the compiled decode step promises about memory: the state is donated, so every KV pool buffer, the block
tables and the lengths are updated in place (aliased to an output), on one device and split over a mesh."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import qoq_jax
from qoq_jax import DecodeState, ModelConfig, PagedKVCache, QuantFormat

CONFIG = ModelConfig(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    max_context=128,
)


@pytest.mark.parametrize("devices", [None, 2])
def test_decode_step_updates_the_whole_state_in_place(devices):
    mesh = None if devices is None else qoq_jax.make_mesh(devices)
    params = qoq_jax.init_params(CONFIG, quant=QuantFormat("w4a8-g128", kv_bits=4, group_size=128), mesh=mesh)
    cache = functools.partial(PagedKVCache.for_batch, CONFIG, 2, 64, page_size=16, dtype=params.dtype, kv_bits=4)
    state = jax.eval_shape(lambda: DecodeState(cache(), jnp.zeros((2,), jnp.int32)))
    hlo = qoq_jax.decode_step.lower(params, state, jnp.zeros((2,), jnp.int32)).compile().as_text()
    aliases = re.search(r"input_output_alias=\{([^\n]*)\}", hlo)
    assert aliases is not None, "nothing is donated"
    aliased_inputs = {int(index) for index in re.findall(r"\{\d+\}: \((\d+),", aliases.group(1))}
    num_weights = len(jax.tree.leaves(params.state))
    state_inputs = set(range(num_weights, num_weights + len(jax.tree.leaves(state))))
    assert aliased_inputs == state_inputs  # every state buffer, and no weight
