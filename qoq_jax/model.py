"""The one decoder in Flax NNX for every family: Llama 1/2/3/3.1, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norms),
Gemma 2/3 (offset norms, post-norms, GeGLU, soft-capping, local/global layers), Phi-3/4 (partial LongRoPE), Yi.

What differs between families is a field of `ModelConfig`, read here as module structure (a norm exists or not)
or a static value (activation, rope, scales); no layer looks at an architecture name. Module and parameter names
follow transformers' Llama (`layers[i].self_attn.q_proj.kernel`); the norms are named by role:
`input_layernorm` feeds attention, `post_attention_layernorm` feeds the MLP (Gemma calls it
`pre_feedforward_layernorm`), `attention_output_norm` and `mlp_output_norm` are Gemma's post-norms (its
`post_attention_layernorm` and `post_feedforward_layernorm`), as llama.cpp names them. Linear kernels are stored
[in, out]. The model never branches on precision: `linear` is the one matmul dispatcher that quantized weight
types plug into.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qoq_jax.config import ModelConfig
from qoq_jax.kv_cache import KVCache, LayerAttention
from qoq_jax.quant import QuantFormat, QuantizedWeight
from qoq_jax.rope import apply_rope, rotary_angles

Axes = tuple[str, ...]
"""Mesh axes a tensor-parallel model is split over inside `shard_map`; () on one device."""

Observer = Callable[[str, jax.Array], None]
"""Called with named intermediates of a decoder layer; calibration uses it to collect statistics."""


def _observe(observe: Observer | None, name: str, value: jax.Array) -> None:
    if observe is not None:
        observe(name, value)


def linear(
    x: jax.Array, kernel: jax.Array | QuantizedWeight, bias: jax.Array | None = None, *, split_over: Axes = ()
) -> jax.Array:
    """x [..., in] @ kernel [in, out] (+ bias), returned in x's dtype.

    A float kernel is multiplied in x's dtype with float32 accumulation; a quantized one runs its own
    integer GEMM (W4A8 or W8A8, activations quantized per token inside). With `split_over` the layer is
    row-parallel: x and the kernel hold this device's slice of `in`, the partial products are summed over those
    mesh axes (one all-reduce, in x's dtype), and quantized activations share one per-token scale."""
    if isinstance(kernel, jax.Array):
        float_kernel = kernel.astype(x.dtype)
        y = _one_row_as_two(
            lambda rows: jnp.einsum("...i,io->...o", rows, float_kernel, preferred_element_type=jnp.float32),
            x,
            x.dtype,
        )
    else:
        y = _one_row_as_two(lambda rows: kernel.matmul(rows, scale_over=split_over), x, jnp.int8)
    if split_over:
        y = jax.lax.psum(y.astype(x.dtype), split_over)
    y = y.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _one_row_as_two(matmul: Callable[[jax.Array], jax.Array], x: jax.Array, dot_dtype) -> jax.Array:
    """matmul(x) for a matmul of independent rows; on a CPU a single row of a dot in `dot_dtype` other than
    float32 is multiplied as two equal rows.

    XLA:CPU has no one-row bfloat16 or int8 dot: it widens the whole weight to 32 bits in every call (SmolLM2's
    bfloat16 LM head: 40 ms at one row, 3.5 ms at two; an int8 [576, 49152] GEMM: 37 against 2.4 ms). A float32
    row is faster alone (3.6 against 7.8 ms)."""
    rows = math.prod(x.shape[:-1])
    if rows != 1 or jnp.dtype(dot_dtype) == jnp.float32 or jax.default_backend() != "cpu":
        return matmul(x)
    doubled = jnp.broadcast_to(x.reshape(1, x.shape[-1]), (2, x.shape[-1]))
    return matmul(doubled)[:1].reshape(*x.shape[:-1], -1)


class Linear(nnx.Module):
    """A float kernel [in, out], or one stored in `quant`'s weight format (initialised by rounding the random
    float kernel, which gives valid codes and scales for tests and benchmarks).

    Modules take a PRNG key rather than `nnx.Rngs`: drawing from Rngs inside a trace (jit, eval_shape) makes
    jax search the whole trace once per draw, quadratic in the model's size (20 s for an 8B model in W4A8)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        dtype,
        key: jax.Array,
        quant: QuantFormat | None = None,
    ):
        kernel = nnx.initializers.normal(0.02)(key, (in_features, out_features), dtype)
        if quant is not None:
            kernel = quant.round_to_nearest(kernel)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array, *, split_over: Axes = ()) -> jax.Array:
        return linear(x, self.kernel.get_value(), None if self.bias is None else self.bias[...], split_over=split_over)


class RMSNorm(nnx.Module):
    """x / rms(x) over the last axis, scaled by `offset` + weight (weight [..., dim]: one per head for q/k norms).

    Offset 0 is Llama's norm (normalized, cast, then scaled in the model dtype); offset 1 is Gemma's (scaled by
    1 + w in float32, then cast), each as transformers computes it. A fresh norm scales by 1."""

    def __init__(self, shape: int | tuple[int, ...], *, eps: float, offset: float, dtype):
        self.weight = nnx.Param(jnp.full(shape, 1.0 - offset, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.weight[...].astype(jnp.float32) + self.offset)).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


def _norm(config: ModelConfig, shape: int | tuple[int, ...], dtype) -> RMSNorm:
    return RMSNorm(shape, eps=config.rms_norm_eps, offset=config.norm_weight_offset, dtype=dtype)


class InputRotation(nnx.Module):
    """x [..., p·q] ↦ x·kron(outer, inner)/√(p·q) without forming the product: two small matmuls.

    QoQ's rotation of models with post-norms (Gemma), whose residual stream cannot be rotated offline: the
    normalized inputs of q/k/v and gate/up are rotated here, and those kernels hold the inverse rotation. The
    factors are ±1 Hadamard matrices (exact in any dtype); a fresh module is the identity."""

    def __init__(self, outer_size: int, inner_size: int, *, dtype):
        self.outer = nnx.Param(jnp.eye(outer_size, dtype=dtype) * outer_size**0.5)
        self.inner = nnx.Param(jnp.eye(inner_size, dtype=dtype) * inner_size**0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        """In float32 (p + q multiply-adds per element, against the linears' hidden-size many)."""
        outer, inner = self.outer[...].astype(jnp.float32), self.inner[...].astype(jnp.float32)
        p, q = outer.shape[0], inner.shape[0]
        blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], p, q)
        rotated = jnp.einsum("...ij,ia,jb->...ab", blocks, outer, inner) * (p * q) ** -0.5
        return rotated.reshape(x.shape).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype, key: jax.Array, quant: QuantFormat | None = None):
        c = config
        self.head_dim = c.head_dim  # head counts follow from the q/k/v widths: a device holds only its share
        q_key, k_key, v_key, o_key = jax.random.split(key, 4)
        kw = {"dtype": dtype, "quant": quant}
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, use_bias=c.qkv_bias, key=q_key, **kw)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, key=k_key, **kw)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, key=v_key, **kw)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_bias, key=o_key, **kw)
        # One weight per head (transformers shares one over the heads): SmoothAttention's per-channel scales of
        # the post-RoPE q/k fold into these norms, the last per-channel step before RoPE (see equivalence.py).
        self.q_norm = _norm(c, (c.num_heads, c.head_dim), dtype) if c.qk_norm else None
        self.k_norm = _norm(c, (c.num_kv_heads, c.head_dim), dtype) if c.qk_norm else None
        self.rope = c.layer_rope(layer)
        self.layer_attention = LayerAttention.of_layer(c, layer)  # scale, soft-cap, sliding window
        if quant is not None and quant.qk_transform:  # identity until calibration sets them (QuantFormat)
            eye = jnp.broadcast_to(jnp.eye(c.head_dim, dtype=jnp.float32), (c.num_kv_heads, c.head_dim, c.head_dim))
            self.key_transform = nnx.Param(eye)
            self.query_transform = nnx.Param(eye)
            self.key_offset = nnx.Param(jnp.zeros((c.num_kv_heads, c.head_dim), jnp.float32))
        else:
            self.key_transform = self.query_transform = self.key_offset = None

    def __call__(
        self, x_btd, positions_bt, valid_bt, cache: KVCache, layer: int, observe: Observer | None, tensor_axes: Axes
    ):
        """With `tensor_axes`, q/k/v hold this device's heads and o_proj sums the heads' contributions."""
        batch, length, _ = x_btd.shape
        _observe(observe, "attn_input", x_btd)
        q = self.q_proj(x_btd).reshape(batch, length, -1, self.head_dim)
        k = self.k_proj(x_btd).reshape(batch, length, -1, self.head_dim)
        v = self.v_proj(x_btd).reshape(batch, length, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary_angles(self.rope, self.head_dim, positions_bt)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        _observe(observe, "query", q)
        _observe(observe, "key", k)
        _observe(observe, "value", v)
        if self.key_transform is not None:
            q, k = self.transform_qk(q, k)
        out, cache = cache.attend(layer, q, k, v, positions_bt, valid_bt, self.layer_attention)
        out = out.reshape(batch, length, -1)
        _observe(observe, "o_input", out)
        return self.o_proj(out, split_over=tensor_axes), cache

    def transform_qk(self, q_bthd, k_bthd):
        """The q/k transform of `QuantFormat.qk_transform`, before any cache path sees q and k."""
        return transform_qk(q_bthd, k_bthd, self.key_transform[...], self.query_transform[...], self.key_offset[...])


def transform_qk(q_bthd, k_bthd, key_transform, query_transform, key_offset):
    """k ← (k − μ)·A and q ← q·A⁻ᵀ per KV head (its query heads share A), in float32: q·k changes by the query's
    own constant q·μ, which softmax drops. A [Hkv, D, D] = key_transform, A⁻ᵀ = query_transform, μ [Hkv, D]."""
    batch, length, num_heads, head_dim = q_bthd.shape
    num_kv_heads = k_bthd.shape[2]
    k = jnp.einsum("bthd,hde->bthe", k_bthd.astype(jnp.float32) - key_offset, key_transform)
    q = q_bthd.astype(jnp.float32).reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    q = jnp.einsum("bthgd,hde->bthge", q, query_transform).reshape(q_bthd.shape)
    return q.astype(q_bthd.dtype), k.astype(k_bthd.dtype)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, key: jax.Array, quant: QuantFormat | None = None):
        c = config
        gate_key, up_key, down_key = jax.random.split(key, 3)
        kw = {"use_bias": c.mlp_bias, "dtype": dtype, "quant": quant}
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, key=gate_key, **kw)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, key=up_key, **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, key=down_key, **kw)
        self.hidden_act = c.hidden_act

    def __call__(self, x_btd, observe: Observer | None, tensor_axes: Axes):
        _observe(observe, "mlp_input", x_btd)
        hidden = _ACTIVATIONS[self.hidden_act](self.gate_proj(x_btd)) * self.up_proj(x_btd)
        _observe(observe, "down_input", hidden)
        return self.down_proj(hidden, split_over=tensor_axes)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype, key: jax.Array, quant: QuantFormat | None = None):
        c = config
        attention_key, mlp_key = jax.random.split(key)
        self.input_layernorm = _norm(c, c.hidden_size, dtype)
        self.self_attn = Attention(c, layer, dtype=dtype, key=attention_key, quant=quant)
        self.post_attention_layernorm = _norm(c, c.hidden_size, dtype)
        self.mlp = MLP(c, dtype=dtype, key=mlp_key, quant=quant)
        self.attention_output_norm = _norm(c, c.hidden_size, dtype) if c.post_norms else None
        self.mlp_output_norm = _norm(c, c.hidden_size, dtype) if c.post_norms else None
        self.input_rotation = None if c.input_rotation is None else InputRotation(*c.input_rotation, dtype=dtype)

    def __call__(
        self,
        x_btd,
        positions_bt,
        valid_bt,
        cache: KVCache,
        layer: int,
        observe: Observer | None = None,
        tensor_axes: Axes = (),
    ):
        """`observe` sees each linear's input, the post-RoPE queries and keys (before any q/k transform) and the
        values (names in `Observer` calls: attn_input, query, key, value, o_input, mlp_input, down_input)."""
        attn_out, cache = self.self_attn(
            self._block_input(self.input_layernorm, x_btd), positions_bt, valid_bt, cache, layer, observe, tensor_axes
        )
        x_btd = x_btd + self._block_output(self.attention_output_norm, attn_out)
        mlp_out = self.mlp(self._block_input(self.post_attention_layernorm, x_btd), observe, tensor_axes)
        return x_btd + self._block_output(self.mlp_output_norm, mlp_out), cache

    def _block_input(self, norm: RMSNorm, x_btd):
        normed = norm(x_btd)
        return normed if self.input_rotation is None else self.input_rotation(normed)

    @staticmethod
    def _block_output(norm: RMSNorm | None, out_btd):
        return out_btd if norm is None else norm(out_btd)


class CausalLM(nnx.Module):
    """Embedding → decoder layers → final norm; `logits` applies the (possibly tied) LM head.

    With `quant`, the decoder layers' linears are quantized; embeddings, norms and the LM head stay
    in `dtype` (QoQ quantizes only the decoder linears)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, quant: QuantFormat | None = None):
        self.config = config
        embed_key, head_key, *layer_keys = self.init_keys(rngs, config.num_layers)
        embed_init = nnx.initializers.normal(0.02)
        self.embed_tokens = nnx.Param(embed_init(embed_key, (config.vocab_size, config.hidden_size), dtype))
        self.layers = nnx.List(
            [DecoderLayer(config, index, dtype=dtype, key=key, quant=quant) for index, key in enumerate(layer_keys)]
        )
        self.norm = _norm(config, config.hidden_size, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, key=head_key)
        )

    @staticmethod
    def init_keys(rngs: nnx.Rngs, num_layers: int) -> jax.Array:
        """[2 + num_layers] keys: the embedding's, the LM head's, then each layer's (`init_params` makes the
        layers one by one from these)."""
        return jax.random.split(rngs.params(), 2 + num_layers)

    def __call__(self, tokens_bt, positions_bt, valid_bt, cache: KVCache, *, tensor_axes: Axes = ()):
        """Final hidden states [B, T, D] of new tokens, and the cache with their keys and values.

        With `tensor_axes` this runs on one device's shards inside `shard_map` (see `qoq_jax.sharding`)."""
        x = self.embed(tokens_bt, tensor_axes)
        for index, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{index}"):
                x, cache = layer(x, positions_bt, valid_bt, cache, index, tensor_axes=tensor_axes)
        return self.norm(x), cache

    def embed(self, tokens_bt, tensor_axes: Axes) -> jax.Array:
        """Embedding rows; a table split over the vocabulary looks up its own ids and sums the devices' rows."""
        table = self.embed_tokens[...]
        rows = table.shape[0]
        if rows == self.config.vocab_size:
            x = jnp.take(table, tokens_bt, axis=0)
        else:
            local = tokens_bt - jax.lax.axis_index(tensor_axes) * rows
            mine = (local >= 0) & (local < rows)
            x = jnp.where(mine[..., None], jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0), 0)
            x = jax.lax.psum(x, tensor_axes)
        multiplier = self.config.embedding_multiplier
        return x if multiplier == 1.0 else x * jnp.asarray(multiplier, x.dtype)  # in the model dtype, as Gemma

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head over hidden states [..., D] → float32 logits [..., vocab], soft-capped where the model caps."""
        if self.lm_head is None:
            spec, table = "...d,vd->...v", self.embed_tokens[...]
        else:
            spec, table = "...d,dv->...v", self.lm_head.kernel[...]
        out = _one_row_as_two(
            lambda rows: jnp.einsum(spec, rows, table, preferred_element_type=jnp.float32),
            hidden,
            jnp.result_type(hidden, table),
        )
        cap = self.config.final_logit_softcap
        return out if cap is None else cap * jnp.tanh(out / cap)
