"""qoq-jax: W4A8KV4 (QoQ) serving of Llama-family models in JAX.

    params = qoq_jax.load("smollm2")
    logits = qoq_jax.forward(params, token_ids)
    texts = qoq_jax.generate(params, ["The capital of France is"], max_new_tokens=32)
"""

from qoq_jax.config import ModelConfig, RopeConfig
from qoq_jax.errors import (
    CheckpointError,
    InvalidRequestError,
    InvalidSamplingError,
    PromptTooLongError,
    QoQError,
    UnsupportedModelError,
)
from qoq_jax.generate import Completion, complete, generate
from qoq_jax.kv_cache import DenseKVCache, KVCache
from qoq_jax.loading import load
from qoq_jax.params import Params, assemble_params, expected_shapes, init_params
from qoq_jax.sampling import SamplingParams
from qoq_jax.steps import DecodeState, decode_step, forward, prefill

__all__ = [
    "CheckpointError",
    "Completion",
    "DecodeState",
    "DenseKVCache",
    "InvalidRequestError",
    "InvalidSamplingError",
    "KVCache",
    "ModelConfig",
    "Params",
    "PromptTooLongError",
    "QoQError",
    "RopeConfig",
    "SamplingParams",
    "UnsupportedModelError",
    "assemble_params",
    "complete",
    "decode_step",
    "expected_shapes",
    "forward",
    "generate",
    "init_params",
    "load",
    "prefill",
]
