"""Hierarchical Side-Tuning (HST, arXiv 2310.05393) on timm ViTs: multi-scale side features from a frozen ViT."""

from ...core.registry import register_tuner
from .config import HSTConfig
from .model import HSTTuner, check_image_size, find_hst, hst_features

register_tuner(HSTConfig, HSTTuner)

__all__ = ["HSTConfig", "HSTTuner", "check_image_size", "find_hst", "hst_features"]
