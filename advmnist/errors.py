"""Exceptions a user can act on; the CLI prints their message as one line and exits non-zero."""


class AdvmnistError(Exception):
    """Base of every error caused by bad input rather than a bug."""


class DataError(AdvmnistError):
    """A missing, truncated or corrupt MNIST file."""


class ModelError(AdvmnistError):
    """An unknown model name or an option the model does not take."""


class CheckpointError(AdvmnistError):
    """A missing checkpoint, or one that holds another architecture."""

