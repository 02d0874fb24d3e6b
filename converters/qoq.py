"""QoQ calibration (../shared/spec/qoq-algorithm.md §1): equivalence transforms, then every decoder linear
quantized with GPTQ, walking the layers once.

Order: untie → fold norms → residual Hadamard (models with post-norms: fold norms → online Hadamard of the block
inputs) → per-head Hadamard on v/o (model-wide, exact, data-free), then
per layer: one jitted pass over the calibration set collects |max| of post-RoPE q/k and of down_proj's input,
the four input Hessians (q/k/v share one, gate/up share one) and a strided token sample; the layer is reordered
(g128) and smoothed (SmoothAttention, SmoothLinear on down_proj), the down_proj Hessian follows the transforms
analytically, and each linear is quantized (clip search for gchn, GPTQ with act-order and static groups). The
next layer is fed this layer's float output: the transforms are exact, so calibration always sees the
full-precision activations and quantization errors do not propagate (as in the reference). Memory stays
bounded by one layer's weights plus the hidden states of the calibration set.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from converters import equivalence, gptq
from qoq_jax.config import ModelConfig
from qoq_jax.errors import CalibrationError
from qoq_jax.kv_cache import NoKVCache
from qoq_jax.model import CausalLM
from qoq_jax.params import Params, assemble_params
from qoq_jax.quant import (
    PROTECTIVE_RANGE,
    Int4ChannelWeight,
    Int4GroupWeight,
    Int8ChannelWeight,
    QuantFormat,
    progressive_level1,
    progressive_level2,
)

WEIGHT_ONLY_G128 = "w4a16-g128"
"""Weight-only 4-bit baseline (GPTQ/AWQ-style, fp16 scale and zero per group): stored as dequantized floats."""
WEIGHT_ONLY_PROGRESSIVE = "w4a16-progressive"
"""The g128 weight format alone (float activations and KV), stored dequantized: isolates the format's cost."""
_WEIGHT_ONLY = (WEIGHT_ONLY_G128, WEIGHT_ONLY_PROGRESSIVE)

_LINEARS = {  # linear → the observed input it multiplies
    ("self_attn", "q_proj"): "attn_input",
    ("self_attn", "k_proj"): "attn_input",
    ("self_attn", "v_proj"): "attn_input",
    ("self_attn", "o_proj"): "o_input",
    ("mlp", "gate_proj"): "mlp_input",
    ("mlp", "up_proj"): "mlp_input",
    ("mlp", "down_proj"): "down_input",
}
_LINEARS_BY_INPUT = {
    observed: tuple(linear for linear, name in _LINEARS.items() if name == observed)
    for observed in dict.fromkeys(_LINEARS.values())
}
_SAMPLE_BLOCKS, _SAMPLE_BLOCK_LEN = 8, 64

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One quantization recipe: the storage format and which calibration stages run (ablations flip them)."""

    name: str
    weights: str  # a QuantFormat weight format, or a weight-only baseline (_WEIGHT_ONLY)
    kv_bits: int = 4
    group_size: int | None = None  # g128 formats: None picks 128, or 64 where a linear's K needs it
    rotate: bool = True
    reorder: bool = False
    smooth_attention: bool = True
    smooth_attention_alpha: float = 0.5
    smooth_linear: bool = True
    smooth_linear_alpha: float = 0.3
    smooth_linear_beta: float = 0.7
    clip_search: bool = False
    gptq: bool = True
    gptq_damp: float = 0.01
    gptq_block_size: int = 128

    @property
    def grouped(self) -> bool:
        return self.weights in (Int4GroupWeight.format_name, *_WEIGHT_ONLY)

    @property
    def needs_statistics(self) -> bool:
        """Whether any stage reads calibration activations (plain rounding does not)."""
        return self.reorder or self.smooth_attention or self.smooth_linear or self.clip_search or self.gptq

    def stages(self) -> list[str]:
        flags = ("rotate", "reorder", "smooth_attention", "smooth_linear", "clip_search", "gptq")
        return [flag for flag in flags if getattr(self, flag)]


_RTN = {"rotate": False, "smooth_attention": False, "smooth_linear": False, "gptq": False}

RECIPES = {
    "g128": Recipe("g128", Int4GroupWeight.format_name, reorder=True),
    "gchn": Recipe(
        "gchn", Int4ChannelWeight.format_name, smooth_linear_alpha=0.1, smooth_linear_beta=0.9, clip_search=True
    ),
    "rtn-w4a8kv4-g128": Recipe("rtn-w4a8kv4-g128", Int4GroupWeight.format_name, **_RTN),
    "rtn-w8a8": Recipe("rtn-w8a8", Int8ChannelWeight.format_name, kv_bits=16, **_RTN),
    "rtn-w4a16-g128": Recipe("rtn-w4a16-g128", WEIGHT_ONLY_G128, kv_bits=16, **_RTN),
    "gptq-w4a16-g128": Recipe("gptq-w4a16-g128", WEIGHT_ONLY_G128, kv_bits=16, **{**_RTN, "gptq": True}),
    "rtn-w4a16-progressive": Recipe("rtn-w4a16-progressive", WEIGHT_ONLY_PROGRESSIVE, kv_bits=16, **_RTN),
}
"""QoQ's two recipes (defaults of qoq-g128.yaml / qoq-gchn.yaml; SmoothAttention is the manual λ = √max|K|
for both) and the baselines of the accuracy table."""


def resolve_group_size(recipe: Recipe, config: ModelConfig) -> int | None:
    """The g128 group: 128, or 64 when some linear's in_features is not a multiple of 128 (SmolLM2's 576);
    an explicit size that does not divide every in_features is refused, never changed."""
    if not recipe.grouped:
        return None
    in_features = {config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size}
    candidates = (recipe.group_size,) if recipe.group_size else (128, 64)
    for size in candidates:
        if all(k % size == 0 for k in in_features):
            return size
    raise ValueError(
        f"recipe {recipe.name!r}: no group size in {candidates} divides every linear's in_features "
        f"{sorted(in_features)}"
    )


def quantize_model(
    params: Params,
    recipe: Recipe,
    calibration_tokens: np.ndarray,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[Params, dict]:
    """Calibrates and quantizes a float model; returns the quantized Params and a JSON-able report of what ran
    (recipe, group size, calibration size, seconds) for the checkpoint's metadata."""
    started = time.perf_counter()
    if params.quant is not None:
        raise ValueError("the model is already quantized; calibration needs the float model")
    config = params.config
    group_size = resolve_group_size(recipe, config)
    quant = None if recipe.weights in _WEIGHT_ONLY else QuantFormat(recipe.weights, recipe.kv_bits, group_size)
    if quant is not None:
        for (module, name), _ in _LINEARS.items():
            in_features, out_features = _linear_shape(config, name)
            quant.check_linear(in_features, out_features, f"{module}.{name}")

    weights = jax.tree.map(lambda a: np.asarray(a, np.float32), nnx.to_pure_dict(params.state))
    if recipe.rotate:
        if config.post_norms:  # the residual stream cannot rotate through post-norms: the block inputs rotate online
            weights = equivalence.fold_norms(weights, config)
            weights, config = equivalence.rotate_block_inputs(weights, config)
        else:
            weights, config = equivalence.untie_embeddings(weights, config)
            weights = equivalence.fold_norms(weights, config)
            weights = equivalence.rotate_residual(weights, config)
        weights = equivalence.rotate_value_heads(weights, config)
    float_model = assemble_params(config, _flatten(weights), dtype=jnp.float32).model()

    tokens = jnp.asarray(calibration_tokens, jnp.int32)
    if recipe.needs_statistics:
        hidden = float_model.embed(tokens, ())
        sample_rows, sample_starts = _sample_blocks(*tokens.shape)
    bar = tqdm(total=config.num_layers * (2 + len(_LINEARS_BY_INPUT)), desc=f"QoQ {recipe.name}", disable=not progress)
    quantized_layers, disabled_stages = {}, []
    for index in range(config.num_layers):
        layer, stats = weights["layers"][index], None
        if recipe.needs_statistics:
            bar.set_postfix_str(f"layer {index} · statistics")
            layer_graph, layer_state = nnx.split(float_model.layers[index])
            hidden, stats = _calibration_pass(
                layer_graph, layer_state, hidden, sample_rows, sample_starts, config=config, batch_size=batch_size
            )
            bar.update()
            bar.set_postfix_str(f"layer {index} · transforms")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", equivalence.SmoothingDisabledWarning)
                layer, stats = _transform_layer(layer, stats, recipe, config)
            for warning in caught:
                if not issubclass(warning.category, equivalence.SmoothingDisabledWarning):
                    warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
                    continue
                stage, reason = str(warning.message).split(" disabled: ", 1)
                disabled_stages.append({"layer": index, "stage": stage, "reason": reason})
                log.warning("layer %d: %s", index, warning.message)
        bar.update(2 - recipe.needs_statistics)
        quantized = {group: dict(modules) for group, modules in layer.items()}
        for observed, members in _LINEARS_BY_INPUT.items():
            bar.set_postfix_str(f"layer {index} · {'/'.join(name for _, name in members)}")
            hessian = None if stats is None else stats.hessians[observed].hessian()
            sample = None if stats is None else stats.samples[observed]
            kernels = tuple(layer[module][name]["kernel"] for module, name in members)
            quantized_kernels, factorized = _quantize_kernels(kernels, hessian, sample, recipe, group_size)
            if not bool(factorized):
                raise CalibrationError(
                    f"layers.{index}.{'/'.join(f'{module}.{name}' for module, name in members)}: GPTQ failed: the "
                    f"inputs' Hessian is not positive definite even after {gptq.MAX_CHOLESKY_TRIES} extra dampings "
                    "(NaN or Inf in the calibration activations?)"
                )
            for (module, name), kernel in zip(members, quantized_kernels, strict=True):
                quantized[module] = {**quantized[module], name: {**layer[module][name], "kernel": kernel}}
            bar.update()
        quantized_layers[index] = quantized
    bar.close()

    weights = {**weights, "layers": quantized_layers}
    result = _build_params(weights, config, quant, dtype=params.dtype, tokenizer=params.tokenizer)
    report = {
        "recipe": dataclasses.asdict(recipe),
        "stages": recipe.stages(),
        "disabled_stages": disabled_stages,  # stages a NaN/Inf scale turned off, per layer
        "group_size": group_size,
        "calibration": {"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return result, report


# --------------------------------------------------------------------------------------------------
# One pass over the calibration set per layer
# --------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerStatistics:
    """What one layer's calibration pass measures (inputs of the layer's linears, post-RoPE q/k)."""

    hessians: dict[str, gptq.HessianAccumulator]
    absmax: dict[str, jax.Array]  # query [Hq·D], key [Hkv·D], down_input [I]
    samples: dict[str, jax.Array]  # [blocks·64, in] strided token sample per linear input


def _calibration_pass(layer_graph, layer_state, hidden, sample_rows, sample_starts, *, config, batch_size):
    stats = None
    outputs = []
    for start in range(0, hidden.shape[0], batch_size):
        batch = hidden[start : start + batch_size]
        output, stats = _observe_batch(layer_graph, layer_state, batch, stats, sample_rows - start, sample_starts)
        outputs.append(output)
    return jnp.concatenate(outputs), stats


@functools.partial(jax.jit, static_argnums=0)
def _observe_batch(layer_graph, layer_state, x_btd, stats, sample_rows, sample_starts):
    """The float layer's output on a batch, with the batch folded into the running statistics. Sample blocks
    whose row lies outside this batch (sample_rows out of [0, B)) are left as they are."""
    layer = nnx.merge(layer_graph, layer_state)
    batch, length, _ = x_btd.shape
    seen = {}
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    output, _ = layer(x_btd, positions, jnp.ones((batch, length), bool), NoKVCache(), 0, seen.__setitem__)
    inputs = {name: seen[name] for name in set(_LINEARS.values())}
    if stats is None:
        stats = LayerStatistics(
            hessians={name: gptq.HessianAccumulator.zeros(x.shape[-1]) for name, x in inputs.items()},
            absmax={
                name: jnp.zeros(_flat_channels(seen[name]), jnp.float32) for name in ("query", "key", "down_input")
            },
            samples={
                name: jnp.zeros((_SAMPLE_BLOCKS, _SAMPLE_BLOCK_LEN, x.shape[-1]), jnp.float32)
                for name, x in inputs.items()
            },
        )
    in_batch = (sample_rows >= 0) & (sample_rows < batch)
    offsets = sample_starts[:, None] + jnp.arange(_SAMPLE_BLOCK_LEN)[None, :]
    rows = jnp.clip(sample_rows, 0, batch - 1)[:, None]
    return output, LayerStatistics(
        hessians={name: gptq.accumulate_hessian(acc, inputs[name]) for name, acc in stats.hessians.items()},
        absmax={
            name: jnp.maximum(acc, jnp.max(jnp.abs(seen[name].astype(jnp.float32)).reshape(-1, acc.shape[0]), axis=0))
            for name, acc in stats.absmax.items()
        },
        samples={
            name: jnp.where(in_batch[:, None, None], inputs[name][rows, offsets].astype(jnp.float32), acc)
            for name, acc in stats.samples.items()
        },
    )


def _flat_channels(x: jax.Array) -> int:
    """Channels per token of an observed tensor: [B, T, H, D] → H·D, [B, T, C] → C."""
    return int(np.prod(x.shape[2:]))


def _sample_blocks(num_samples: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """8 blocks of 64 contiguous tokens evenly strided over the flattened calibration set (spec §1.5)."""
    block_len = min(_SAMPLE_BLOCK_LEN, seq_len)
    flat_starts = np.arange(_SAMPLE_BLOCKS) * (num_samples * seq_len // _SAMPLE_BLOCKS)
    rows = flat_starts // seq_len
    starts = np.minimum(flat_starts % seq_len, seq_len - block_len)
    return jnp.asarray(rows, jnp.int32), jnp.asarray(starts, jnp.int32)


# --------------------------------------------------------------------------------------------------
# Per-layer transforms and per-linear quantization
# --------------------------------------------------------------------------------------------------


def _transform_layer(layer: Mapping, stats: LayerStatistics, recipe: Recipe, config: ModelConfig):
    """Reorder and smooth one layer (exact transforms), carrying down_proj's input statistics along."""
    down_hessian = stats.hessians["down_input"]
    down_absmax = np.asarray(stats.absmax["down_input"])
    down_sample = stats.samples["down_input"]
    if recipe.reorder:
        order = equivalence.down_proj_permutation(down_absmax)
        layer = equivalence.reorder_down_proj(layer, order)
        down_absmax = down_absmax[order]
        down_sample = down_sample[..., order]
        down_hessian = dataclasses.replace(down_hessian, xtx_sum=down_hessian.xtx_sum[order][:, order])
    if recipe.smooth_attention:
        layer, _ = equivalence.smooth_attention(
            layer,
            config,
            np.asarray(stats.absmax["key"]),
            np.asarray(stats.absmax["query"]),
            alpha=recipe.smooth_attention_alpha,
            beta=0.0,
        )
    if recipe.smooth_linear:
        layer, scales = equivalence.smooth_down_proj(
            layer, down_absmax, recipe.smooth_linear_alpha, recipe.smooth_linear_beta
        )
        inverse = jnp.asarray(1.0 / scales, jnp.float32)
        down_sample = down_sample * inverse
        down_hessian = dataclasses.replace(down_hessian, xtx_sum=down_hessian.xtx_sum * jnp.outer(inverse, inverse))
    stats = dataclasses.replace(
        stats,
        hessians={**stats.hessians, "down_input": down_hessian},
        samples={**stats.samples, "down_input": down_sample},
    )
    return layer, stats


@functools.partial(jax.jit, static_argnames=("recipe", "group_size"))
def _quantize_kernels(kernels_kn: tuple, hessian, sample, recipe: Recipe, group_size: int | None) -> tuple:
    """Float kernels [in, out] that share one input (q/k/v, gate/up) → their quantized weights (or, weight-only,
    their dequantized floats), and whether GPTQ's Hessian factorized (True without GPTQ). Every grid is per
    output channel, so they are quantized as one matrix of their concatenated outputs — one GPTQ pass over the
    shared Hessian — and split afterwards. Jitted whole, so each shape compiles once per recipe."""
    widths = [kernel.shape[1] for kernel in kernels_kn]
    kernel_kn = jnp.concatenate([jnp.asarray(kernel, jnp.float32) for kernel in kernels_kn], axis=1)

    def split(array):
        return jnp.split(array, np.cumsum(widths)[:-1], axis=-1)

    if recipe.weights == Int8ChannelWeight.format_name:
        return tuple(Int8ChannelWeight.round_to_nearest(part) for part in split(kernel_kn)), jnp.bool_(True)
    if recipe.weights in (Int4GroupWeight.format_name, WEIGHT_ONLY_PROGRESSIVE):
        s1, u = progressive_level1(kernel_kn)
        s2, zero = progressive_level2(u, group_size)
        codes, factorized = _codes(u.T, hessian, s2.T, zero.T, group_size, PROTECTIVE_RANGE, recipe)
        weights = tuple(
            Int4GroupWeight.from_codes(*parts, group_size=group_size)
            for parts in zip(split(codes.T), split(s1), split(s2), split(zero), strict=True)
        )
        if recipe.weights != Int4GroupWeight.format_name:
            weights = tuple(w.dequantize() for w in weights)
        return weights, factorized
    w = kernel_kn.T
    if recipe.weights == Int4ChannelWeight.format_name:
        ratios = gptq.search_clip_ratios(w, sample.reshape(-1, w.shape[1])) if recipe.clip_search else 1.0
        scale, zero = gptq.channel_scale_zero(w, ratios)
        codes, factorized = _codes(w, hessian, scale[:, None], zero[:, None], w.shape[1], None, recipe)
        weights = tuple(
            Int4ChannelWeight.from_codes(*parts)
            for parts in zip(split(codes.T), split(scale), split(zero), strict=True)
        )
        return weights, factorized
    # Weight-only g128 baseline: asymmetric uint4 per group with fp16 scale and zero.
    grouped = w.reshape(w.shape[0] * (w.shape[1] // group_size), group_size)
    scale, zero = gptq.channel_scale_zero(grouped, 1.0)
    scale = scale.reshape(w.shape[0], -1)
    zero = zero.reshape(w.shape[0], -1)
    codes, factorized = _codes(w, hessian, scale, zero, group_size, None, recipe)
    return tuple(split(gptq.dequantize(codes, scale, zero, group_size).T)), factorized


def _codes(w, hessian, scale, zero, group_size, clip, recipe: Recipe):
    """Codes by GPTQ (and whether its Hessian factorized) or by plain rounding (always True)."""
    scale, zero = scale.astype(jnp.float32), zero.astype(jnp.float32)
    if not recipe.gptq:
        return gptq.rtn_quantize(w, scale, zero, group_size, clip=clip), jnp.bool_(True)
    return gptq.gptq_quantize(
        w, hessian, scale, zero, group_size, clip=clip, damp=recipe.gptq_damp, block_size=recipe.gptq_block_size
    )


# --------------------------------------------------------------------------------------------------
# Assembling the result
# --------------------------------------------------------------------------------------------------


def _build_params(weights: Mapping, config: ModelConfig, quant: QuantFormat | None, *, dtype, tokenizer) -> Params:
    quantized_types = (Int4GroupWeight, Int4ChannelWeight, Int8ChannelWeight)

    def cast(leaf):
        return leaf if isinstance(leaf, quantized_types) else jnp.asarray(leaf, dtype)

    weights = jax.tree.map(cast, weights, is_leaf=lambda leaf: isinstance(leaf, quantized_types))
    if quant is None:
        return assemble_params(config, _flatten(weights), dtype=dtype, tokenizer=tokenizer)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0), quant=quant)))
    nnx.replace_by_pure_dict(state, weights)
    return Params(state=state, graphdef=graphdef, config=config, tokenizer=tokenizer, quant=quant)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        elif value is not None:
            flat[(*prefix, key)] = value
    return flat


def _linear_shape(config: ModelConfig, name: str) -> tuple[int, int]:
    hidden, attn = config.hidden_size, config.num_heads * config.head_dim
    kv, inter = config.num_kv_heads * config.head_dim, config.intermediate_size
    return {
        "q_proj": (hidden, attn),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (attn, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }[name]
