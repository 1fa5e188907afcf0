"""Exceptions a user can act on; the CLI prints their message as one line and exits non-zero."""


class AdvmnistError(Exception):
    """Base of every error caused by bad input rather than a bug."""


class DataError(AdvmnistError):
    """A missing, truncated or corrupt MNIST file."""


class ModelError(AdvmnistError):
    """An unknown model name or an option the model does not take."""


class CheckpointError(AdvmnistError):
    """A missing checkpoint, or one that holds another architecture."""



class InvalidValue(AdvmnistError):
    """An option or setting that is not finite, out of its range, or of the wrong type."""


class SpecError(InvalidValue):
    """An experiment spec that does not match the schema in `advmnist/validate.py`."""


class OutputError(AdvmnistError):
    """The output place cannot be written: checked before the work starts, reported if a write fails."""


class TrainingDiverged(AdvmnistError):
    """Training produced a non-finite loss or weights; the last good weights are kept."""


class TrainingCollapsed(AdvmnistError):
    """Training left a network at chance that cannot learn again: it is stopped and recorded as failed."""


class SkippedFileWarning(UserWarning):
    """A record or file that discovery could not read and left out (the CLI prints it as a warning)."""
