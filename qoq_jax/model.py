"""The Llama-family decoder in Flax NNX: Llama 1/2/3/3.1, Mistral, Qwen2 (q/k/v bias), Yi.

Module and parameter names follow transformers' (`layers[i].self_attn.q_proj.kernel`), so converters map
names one to one. Linear kernels are stored [in, out]. The model never branches on precision: `linear`
is the one matmul dispatcher that quantized weight types plug into.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qoq_jax.config import ModelConfig
from qoq_jax.kv_cache import KVCache
from qoq_jax.rope import apply_rope, inverse_frequencies


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ kernel [in, out] (+ bias), accumulated in float32, returned in x's dtype."""
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.kernel[...], None if self.bias is None else self.bias[...])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_bias, dtype=dtype, rngs=rngs)
        self.rope = c.rope

    def __call__(self, x_btd, positions_bt, valid_bt, cache: KVCache, layer: int):
        batch, length, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x_btd).reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_btd).reshape(batch, length, self.num_kv_heads, self.head_dim)
        inv_freq = inverse_frequencies(self.rope, self.head_dim)
        q = apply_rope(q, positions_bt, inv_freq)
        k = apply_rope(k, positions_bt, inv_freq)
        cache = cache.write(layer, k, v, positions_bt, valid_bt)
        out = cache.attend(layer, q, positions_bt)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x_btd):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x_btd, positions_bt, valid_bt, cache: KVCache, layer: int):
        attn_out, cache = self.self_attn(self.input_layernorm(x_btd), positions_bt, valid_bt, cache, layer)
        x_btd = x_btd + attn_out
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        return x_btd, cache


class CausalLM(nnx.Module):
    """Embedding → decoder layers → final norm; `logits` applies the (possibly tied) LM head."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        embed_init = nnx.initializers.normal(0.02)
        self.embed_tokens = nnx.Param(embed_init(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
        )

    def __call__(self, tokens_bt, positions_bt, valid_bt, cache: KVCache):
        """Final hidden states [B, T, D] of new tokens, and the cache with their keys and values."""
        x = jnp.take(self.embed_tokens[...], tokens_bt, axis=0)
        for index, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{index}"):
                x, cache = layer(x, positions_bt, valid_bt, cache, index)
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head over hidden states [..., D] → float32 logits [..., vocab]."""
        if self.lm_head is None:
            out = jnp.einsum("...d,vd->...v", hidden, self.embed_tokens[...], preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum(
                "...d,dv->...v", hidden, self.lm_head.kernel[...], preferred_element_type=jnp.float32
            )
        return out
