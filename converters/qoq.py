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

from converters import equivalence, gptq, kv_calibration
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
_FLOAT32_PARAMS = ("key_transform", "query_transform", "key_offset")  # the q/k transform stays float32

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
    # The KV cache's stages (converters.kv_calibration), judged on `kv_rows` calibration rows per layer:
    smooth_attention_search: bool = False  # SmoothAttention's (α, β) per layer from a grid, instead of α fixed
    center_keys: bool = False  # k ← k − μ after RoPE (softmax-invariant)
    rotate_qk: bool = False  # online per-head Hadamard on q and k after RoPE
    learn_qk: bool = False  # A and μ of k ← (k − μ)·A, q ← q·A⁻ᵀ trained with Adam from the above
    # Adam steps, rate and the training loss's query stride: cheap enough for the CLI's default calibration (see
    # README for the slower setting that lowers the attention error a little more).
    learn_qk_steps: int = 40
    learn_qk_rate: float = 5e-3
    learn_qk_query_stride: int = 8
    kv_clip_search: bool = False  # per-layer K and V clip ratios
    kv_range_search: bool = False  # each K/V vector's range searched as it is written (QuantFormat.kv_range_search)
    kv8_layers: int = 0  # this many layers, those with the largest 4-bit attention error, get KV8 pages
    kv_rows: int = 4

    def __post_init__(self):
        if self.weights in _WEIGHT_ONLY and (
            self.qk_transform or self.kv_clip_search or self.kv_range_search or self.kv8_layers
        ):
            raise ValueError(f"recipe {self.name!r}: KV stages need a quantized format, not {self.weights}")
        if self.kv8_layers and self.kv_bits != 4:
            raise ValueError(f"recipe {self.name!r}: kv8_layers mixes KV8 into a KV4 cache; kv_bits is {self.kv_bits}")
        if self.smooth_attention_search and not self.smooth_attention:
            raise ValueError(f"recipe {self.name!r}: smooth_attention_search needs smooth_attention")

    @property
    def grouped(self) -> bool:
        return self.weights in (Int4GroupWeight.format_name, *_WEIGHT_ONLY)

    @property
    def qk_transform(self) -> bool:
        """Whether the model gets attention's q/k transform parameters (`QuantFormat.qk_transform`)."""
        return self.center_keys or self.rotate_qk or self.learn_qk

    @property
    def kv_stages(self) -> bool:
        """Whether the recipe calibrates the KV cache of the quantized model (`calibrate_kv`)."""
        return self.qk_transform or self.kv_clip_search or self.kv_range_search or self.kv8_layers > 0

    def weight_recipe(self) -> "Recipe":
        """The recipe without its KV stages: what `quantize_model` runs before `calibrate_kv`. Recipes with the
        same weight recipe share their quantized weights (the accuracy benchmark quantizes them once)."""
        return dataclasses.replace(
            self,
            center_keys=False,
            rotate_qk=False,
            learn_qk=False,
            kv_clip_search=False,
            kv_range_search=False,
            kv8_layers=0,
        )

    @property
    def needs_statistics(self) -> bool:
        """Whether any stage reads calibration activations (plain rounding does not)."""
        return (
            self.reorder
            or self.smooth_attention
            or self.smooth_linear
            or self.clip_search
            or self.gptq
            or self.smooth_attention_search
        )

    def stages(self) -> list[str]:
        flags = (
            "rotate",
            "reorder",
            "smooth_attention",
            "smooth_attention_search",
            "smooth_linear",
            "center_keys",
            "rotate_qk",
            "learn_qk",
            "kv_clip_search",
            "kv_range_search",
            "clip_search",
            "gptq",
        )
        return [flag for flag in flags if getattr(self, flag)] + (["kv8_layers"] if self.kv8_layers else [])


_RTN = {"rotate": False, "smooth_attention": False, "smooth_linear": False, "gptq": False}

_KV_STAGES = {"center_keys": True, "rotate_qk": True, "learn_qk": True, "kv_range_search": True}

RECIPES = {
    "g128": Recipe("g128", Int4GroupWeight.format_name, reorder=True, **_KV_STAGES),
    "g128-thorough": Recipe(
        "g128-thorough",
        Int4GroupWeight.format_name,
        reorder=True,
        **_KV_STAGES,
        learn_qk_steps=100,
        learn_qk_rate=2e-3,
        learn_qk_query_stride=4,
    ),
    "g128-qserve": Recipe("g128-qserve", Int4GroupWeight.format_name, reorder=True),
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
for both) and the baselines of the accuracy table. `g128` adds this library's KV4 stages (centred, rotated and
learned q/k transform, per-token KV range search: `converters.kv_calibration`), measured in
benchmarks/accuracy.py (the per-layer KV clip search, `kv_clip_search`, is not in it: in trials on SmolLM2 it
lowered the calibration rows' attention error but raised perplexity, with or without the range search);
`g128-thorough` trains the q/k transform longer (about 3× the KV stages' time, a lower attention error);
`g128-qserve` is the reference recipe without them."""


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
    (recipe, group size, calibration size, per-layer KV choices, seconds) for the checkpoint's metadata.

    The weights are quantized first (`recipe.weight_recipe()`), then `calibrate_kv` runs the KV stages on the
    quantized model."""
    if recipe.kv_stages:
        weights_only = quantize_model(
            params, recipe.weight_recipe(), calibration_tokens, batch_size=batch_size, progress=progress
        )
        return calibrate_kv(weights_only, recipe, calibration_tokens, progress=progress)
    started = time.perf_counter()
    if params.quant is not None:
        raise ValueError("the model is already quantized; calibration needs the float model")
    config = params.config
    group_size = resolve_group_size(recipe, config)
    quant = None
    if recipe.weights not in _WEIGHT_ONLY:
        quant = QuantFormat(recipe.weights, recipe.kv_bits, group_size)
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
        kv_rows = _kv_rows(recipe, tokens.shape[0])
    bar = tqdm(total=config.num_layers * (2 + len(_LINEARS_BY_INPUT)), desc=f"QoQ {recipe.name}", disable=not progress)
    quantized_layers, smoothing, disabled_stages = {}, [], []
    for index in range(config.num_layers):
        layer, stats = weights["layers"][index], None
        if recipe.needs_statistics:
            bar.set_postfix_str(f"layer {index} · statistics")
            layer_graph, layer_state = nnx.split(float_model.layers[index])
            attention_sample = None
            if recipe.smooth_attention_search:
                attention_sample = kv_calibration.AttentionSample.create(
                    *_attention_inputs(layer_graph, layer_state, hidden[kv_rows])[:3],
                    float_model.layers[index].self_attn.layer_attention,
                )
            hidden, stats = _calibration_pass(
                layer_graph, layer_state, hidden, sample_rows, sample_starts, config=config, batch_size=batch_size
            )
            bar.update()
            bar.set_postfix_str(f"layer {index} · transforms")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", equivalence.SmoothingDisabledWarning)
                layer, stats, chosen = _transform_layer(layer, stats, recipe, config, attention_sample)
            smoothing.append(chosen)
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

    report = {
        "recipe": dataclasses.asdict(recipe),
        "stages": recipe.stages(),
        "disabled_stages": disabled_stages,  # stages a NaN/Inf scale turned off, per layer
        "group_size": group_size,
        "calibration": {"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])},
    }
    if recipe.smooth_attention_search:
        report["smooth_attention"] = smoothing
    weights = {**weights, "layers": quantized_layers}
    result = _build_params(weights, config, quant, dtype=params.dtype, tokenizer=params.tokenizer)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return result, report


def calibrate_kv(
    quantized: tuple[Params, dict], recipe: Recipe, calibration_tokens: np.ndarray, *, progress: bool = True
) -> tuple[Params, dict]:
    """The KV stages of `recipe` (`converters.kv_calibration`) on a model whose weights `quantize_model`
    quantized with `recipe.weight_recipe()` (its Params and report). Walks the quantized model layer by layer on
    `recipe.kv_rows` calibration rows, so each layer is calibrated on the keys and values its quantized q/k/v
    projections produce, the next layer fed this one's output with unquantized attention. Then the `kv8_layers`
    layers with the largest 4-bit attention error get KV8 pages (full range), the rest the searched clip ratios.
    Returns the Params with the new format and transforms and the report with a record per layer."""
    started = time.perf_counter()
    params, report = quantized
    if params.quant is None:
        raise ValueError(f"recipe {recipe.name!r}: KV stages need a quantized model")
    if {**report["recipe"], "name": recipe.name} != dataclasses.asdict(recipe.weight_recipe()):
        raise ValueError(f"the weights were quantized by {report['recipe']['name']!r}, not as {recipe.name!r} needs")
    config = params.config
    if recipe.kv8_layers > config.num_layers:
        raise ValueError(f"kv8_layers={recipe.kv8_layers} exceeds the model's {config.num_layers} layers")
    tokens = jnp.asarray(calibration_tokens, jnp.int32)[_kv_rows(recipe, calibration_tokens.shape[0])]
    model = params.model()
    hidden = model.embed(tokens, ())
    weights = nnx.to_pure_dict(params.state)
    records = []
    for index in tqdm(range(config.num_layers), desc=f"KV {recipe.name}", disable=not progress):
        layer_graph, layer_state = nnx.split(model.layers[index])
        *qkv, hidden = _attention_inputs(layer_graph, layer_state, hidden)
        sample = kv_calibration.AttentionSample.create(*qkv, model.layers[index].self_attn.layer_attention)
        transform, record = _calibrate_kv_layer(sample, recipe)
        if recipe.qk_transform:
            attention = weights["layers"][index]["self_attn"]
            attention.update({name: np.asarray(value) for name, value in dataclasses.asdict(transform).items()})
        records.append(record)
    bits = [params.quant.kv_bits] * config.num_layers
    for index in np.argsort([-record["error"] for record in records], kind="stable")[: recipe.kv8_layers]:
        bits[int(index)] = 8
    clips = [(r["k_clip"], r["v_clip"]) if b == params.quant.kv_bits else (1.0, 1.0) for r, b in zip(records, bits)]
    quant = dataclasses.replace(
        params.quant,
        layer_kv_bits=tuple(bits) if recipe.kv8_layers else None,
        kv_clip=tuple(clips) if recipe.kv_clip_search else None,
        kv_range_search=recipe.kv_range_search,
        qk_transform=recipe.qk_transform,
    )
    result = _build_params(weights, config, quant, dtype=params.dtype, tokenizer=params.tokenizer)
    report = {
        **report,
        "recipe": dataclasses.asdict(recipe),
        "stages": recipe.stages(),
        "kv_layers": [{"kv_bits": b, **record} for b, record in zip(bits, records)],
        "kv_seconds": round(time.perf_counter() - started, 1),
        "seconds": round(report["seconds"] + time.perf_counter() - started, 1),
    }
    return result, report


def _calibrate_kv_layer(sample, recipe: Recipe):
    """One layer's q/k transform (centre, rotate, learn) and clip ratios; returns the transform and a record of
    the choices with the attention errors at KV4 before and after."""
    bits, search = recipe.kv_bits, recipe.kv_range_search
    num_kv_heads, head_dim = sample.key.shape[2:]
    transform = kv_calibration.QKTransform.identity(num_kv_heads, head_dim)
    record = {"error_plain": round(float(kv_calibration.attention_error(sample, transform, bits)), 6)}
    if recipe.qk_transform:
        transform = kv_calibration.initial_transform(sample, rotate=recipe.rotate_qk, center=recipe.center_keys)
        if recipe.learn_qk:
            before = kv_calibration.attention_error(sample, transform, bits, search=search)
            record["error_before_learning"] = round(float(before), 6)
            transform = kv_calibration.learn_transform(
                sample,
                transform,
                bits=bits,
                steps=recipe.learn_qk_steps,
                learning_rate=recipe.learn_qk_rate,
                query_stride=recipe.learn_qk_query_stride,
                search=search,
            )
    k_clip, v_clip = 1.0, 1.0
    if recipe.kv_clip_search:
        k_clip, v_clip, _ = kv_calibration.search_clip(sample, transform, bits, search)
    error = float(kv_calibration.attention_error(sample, transform, bits, k_clip, v_clip, search=search))
    return transform, {**record, "k_clip": k_clip, "v_clip": v_clip, "error": round(error, 6)}


def _kv_rows(recipe: Recipe, num_samples: int) -> np.ndarray:
    """`recipe.kv_rows` calibration rows evenly spread over the set."""
    return np.unique(np.linspace(0, num_samples - 1, min(recipe.kv_rows, num_samples)).astype(int))


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


@functools.partial(jax.jit, static_argnums=0)
def _attention_inputs(layer_graph, layer_state, x_btd):
    """A layer's post-RoPE queries, keys and values (before any q/k transform) on some calibration rows, and
    its output with unquantized attention."""
    layer = nnx.merge(layer_graph, layer_state)
    seen = {}
    batch, length, _ = x_btd.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    output, _ = layer(x_btd, positions, jnp.ones((batch, length), bool), NoKVCache(), 0, seen.__setitem__)
    return seen["query"], seen["key"], seen["value"], output


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


def _transform_layer(layer: Mapping, stats: LayerStatistics, recipe: Recipe, config: ModelConfig, sample):
    """Reorder and smooth one layer (exact transforms), carrying down_proj's input statistics along; with
    `smooth_attention_search`, SmoothAttention's (α, β) is chosen on the attention `sample`. Returns the layer,
    the statistics and the chosen (α, β) (None without SmoothAttention)."""
    down_hessian = stats.hessians["down_input"]
    down_absmax = np.asarray(stats.absmax["down_input"])
    down_sample = stats.samples["down_input"]
    if recipe.reorder:
        order = equivalence.down_proj_permutation(down_absmax)
        layer = equivalence.reorder_down_proj(layer, order)
        down_absmax = down_absmax[order]
        down_sample = down_sample[..., order]
        down_hessian = dataclasses.replace(down_hessian, xtx_sum=down_hessian.xtx_sum[order][:, order])
    chosen = None
    if recipe.smooth_attention:
        key_max, query_max = np.asarray(stats.absmax["key"]), np.asarray(stats.absmax["query"])
        chosen = (recipe.smooth_attention_alpha, 0.0)
        if recipe.smooth_attention_search:
            chosen = kv_calibration.search_smoothing(sample, layer, config, key_max, query_max, bits=recipe.kv_bits)[:2]
        layer, _ = equivalence.smooth_attention(layer, config, key_max, query_max, alpha=chosen[0], beta=chosen[1])
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
    return layer, stats, chosen


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

    def cast(path, leaf):
        if isinstance(leaf, quantized_types):
            return leaf
        float32 = path[-1].key in _FLOAT32_PARAMS
        return jnp.asarray(leaf, jnp.float32 if float32 else dtype)

    weights = jax.tree_util.tree_map_with_path(cast, weights, is_leaf=lambda leaf: isinstance(leaf, quantized_types))
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
