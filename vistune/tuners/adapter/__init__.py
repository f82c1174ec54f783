"""Bottleneck adapters on timm ViT blocks: AdaptFormer (parallel), Pfeiffer (sequential), Houlsby (two per block)."""

from ...core.registry import register_tuner
from .config import AdapterConfig
from .layer import BottleneckAdapter
from .model import AdapterTuner, position_key

register_tuner(AdapterConfig, AdapterTuner)

__all__ = ["AdapterConfig", "AdapterTuner", "BottleneckAdapter", "position_key"]
