"""qoq-jax: W4A8KV4 (QoQ) serving of Llama-family models in JAX.

params = qoq_jax.load("smollm2")
logits = qoq_jax.forward(params, token_ids)
texts = qoq_jax.generate(params, ["The capital of France is"], max_new_tokens=32)
qoq_jax.save_checkpoint(params, "ckpt"); params = qoq_jax.load("ckpt")
params = qoq_jax.load("ckpt", mesh=qoq_jax.make_mesh(4))  # tensor parallel over 4 devices
"""

from qoq_jax.checkpoint import load_checkpoint, save_checkpoint
from qoq_jax.config import ModelConfig, RopeConfig
from qoq_jax.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    InvalidRequestError,
    InvalidSamplingError,
    PromptTooLongError,
    QoQError,
    UnsupportedModelError,
)
from qoq_jax.generate import Completion, complete, generate
from qoq_jax.kv_cache import KVCache, KVPool, NoKVCache, PagedKVCache, kv_bytes_per_page, pages_that_fit
from qoq_jax.loading import load
from qoq_jax.logprobs import TokenLogprob
from qoq_jax.params import Params, assemble_params, expected_shapes, init_params, shard_params
from qoq_jax.perplexity import Perplexity, perplexity
from qoq_jax.quant import QuantFormat
from qoq_jax.sharding import TensorParallel, make_mesh
from qoq_jax.sampling import SamplingParams
from qoq_jax.steps import DecodeState, decode_step, forward, lm_head, prefill, prefill_hidden

__all__ = [
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "Completion",
    "DecodeState",
    "InvalidRequestError",
    "InvalidSamplingError",
    "KVCache",
    "KVPool",
    "ModelConfig",
    "NoKVCache",
    "PagedKVCache",
    "Params",
    "Perplexity",
    "PromptTooLongError",
    "QoQError",
    "QuantFormat",
    "RopeConfig",
    "SamplingParams",
    "TensorParallel",
    "TokenLogprob",
    "UnsupportedModelError",
    "assemble_params",
    "complete",
    "decode_step",
    "expected_shapes",
    "forward",
    "generate",
    "init_params",
    "kv_bytes_per_page",
    "lm_head",
    "load",
    "load_checkpoint",
    "make_mesh",
    "pages_that_fit",
    "perplexity",
    "prefill",
    "prefill_hidden",
    "save_checkpoint",
    "shard_params",
]
