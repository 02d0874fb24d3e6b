"""Errors users can catch by kind: each names the bad input in its message."""


class QoQError(Exception):
    """Base class of every error qoq-jax raises on purpose."""


class UnsupportedModelError(QoQError, ValueError):
    """An architecture, option or file type this library does not implement."""


class CheckpointError(QoQError, ValueError):
    """Missing, truncated or mismatched weights; nothing was loaded."""


class InvalidRequestError(QoQError, ValueError):
    """A generation request that cannot be served as asked."""


class PromptTooLongError(InvalidRequestError):
    """The prompt plus the tokens to generate do not fit the model's context."""


class InvalidSamplingError(InvalidRequestError):
    """A sampling parameter outside its valid range."""
