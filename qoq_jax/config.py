"""One static model configuration, hashable so it can be a jit static argument.

`ModelConfig.from_hf` reads a transformers `config.json` dict (transformers 4 and 5 spellings) and refuses
anything the model code would silently get wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qoq_jax.errors import ConfigError, UnsupportedModelError
from qoq_jax.validation import is_integer, is_real

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ARCHITECTURE_ALIASES = {"YiForCausalLM": "LlamaForCausalLM"}
_MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "yi": "LlamaForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `rope_type` is one of default / linear / llama3 (Llama-3.1 scaling)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. `max_context` is the longest sequence the model may attend over."""

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

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA group size; 1 is MHA, num_heads is MQA)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (checkpoints store this; `from_dict` inverts it exactly)."""
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`: an unknown field raises TypeError (never silently dropped)."""
        fields = dict(data)
        if "rope" in fields:
            fields["rope"] = RopeConfig(**fields["rope"])
        if "eos_token_ids" in fields:
            fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        return cls(**fields)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds the config from a transformers config dict, naming any unsupported option."""
        architecture = _architecture(hf)
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only SwiGLU with silu)")
        if hf.get("quantization_config"):
            method = hf["quantization_config"].get("quant_method", "unknown")
            raise UnsupportedModelError(
                f"pre-quantized checkpoints ({method}) are not supported: import the float model"
            )
        missing = [key for key in _REQUIRED_HF_KEYS if hf.get(key) is None]
        if missing:
            raise ConfigError(f"missing required key {', '.join(map(repr, missing))}")
        for key in _REQUIRED_HF_KEYS:
            _check_positive_integer(key, hf[key])
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        max_context = hf.get("max_position_embeddings", 2048)
        limit_reason = "max_position_embeddings"
        window = _sliding_window(hf, architecture)
        if window is not None and window < max_context:
            # Within the window sliding-window attention equals full attention; beyond it we refuse.
            max_context, limit_reason = window, "sliding_window (sliding-window attention is not implemented)"
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_context=max_context,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_rope(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or architecture == "Qwen2ForCausalLM",
            o_bias=attention_bias and architecture != "Qwen2ForCausalLM",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            architecture=architecture,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            context_limit_reason=limit_reason,
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


def _sliding_window(hf: Mapping[str, Any], architecture: str) -> int | None:
    window = hf.get("sliding_window")
    if window is None:
        return None
    if architecture == "Qwen2ForCausalLM":
        layer_types = hf.get("layer_types") or []
        if not hf.get("use_sliding_window", False) and "sliding_attention" not in layer_types:
            return None
    return int(window)


def _rope(hf: Mapping[str, Any]) -> RopeConfig:
    """transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )
