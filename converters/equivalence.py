"""QoQ's exact equivalence transforms (spec §1.1–1.4) on the nested weight dict of `nnx.to_pure_dict`.

Each function returns new dicts and leaves its input untouched; the float model computes the same
function before and after. The math is done in float64 and every changed tensor is cast back to its
original dtype (and back to a jax array if it was one). Kernels are [in, out] (y = x @ kernel + bias), so
the spec's W·M on [out, in] weights is Mᵀ·kernel here, and its output-side M·W is kernel·Mᵀ.

Order of use: `untie_embeddings` → `fold_norms` → `rotate_residual` → `rotate_value_heads` →
`reorder_down_proj` → `smooth_attention` → `smooth_down_proj` (the last three per layer, with statistics
measured on the already-transformed model). Models with post-norms (Gemma) take `rotate_block_inputs` instead
of untying and `rotate_residual`: a norm on a block's output scales channels after the normalization, which no
rotation of the residual stream commutes with, so the inputs of the linears are rotated online instead.

Norms scale by `config.norm_weight_offset` + w (Gemma stores w around 0), so "γ" below is offset + w.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters.hadamard import hadamard_matrix
from qoq_jax.config import ModelConfig
from qoq_jax.errors import UnsupportedModelError

Weights = dict[str, Any]

_ATTN_INPUTS = ("q_proj", "k_proj", "v_proj")
_MLP_INPUTS = ("gate_proj", "up_proj")
# Each block's input norm and the linears it feeds.
_BLOCK_INPUTS = (("input_layernorm", "self_attn", _ATTN_INPUTS), ("post_attention_layernorm", "mlp", _MLP_INPUTS))


class SmoothingDisabledWarning(UserWarning):
    """A NaN/Inf smoothing scale turned a stage off for a layer (the reference's guard); calibration records it."""


def untie_embeddings(weights: Mapping, config: ModelConfig) -> tuple[Weights, ModelConfig]:
    """Gives the LM head its own copy of the embedding, so the rotation can treat E and lm_head separately."""
    if not config.tie_word_embeddings:
        return _copy_tree(weights), config
    untied = _copy_tree(weights)
    embed = weights["embed_tokens"]
    untied["lm_head"] = {"kernel": _cast_like(_f64(embed).T, embed)}
    return untied, dataclasses.replace(config, tie_word_embeddings=False)


def fold_norms(weights: Mapping, config: ModelConfig) -> Weights:
    """Moves the γ of every norm that feeds linears (each block's input norm, and the final norm when the LM head
    has its own weights) into those linears' input rows and sets γ = 1, which makes the norms commute with an
    orthogonal rotation of what they feed. A tied head keeps its final norm: the embedding it shares cannot carry
    γ. Post-norms and q/k norms feed no linear and stay."""
    folded = _copy_tree(weights)
    for layer in folded["layers"].values():
        for norm, block, projections in _BLOCK_INPUTS:
            gamma = _gamma(layer[norm]["weight"], config)
            for name in projections:
                _update(layer[block][name], "kernel", np.multiply, gamma[:, None])
            layer[norm]["weight"] = _unit_gamma(layer[norm]["weight"], config)
    if not config.tie_word_embeddings:
        gamma = _gamma(folded["norm"]["weight"], config)
        _update(folded["lm_head"], "kernel", np.multiply, gamma[:, None])
        folded["norm"]["weight"] = _unit_gamma(folded["norm"]["weight"], config)
    return folded


def rotate_residual(weights: Mapping, config: ModelConfig) -> Weights:
    """Rotates the residual stream h → h·R with R = hadamard_matrix(hidden): E·R, Rᵀ·kernel on the inputs
    of q/k/v/gate/up/lm_head, kernel·R and bias·R on the outputs of o_proj/down_proj."""
    if config.post_norms:
        raise ValueError(
            "rotate_residual cannot rotate a model with post-norms (a norm's γ after a block does not commute with a "
            "rotation): use rotate_block_inputs"
        )
    _require_untied(config, "rotate_residual")
    _require_unit_norms(weights, config, include_final=True)
    rotation = hadamard_matrix(config.hidden_size)
    rotated = _copy_tree(weights)
    rotated["embed_tokens"] = _cast_like(_f64(weights["embed_tokens"]) @ rotation, weights["embed_tokens"])

    def rotate_input(kernel):
        return rotation.T @ kernel

    def rotate_output(kernel_or_bias):
        return kernel_or_bias @ rotation

    for layer in rotated["layers"].values():
        for _, block, projections in _BLOCK_INPUTS:
            for name in projections:
                _update(layer[block][name], "kernel", rotate_input)
        for block, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            _update(layer[block][name], "kernel", rotate_output)
            _update(layer[block][name], "bias", rotate_output)
    _update(rotated["lm_head"], "kernel", rotate_input)
    return rotated


def rotate_block_inputs(weights: Mapping, config: ModelConfig) -> tuple[Weights, ModelConfig]:
    """Rotates the normalized inputs of q/k/v and gate/up online, x̂ → x̂·R, and stores Rᵀ·kernel: for models whose
    residual stream cannot be rotated offline (post-norms). R = kron(A, B)/√hidden with ±1 Hadamard factors A, B
    of about √hidden each (see `rotation_factors`), stored in every layer and applied in two small matmuls; the
    returned config says their sizes. Needs folded block-input norms (γ = 1)."""
    _require_unit_norms(weights, config, include_final=False)
    outer, inner = rotation_factors(config.hidden_size)
    rotation = np.kron(outer, inner) / np.sqrt(config.hidden_size)
    rotated = _copy_tree(weights)
    for layer in rotated["layers"].values():
        for _, block, projections in _BLOCK_INPUTS:
            for name in projections:
                _update(layer[block][name], "kernel", lambda kernel: rotation.T @ kernel)
        like = layer["input_layernorm"]["weight"]
        layer["input_rotation"] = {"outer": _cast_like(outer, like), "inner": _cast_like(inner, like)}
    return rotated, dataclasses.replace(config, input_rotation=(outer.shape[0], inner.shape[0]))


def rotation_factors(n: int) -> tuple[np.ndarray, np.ndarray]:
    """±1 Hadamard matrices A [p, p] and B [q, q] with p·q = n and q the power of two nearest √n that leaves a
    buildable p: kron(A, B)/√n is orthogonal, and its entries (like A's and B's) are exact in any float dtype."""
    powers = [q for q in (2**m for m in range(n.bit_length())) if n % q == 0]
    for q in sorted(powers, key=lambda q: abs(np.log2(q) - np.log2(n) / 2)):
        try:
            outer = hadamard_matrix(n // q)
        except UnsupportedModelError:
            continue
        return np.round(outer * np.sqrt(n // q)), np.round(hadamard_matrix(q) * np.sqrt(q))
    raise UnsupportedModelError(f"hidden size {n} has no factorization into buildable Hadamard matrices")


def rotate_value_heads(weights: Mapping, config: ModelConfig) -> Weights:
    """Stores V rotated per head (v ← v·H, H = hadamard_matrix(head_dim)) and undoes it in o_proj's input
    rows (Hᵀ per query head). Every head uses the same H, so query head j, which reads KV head j // r,
    gets exactly the H that its o_proj rows undo; attention is linear in V, so the output is unchanged."""
    h = config.head_dim
    hadamard = hadamard_matrix(h)
    rotated = _copy_tree(weights)

    def rotate_value_columns(kernel_or_bias):
        heads = kernel_or_bias.reshape(*kernel_or_bias.shape[:-1], -1, h)
        return (heads @ hadamard).reshape(kernel_or_bias.shape)

    def unrotate_output_rows(kernel):
        heads = kernel.reshape(-1, h, kernel.shape[-1])
        return np.einsum("ji,hjo->hio", hadamard, heads).reshape(kernel.shape)

    for layer in rotated["layers"].values():
        attention = layer["self_attn"]
        _update(attention["v_proj"], "kernel", rotate_value_columns)
        _update(attention["v_proj"], "bias", rotate_value_columns)
        _update(attention["o_proj"], "kernel", unrotate_output_rows)
    return rotated


def down_proj_permutation(input_absmax) -> np.ndarray:
    """π = stable argsort of the down_proj input channels' |x| maxima, ascending ("Sequential" order), so
    channels of similar magnitude share a quantization group."""
    return np.argsort(np.asarray(input_absmax), kind="stable")


def reorder_down_proj(layer: Mapping, permutation) -> Weights:
    """Permutes the intermediate channels by π: gate/up output columns (and biases) and down_proj input rows.
    The new channel i is the old channel π[i], so down_proj's new input statistics are old_stats[π]."""
    permutation = np.asarray(permutation)
    size = layer["mlp"]["down_proj"]["kernel"].shape[0]
    if permutation.shape != (size,) or not np.array_equal(np.sort(permutation), np.arange(size)):
        raise ValueError(f"expected a permutation of the {size} down_proj input channels")
    reordered = _copy_tree(layer)
    mlp = reordered["mlp"]
    for name in _MLP_INPUTS:
        _update(mlp[name], "kernel", lambda kernel: kernel[:, permutation])
        _update(mlp[name], "bias", lambda bias: bias[permutation])
    _update(mlp["down_proj"], "kernel", lambda kernel: kernel[permutation, :])
    return reordered


def smooth_attention(
    layer: Mapping,
    config: ModelConfig,
    k_absmax,
    q_absmax=None,
    alpha: float = 0.5,
    beta: float = 0.0,
) -> tuple[Weights, np.ndarray]:
    """SmoothAttention: K ← K/λ and Q ← Q·λ after RoPE (q·k unchanged, K outliers shrink before KV4).

    `k_absmax` [num_kv_heads·head_dim] and `q_absmax` [num_heads·head_dim] are |max| of post-RoPE keys and
    queries. λ = Kmax^α / Qmax^β per KV channel, Qmax maxed over each GQA group so its query heads share λ,
    and both maxima taken over RoPE pairs (j, j + r/2) of the r rotating channels (the rest, with partial
    rotary, are their own) so λ commutes with the rotation. λ = 0 → 1; any NaN/Inf → all ones.

    λ goes where the last per-channel scaling before RoPE is: into the q/k kernel columns and biases (the reference
    forgets the biases), or, with q/k norms (Qwen3, Gemma 3), into those norms' per-head γ — scaling k_proj
    would change the norm's RMS and be undone. An online transform of q and k after RoPE (a per-head Hadamard
    rotation) then acts on the smoothed q/k: it preserves q·k as λ does, so the two compose exactly, and λ's
    statistics are those of the keys before it (λ is per channel; a rotation mixes channels).
    Returns the new layer and λ [num_kv_heads·head_dim].
    """
    num_kv, group, h = config.num_kv_heads, config.num_groups, config.head_dim
    rotary = config.rope.rotary_dim(h)
    key_max = _rope_pair_max(_f64(k_absmax).reshape(num_kv, h), rotary)
    if q_absmax is None:
        if beta != 0:
            raise ValueError(f"smooth_attention with beta={beta} needs q_absmax")
        query_max = np.ones_like(key_max)
    else:
        query_max = _rope_pair_max(_f64(q_absmax).reshape(num_kv, group, h).max(axis=1), rotary)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = _sanitized_scale(key_max**alpha / query_max**beta, "smooth_attention")
    lam_q = np.repeat(lam, group, axis=0)  # query head g·r + i uses KV head g
    smoothed = _copy_tree(layer)
    attention = smoothed["self_attn"]
    for proj, norm, factor in (("q_proj", "q_norm", lam_q), ("k_proj", "k_norm", 1.0 / lam)):
        if attention.get(norm) is not None:
            gamma = _gamma(attention[norm]["weight"], config) * factor
            attention[norm] = {"weight": _cast_like(gamma - config.norm_weight_offset, attention[norm]["weight"])}
        else:
            _update(attention[proj], "kernel", np.multiply, factor.reshape(-1))
            _update(attention[proj], "bias", np.multiply, factor.reshape(-1))
    return smoothed, lam.reshape(-1)


def smooth_down_proj(layer: Mapping, input_absmax, alpha: float, beta: float) -> tuple[Weights, np.ndarray]:
    """SmoothLinear on down_proj: s_c = xmax_c^α / wmax_c^β (wmax_c = max |kernel row c|); 0/NaN/Inf → 1.
    down_proj rows ·s and up_proj columns (and bias) /s; exact because act = silu(gate) ⊙ up.
    Returns the new layer and s [intermediate_size]."""
    mlp = layer["mlp"]
    weight_max = np.abs(_f64(mlp["down_proj"]["kernel"])).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scales = _sanitized_scale(_f64(input_absmax) ** alpha / weight_max**beta, "smooth_linear")
    smoothed = _copy_tree(layer)
    _update(smoothed["mlp"]["down_proj"], "kernel", lambda kernel: scales[:, None] * kernel)
    _update(smoothed["mlp"]["up_proj"], "kernel", lambda kernel: kernel / scales)
    _update(smoothed["mlp"]["up_proj"], "bias", lambda bias: bias / scales)
    return smoothed, scales


def _rope_pair_max(per_head: np.ndarray, rotary: int) -> np.ndarray:
    """Channels j and j + r/2 of the first r (rotating) channels of each head get the larger of their two values;
    channels past r do not rotate and keep theirs."""
    half = rotary // 2
    pair_max = np.maximum(per_head[..., :half], per_head[..., half:rotary])
    return np.concatenate([pair_max, pair_max, per_head[..., rotary:]], axis=-1)


def _sanitized_scale(scale: np.ndarray, stage: str) -> np.ndarray:
    """The reference's guard: zero entries become 1, and any NaN/Inf disables the scaling altogether, with a
    `SmoothingDisabledWarning` naming the stage and the channels, never silently."""
    scale = np.where(scale == 0, 1.0, scale)
    if np.all(np.isfinite(scale)):
        return scale
    channels = np.flatnonzero(~np.isfinite(scale))
    warnings.warn(
        SmoothingDisabledWarning(
            f"{stage} disabled: {len(channels)} channel(s) got a NaN/Inf scale (first: {channels[:4].tolist()})"
        ),
        stacklevel=3,
    )
    return np.ones_like(scale)


def _require_untied(config: ModelConfig, step: str) -> None:
    if config.tie_word_embeddings:
        raise ValueError(f"{step} needs untied embeddings (E and lm_head change differently): untie_embeddings first")


def _require_unit_norms(weights: Mapping, config: ModelConfig, *, include_final: bool) -> None:
    """A rotation commutes with a norm only when its γ = 1, so refuse weights whose norms are not folded."""
    norms = {"norm": weights["norm"]["weight"]} if include_final else {}
    for index, layer in weights["layers"].items():
        for name, _, _ in _BLOCK_INPUTS:
            norms[f"layers.{index}.{name}"] = layer[name]["weight"]
    unfolded = [name for name, weight in norms.items() if not np.all(_gamma(weight, config) == 1.0)]
    if unfolded:
        raise ValueError(f"the rotation needs folded norms (γ = 1), but these are not: {', '.join(unfolded)}")


def _gamma(weight, config: ModelConfig) -> np.ndarray:
    """What a norm scales by, float64."""
    return _f64(weight) + config.norm_weight_offset


def _unit_gamma(weight, config: ModelConfig):
    """The stored weight of a norm that scales by 1."""
    return _cast_like(np.full(np.shape(weight), 1.0 - config.norm_weight_offset), weight)


def _copy_tree(tree: Mapping) -> Weights:
    """New nested dicts sharing the arrays: transforms replace arrays, never write into them."""
    return {key: _copy_tree(value) if isinstance(value, Mapping) else value for key, value in tree.items()}


def _update(module: dict, name: str, transform: Callable[..., np.ndarray], *args) -> None:
    """module[name] ← transform(module[name], *args) in float64, cast back; a missing (bias) entry is skipped."""
    original = module.get(name)
    if original is not None:
        module[name] = _cast_like(transform(_f64(original), *args), original)


def _f64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def _cast_like(value: np.ndarray, original) -> Any:
    cast = np.asarray(value).astype(original.dtype)
    return jnp.asarray(cast) if isinstance(original, jax.Array) else cast
