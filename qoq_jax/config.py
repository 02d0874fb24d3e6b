"""One static model configuration, hashable so it can be a jit static argument.

`ModelConfig.from_hf` reads a transformers `config.json` dict (transformers 4 and 5 spellings) and refuses
anything the model code would silently get wrong. Every family is the one decoder of `qoq_jax.model`: the fields
below say what differs (norm style, extra norms, activation, rope per layer, soft-capping, windows), and the
architecture name is only read here, to fill in what a family's config.json leaves implicit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from qoq_jax.errors import ConfigError, UnsupportedModelError
from qoq_jax.validation import is_integer, is_real

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)
_ARCHITECTURE_ALIASES = {"YiForCausalLM": "LlamaForCausalLM"}
_MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "yi": "LlamaForCausalLM",
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
_ROPE_TYPE_ALIASES = {"su": "longrope"}  # Phi-3's first name for LongRoPE


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `rope_type` is one of default / linear / llama3 (Llama-3.1 scaling) / longrope (Phi-3).

    Only the first `partial_rotary_factor` of each head's channels rotate (Phi-4-mini: 0.75); the rest pass through.
    LongRoPE divides the frequencies by `long_factor` when the model runs past `original_max_position_embeddings`
    (`long_context`), else by `short_factor`, and scales cos/sin by `attention_factor`. The choice is made once for
    the model's context, as vLLM does, not per sequence length as transformers does: a sequence that grows past the
    original context would otherwise hold keys rotated both ways (transformers' generate re-encodes its prefix at
    that point), and chunked or cached prefixes would differ from one-shot prefill."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    long_context: bool = False

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if not 0 < self.partial_rotary_factor <= 1:
            raise UnsupportedModelError(f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]")
        if self.rope_type == "longrope" and not (self.short_factor and self.long_factor):
            raise UnsupportedModelError("longrope scaling needs both short_factor and long_factor")

    def rotary_dim(self, head_dim: int) -> int:
        """Channels per head that rotate (an even number; the first ones of the head)."""
        dim = int(head_dim * self.partial_rotary_factor)
        if dim % 2 or dim == 0:
            raise UnsupportedModelError(
                f"head_dim {head_dim} × partial_rotary_factor {self.partial_rotary_factor} = {dim} rotary channels, "
                "which must be even and positive"
            )
        if self.rope_type == "longrope" and {len(self.short_factor), len(self.long_factor)} != {dim // 2}:
            raise UnsupportedModelError(
                f"longrope short_factor/long_factor have {len(self.short_factor)}/{len(self.long_factor)} entries; "
                f"{dim} rotary channels need {dim // 2}"
            )
        return dim


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of any supported family. `max_context` is the longest sequence it may attend over.

    Per-family fields (defaults are Llama's):

    * `norm_weight_offset`: the RMSNorms scale by offset + w (Gemma stores w around 0: offset 1).
    * `qk_norm`: per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    * `post_norms`: RMSNorms on the attention and MLP outputs before the residual adds (Gemma 2/3).
    * `hidden_act`: "silu" (SwiGLU) or "gelu_tanh" (GeGLU with tanh GELU).
    * `embedding_multiplier`: embeddings are scaled by it in the model dtype (Gemma: √hidden_size).
    * `query_pre_attn_scalar`: attention logits are scaled by its −½ power (default head_dim).
    * `attn_logit_softcap` / `final_logit_softcap`: cap·tanh(x / cap) on attention / output logits (Gemma 2).
    * `sliding_window` with `sliding_layers` (one flag per layer): those layers attend only to the last
      `sliding_window` positions; `local_rope` is their rotary embedding when it differs (Gemma 3).
    * `input_rotation`: set by QoQ's rotation of models with `post_norms` (see `converters/equivalence.py`): the
      normalized inputs of q/k/v and gate/up are rotated online by the stored orthogonal factors.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    context_limit_reason: str = "max_position_embeddings"
    hidden_act: str = "silu"
    norm_weight_offset: float = 0.0
    qk_norm: bool = False
    post_norms: bool = False
    embedding_multiplier: float = 1.0
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    local_rope: RopeConfig | None = None
    input_rotation: tuple[int, int] | None = None

    def __post_init__(self):
        for name in _POSITIVE_INTEGERS:
            _check_positive_integer(name, getattr(self, name))
        if not is_real(self.rms_norm_eps) or not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act not in _ACTIVATIONS.values():
            supported = sorted(set(_ACTIVATIONS.values()))
            raise UnsupportedModelError(f"hidden_act={self.hidden_act!r} is not one of {supported}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise UnsupportedModelError(
                f"{len(self.sliding_layers)} layer types for {self.num_layers} layers (layer_types must list each)"
            )
        if any(self.sliding_layers) and not self.sliding_window:
            raise UnsupportedModelError("sliding_attention layers need a positive sliding_window")
        if self.sliding_window is not None:
            _check_positive_integer("sliding_window", self.sliding_window)
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "embedding_multiplier"):
            value = getattr(self, name)
            if value is not None and (not is_real(value) or not value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for rope in (self.rope, self.local_rope):
            if rope is not None:
                rope.rotary_dim(self.head_dim)

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA group size; 1 is MHA, num_heads is MQA)."""
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int | None:
        """How many of the latest positions (the query's own included) layer `layer` attends to; None: all."""
        return self.sliding_window if self.sliding_layers and self.sliding_layers[layer] else None

    def layer_rope(self, layer: int) -> RopeConfig:
        """The rotary embedding of layer `layer` (sliding layers may have their own)."""
        if self.local_rope is not None and self.layer_window(layer) is not None:
            return self.local_rope
        return self.rope

    @property
    def attention_scale(self) -> float:
        """The factor on q·k before the softmax."""
        return (self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar) ** -0.5

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (checkpoints store this; `from_dict` inverts it exactly)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`: an unknown field raises TypeError (never silently dropped); fields a checkpoint
        older than a field lacks take their defaults."""
        fields = {key: _tuples(value) for key, value in data.items()}
        for name in ("rope", "local_rope"):
            if fields.get(name) is not None:
                fields[name] = RopeConfig(**fields[name])
        return cls(**fields)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds the config from a transformers config dict, naming any unsupported option."""
        architecture = _architecture(hf)
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act={act!r} is not supported (SwiGLU with silu, GeGLU with gelu_pytorch_tanh)"
            )
        if hf.get("quantization_config"):
            method = hf["quantization_config"].get("quant_method", "unknown")
            raise UnsupportedModelError(
                f"pre-quantized checkpoints ({method}) are not supported: import the float model"
            )
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedModelError("use_bidirectional_attention (an encoder) is not supported: only causal models")
        missing = [key for key in _REQUIRED_HF_KEYS if hf.get(key) is None]
        if missing:
            raise ConfigError(f"missing required key {', '.join(map(repr, missing))}")
        for key in _REQUIRED_HF_KEYS:
            _check_positive_integer(key, hf[key])
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        num_layers = hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        window, sliding_layers = _sliding_layers(hf, architecture, num_layers)
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        rope, local_rope = _ropes(hf, head_dim)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_context=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or architecture == "Qwen2ForCausalLM",
            o_bias=attention_bias and architecture != "Qwen2ForCausalLM",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            architecture=architecture,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hidden_act=_ACTIVATIONS[act],
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            sliding_window=window,
            sliding_layers=sliding_layers,
            local_rope=local_rope,
            **_family_traits(architecture, hf),
        )


_POSITIVE_INTEGERS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_context",
)
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _check_positive_integer(name: str, value) -> None:
    if not is_integer(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _family_traits(architecture: str, hf: Mapping[str, Any]) -> dict[str, Any]:
    """What a family's config.json does not spell out (its modeling code in transformers hard-codes it)."""
    gemma = {"norm_weight_offset": 1.0, "post_norms": True, "embedding_multiplier": math.sqrt(hf["hidden_size"])}
    return {
        "Qwen3ForCausalLM": {"qk_norm": True},
        "Gemma2ForCausalLM": gemma,
        "Gemma3ForCausalLM": {**gemma, "qk_norm": True},
    }.get(architecture, {})


def _architecture(hf: Mapping[str, Any]) -> str:
    names = hf.get("architectures") or []
    if not names and hf.get("model_type") in _MODEL_TYPE_ARCHITECTURES:
        names = [_MODEL_TYPE_ARCHITECTURES[hf["model_type"]]]
    if len(names) != 1:
        raise UnsupportedModelError(
            f"expected exactly one architecture, got {names!r} (model_type={hf.get('model_type')!r})"
        )
    name = _ARCHITECTURE_ALIASES.get(names[0], names[0])
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {names[0]!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return name


def _sliding_layers(hf: Mapping[str, Any], architecture: str, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """(window, one flag per layer): `layer_types` when the config lists them (transformers 5 always writes them),
    else each family's rule (Gemma 2 alternates, Gemma 3 has one global layer in `sliding_window_pattern`, Qwen
    windows layers from `max_window_layers` when `use_sliding_window`, Mistral and Phi-3 window every layer)."""
    window = hf.get("sliding_window")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return None, ()
    layer_types = hf.get("layer_types")
    if layer_types:
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedModelError(f"layer types {sorted(unknown)} are not supported")
        flags = tuple(kind == "sliding_attention" for kind in layer_types)
    elif architecture == "Gemma2ForCausalLM":
        flags = tuple(i % 2 == 0 for i in range(num_layers))
    elif architecture == "Gemma3ForCausalLM":
        pattern = hf.get("sliding_window_pattern", 6)
        flags = tuple((i + 1) % pattern != 0 for i in range(num_layers))
    elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        first = hf.get("max_window_layers", num_layers)
        flags = tuple(i >= first for i in range(num_layers))
    else:
        flags = (True,) * num_layers
    return (int(window), flags) if any(flags) else (None, ())


def _ropes(hf: Mapping[str, Any], head_dim: int) -> tuple[RopeConfig, RopeConfig | None]:
    """(rope, local_rope): Gemma 3 gives sliding layers their own (transformers 5 nests `rope_parameters` by layer
    type; transformers 4 has `rope_local_base_freq`)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = _rope({**hf, "rope_parameters": params.get("full_attention") or {}}, head_dim)
        local = _rope({**hf, "rope_parameters": params.get("sliding_attention") or {}, "rope_scaling": None}, head_dim)
        return full, local
    rope = _rope(hf, head_dim)
    if "rope_local_base_freq" in hf:
        return rope, RopeConfig(theta=float(hf["rope_local_base_freq"]))
    return rope, None


def _rope(hf: Mapping[str, Any], head_dim: int) -> RopeConfig:
    """transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    rope_type = _ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    partial = float(merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    # Phi-3 keeps the pretraining length outside the rope parameters, and it takes precedence (as in transformers).
    original = hf.get("original_max_position_embeddings") or merged.get("original_max_position_embeddings")
    factor = float(merged.get("factor", 1.0))
    longrope = {}
    if rope_type == "longrope":
        original = int(original or hf.get("max_position_embeddings", 2048))
        factor = float(merged.get("factor") or hf.get("max_position_embeddings", original) / original)
        attention_factor = merged.get("attention_factor")
        if attention_factor is None:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        longrope = dict(
            short_factor=tuple(float(x) for x in merged.get("short_factor") or ()),
            long_factor=tuple(float(x) for x in merged.get("long_factor") or ()),
            attention_factor=float(attention_factor),
            long_context=hf.get("max_position_embeddings", original) > original,
        )
    rope = RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original or 8192),
        partial_rotary_factor=partial,
        **longrope,
    )
    rope.rotary_dim(head_dim)
    return rope


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _tuples(value):
    """JSON lists back to the tuples the frozen config holds (nested dicts stay dicts for their dataclasses)."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    return value
