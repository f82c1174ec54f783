"""MoSA (arXiv 2312.02923): adapters split into sparse experts, stochastically activated, merged after tuning."""

from ...core.registry import register_tuner
from ..adapter import AdapterConfig, AdapterTuner  # noqa: F401  (registers "adapter", which merge_mosa attaches)
from .config import MoSAConfig
from .layer import MoSAAdapter, MoSALinear, split_assignment
from .loss import mosa_consistency_loss
from .merge import merge_mosa
from .model import MoSATuner

register_tuner(MoSAConfig, MoSATuner)

__all__ = [
    "MoSAAdapter",
    "MoSAConfig",
    "MoSALinear",
    "MoSATuner",
    "merge_mosa",
    "mosa_consistency_loss",
    "split_assignment",
]
