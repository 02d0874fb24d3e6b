"""What the compiled decode step promises about memory: the state is donated, so every KV pool buffer, the block
tables and the lengths are updated in place (aliased to an output), on one device and split over a mesh; and on a
CPU no bfloat16 or int8 step copies a weight or a pool to 32 bits."""

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


ONE_ROW_CASES = pytest.mark.parametrize("quant", [None, QuantFormat("w8a8", kv_bits=16)], ids=["bfloat16", "w8a8"])


@ONE_ROW_CASES
def test_a_one_row_bfloat16_step_widens_no_weight_or_page(quant):
    """XLA:CPU widens the whole weight of a one-row bfloat16 or int8 dot, and the whole pool of a scatter into
    bfloat16 pages, on every call (SmolLM2 at one row: 322 ms per engine step instead of 29): the step must not."""
    params = qoq_jax.init_params(CONFIG, dtype=jnp.bfloat16, quant=quant)
    cache = functools.partial(PagedKVCache.for_batch, CONFIG, 1, 64, page_size=16, dtype=params.dtype, kv_bits=16)
    state = jax.eval_shape(lambda: DecodeState(cache(), jnp.zeros((1,), jnp.int32)))
    hlo = qoq_jax.decode_step.lower(params, state, jnp.zeros((1,), jnp.int32)).compile().as_text()
    stored = {tuple(x.shape) for x in jax.tree.leaves((params.state, state)) if x.ndim >= 2 and x.dtype.itemsize < 4}
    assert len(stored) >= 3, "the model has 8- and 16-bit weights and pages"
    entry = next(block for block in hlo.split("\n\n") if block.lstrip().startswith("ENTRY"))  # what is stored
    writes = re.findall(r"= (f32|s32)\[([\d,]+)\]\{[^}]*\} (?:scatter|dynamic-update-slice)\(", hlo)  # in fusions too
    results = re.findall(r"= (f32|s32)\[([\d,]+)\]", entry) + writes
    widened = sorted({f"{dtype}[{dims}]" for dtype, dims in results if tuple(map(int, dims.split(","))) in stored})
    assert not widened, f"copies of weights or pages in 32 bits: {widened}"


@ONE_ROW_CASES
def test_one_row_computes_what_it_computes_among_others(quant):
    """The one-row workaround multiplies the row as two: its logits are those it gets beside another row."""
    params = qoq_jax.init_params(CONFIG, dtype=jnp.bfloat16, quant=quant)
    alone = qoq_jax.forward(params, jnp.asarray([[7]], jnp.int32))
    beside = qoq_jax.forward(params, jnp.asarray([[7], [7]], jnp.int32))
    assert jnp.array_equal(alone[0], beside[0]) and bool(jnp.all(jnp.isfinite(alone)))
