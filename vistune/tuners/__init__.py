"""Tuners: one package per method. Importing this module registers each with the core registry."""

from .adapter import AdapterConfig, AdapterTuner
from .csc_tuner import CSCTuner, CSCTunerConfig, get_control, set_control
from .hst import HSTConfig, HSTTuner, hst_features
from .mosa import MoSAConfig, MoSATuner, merge_mosa, mosa_consistency_loss
from .pear import PearConfig, PearTuner, accumulate_importance, importance_scores, prune_and_share, reset_importance
from .sc_tuner import SCTuner, SCTunerConfig
from .watermark import WatermarkConfig, WatermarkDetector, WatermarkKey, WatermarkTuner

__all__ = [
    "AdapterConfig", "AdapterTuner", "CSCTuner", "CSCTunerConfig", "HSTConfig", "HSTTuner", "MoSAConfig", "MoSATuner", "PearConfig", "PearTuner", "SCTuner", "SCTunerConfig",
    "WatermarkConfig", "WatermarkDetector", "WatermarkKey", "WatermarkTuner",
    "accumulate_importance", "get_control", "hst_features", "importance_scores", "merge_mosa", "mosa_consistency_loss", "prune_and_share",
    "reset_importance", "set_control",
]
