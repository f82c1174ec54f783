"""Exceptions raised by vistune. All derive from ``ValueError`` so callers that catch bad input keep working."""


class TunerError(ValueError):
    """A tuner cannot be attached, detached, configured or used as asked."""


class BackboneMismatchError(TunerError):
    """The backbone is not one this tuner attaches to, or differs from the one a checkpoint was saved for."""


class CheckpointError(TunerError):
    """A tuner checkpoint is missing, truncated, corrupt, unsafe or in a layout vistune does not know."""
