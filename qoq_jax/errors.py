"""Errors users can catch by kind: each names the bad input in its message."""


class QoQError(Exception):
    """Base class of every error qoq-jax raises on purpose."""


class UnsupportedModelError(QoQError, ValueError):
    """An architecture, option or file type this library does not implement."""


class CheckpointError(QoQError, ValueError):
    """Missing, truncated or mismatched weights; nothing was loaded."""


class ConfigError(CheckpointError):
    """A model config (config.json, GGUF metadata, a checkpoint's model_config) missing a key or holding a value
    no model can have."""


class CalibrationError(QoQError, RuntimeError):
    """Calibration could not quantize a layer as its recipe asks (e.g. GPTQ's Hessian never factorized)."""


class InvalidRequestError(QoQError, ValueError):
    """A generation request that cannot be served as asked."""


class PromptTooLongError(InvalidRequestError):
    """The prompt plus the tokens to generate do not fit the model's context."""


class InvalidSamplingError(InvalidRequestError):
    """A sampling parameter outside its valid range."""
