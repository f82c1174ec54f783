"""Config of watermark decoder tuning (Stable Signature / VidSig)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ...core.config import TunerConfig, real_field
from ...core.errors import TunerError


@dataclasses.dataclass
class WatermarkConfig(TunerConfig):
    """Fine-tune a latent decoder so its outputs carry ``key`` (Stable Signature; PAS from VidSig).

    The tuner holds one additive weight update per tuned decoder parameter (zero at attach, so the decoder is
    unchanged until trained); :func:`vistune.merge_and_unload` folds them into the weights, leaving a plain
    diffusers ``AutoencoderKL`` that watermarks every image it decodes.

    Args:
        key: the message as a string of 0/1 (``WatermarkKey.to_string()``); its length is the extractor's bits.
        frozen_layers: decoder module names (e.g. ``"up_blocks.0.upsamplers.0.conv"``) left untouched; PAS
            (:func:`vistune.tuners.watermark.pas.pas_select`) fills it with the most perceptually sensitive ones.
        include_post_quant_conv: also tune ``post_quant_conv`` (part of the decoding path).
    """

    tuner_type: ClassVar[str] = "watermark"
    key: str = ""
    frozen_layers: Optional[list[str]] = None
    include_post_quant_conv: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.key, str) or not self.key or set(self.key) - {"0", "1"}:
            raise TunerError(f"key must be a non-empty string of 0/1 bits, got {self.key!r}")
        if self.frozen_layers is not None:
            if not isinstance(self.frozen_layers, (list, tuple)) or not all(isinstance(n, str) for n in self.frozen_layers):
                raise TunerError(f"frozen_layers must be a list of module names, got {self.frozen_layers!r}")
            self.frozen_layers = sorted(set(self.frozen_layers))
        if not isinstance(self.include_post_quant_conv, bool):
            raise TunerError("include_post_quant_conv must be a bool")

    @property
    def num_bits(self) -> int:
        return len(self.key)
