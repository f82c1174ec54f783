"""Pear (arXiv 2409.19733): prune the least important adapters and share retained ones into their positions."""

from ...core.registry import register_tuner
from ..adapter import AdapterConfig, AdapterTuner  # noqa: F401  (registers "adapter", which Pear starts from)
from .config import PearConfig
from .importance import accumulate_importance, importance_scores, reset_importance
from .model import PearTuner
from .prune import plan_sharing, prune_and_share

register_tuner(PearConfig, PearTuner)

__all__ = [
    "PearConfig",
    "PearTuner",
    "accumulate_importance",
    "importance_scores",
    "plan_sharing",
    "prune_and_share",
    "reset_importance",
]
