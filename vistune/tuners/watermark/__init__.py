"""Watermark decoder tuning (Stable Signature, ICCV 2023; VidSig's PAS): fine-tune a latent decoder so everything
it decodes carries a key that a HiDDeN extractor reads back; attacks, extractor, detector."""

from ...core.registry import register_tuner
from .attacks import IMAGE_ATTACKS, VIDEO_ATTACKS, RandomAttack, get_attack
from .config import WatermarkConfig
from .detector import Detection, WatermarkDetector, WatermarkKey, load_image, match_threshold
from .hidden import ExtractorConfig, HiddenEncoder, HiddenExtractor, load_extractor, save_extractor, whiten
from .model import WatermarkTuner
from .pas import pas_select, pas_sensitivity
from .temporal import TemporalAlignment

register_tuner(WatermarkConfig, WatermarkTuner)

__all__ = [
    "IMAGE_ATTACKS", "VIDEO_ATTACKS", "Detection", "ExtractorConfig", "HiddenEncoder", "HiddenExtractor", "RandomAttack",
    "TemporalAlignment", "WatermarkConfig", "WatermarkDetector", "WatermarkKey", "WatermarkTuner", "get_attack", "load_extractor",
    "load_image", "match_threshold", "pas_select", "pas_sensitivity", "save_extractor", "whiten",
]
