"""vistune: vision-side tuners for frozen diffusers and timm backbones.

    import vistune
    vistune.attach(unet, vistune.SCTunerConfig(), name="style")
    vistune.save_tuners(unet, "out/style")
"""

__version__ = "0.1.0"

from .core import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    BackboneMismatchError,
    CheckpointError,
    Tuner,
    TunerConfig,
    TunerError,
    attach,
    detach,
    disabled,
    get_tuner,
    list_tuners,
    load_tuners,
    merge_and_unload,
    parameter_summary,
    print_trainable_parameters,
    register_tuner,
    registered_tuners,
    save_tuners,
    set_scale,
    trainable_parameters,
)
from .tuners import SCTuner, SCTunerConfig

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "BackboneMismatchError",
    "CheckpointError",
    "SCTuner",
    "SCTunerConfig",
    "Tuner",
    "TunerConfig",
    "TunerError",
    "__version__",
    "attach",
    "detach",
    "disabled",
    "get_tuner",
    "list_tuners",
    "load_tuners",
    "merge_and_unload",
    "parameter_summary",
    "print_trainable_parameters",
    "register_tuner",
    "registered_tuners",
    "save_tuners",
    "set_scale",
    "trainable_parameters",
]
