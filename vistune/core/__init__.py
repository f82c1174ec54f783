"""The tuner API: configs, registry, attach/detach, scales, save/load. Knows no backbone or tuner in detail."""

from .config import TunerConfig
from .errors import BackboneMismatchError, CheckpointError, TunerError
from .model import (
    attach,
    detach,
    disabled,
    get_tuner,
    list_tuners,
    merge_and_unload,
    parameter_summary,
    print_trainable_parameters,
    set_scale,
    trainable_parameters,
)
from .registry import register_tuner, registered_tuners
from .serialization import CONFIG_NAME, WEIGHTS_NAME, load_tuners, read_state_dict, save_tuners
from .tuner import Tuner

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "BackboneMismatchError",
    "CheckpointError",
    "Tuner",
    "TunerConfig",
    "TunerError",
    "attach",
    "detach",
    "disabled",
    "get_tuner",
    "list_tuners",
    "load_tuners",
    "merge_and_unload",
    "parameter_summary",
    "print_trainable_parameters",
    "read_state_dict",
    "register_tuner",
    "registered_tuners",
    "save_tuners",
    "set_scale",
    "trainable_parameters",
]
