"""SCEdit's CSC-Tuner (arXiv 2312.11392): condition images steer a frozen U-Net through its skip connections."""

from ...core.registry import register_tuner
from .config import CSCTunerConfig
from .control import csc_tuners, get_control, set_control
from .convert import convert_official_csc_state_dict, official_csc_blocks
from .layer import ConditionEncoder, SkipFeatureConvs
from .model import CSCTuner

register_tuner(CSCTunerConfig, CSCTuner, converters=(convert_official_csc_state_dict,))

__all__ = [
    "CSCTuner",
    "CSCTunerConfig",
    "ConditionEncoder",
    "SkipFeatureConvs",
    "convert_official_csc_state_dict",
    "csc_tuners",
    "get_control",
    "official_csc_blocks",
    "set_control",
]
