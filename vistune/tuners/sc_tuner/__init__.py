"""SCEdit's SC-Tuner (arXiv 2312.11392): residual MLPs on U-Net skip connections."""

from ...core.registry import register_tuner
from .config import SCTunerConfig
from .convert import convert_official_sc_state_dict
from .layer import SCAdapter
from .model import SCTuner

register_tuner(SCTunerConfig, SCTuner, converters=(convert_official_sc_state_dict,))

__all__ = ["SCAdapter", "SCTuner", "SCTunerConfig", "convert_official_sc_state_dict"]
