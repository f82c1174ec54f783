"""Config of SCEdit's SC-Tuner."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ...core.config import TunerConfig, index_list_field, real_field
from ...core.errors import TunerError


@dataclasses.dataclass
class SCTunerConfig(TunerConfig):
    """SC-Tuner: a residual MLP on every U-Net skip connection where the decoder reads it (SCEdit).

    Args:
        down_ratio: hidden width of each skip MLP as a fraction of the skip's channels (official recipe: 1.0).
        target_skips: decoder indices of the skips to tune (0 = deepest, read first); negative indices count from
            the shallow end, so ``[-4, -3, -2, -1]`` is the skips of ``conv_in`` and the first down block on SD1.5,
            SDXL and the shipped tiny U-Net alike; ``None`` tunes all.
        scale: inference strength: ``x + scale * MLP(x)``; 0 is exactly the base model. Values above 1
            extrapolate (SCEdit's own code clamps its ``tuner_scale`` at 1).
    """

    tuner_type: ClassVar[str] = "sc_tuner"
    down_ratio: float = 1.0
    target_skips: Optional[list[int]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.down_ratio = real_field("down_ratio", self.down_ratio)
        if not 0 < self.down_ratio <= 64:
            raise TunerError(f"down_ratio must be in (0, 64], got {self.down_ratio}")
        if self.target_skips is not None:
            self.target_skips = index_list_field("target_skips", self.target_skips, allow_negative=True)

    def hidden_width(self, channels: int) -> int:
        """Hidden width of the MLP on a skip of ``channels`` channels (``int(channels * down_ratio)``, as SCEdit)."""
        width = int(channels * self.down_ratio)
        if width < 1:
            raise TunerError(f"down_ratio {self.down_ratio} leaves no hidden units for a {channels}-channel skip")
        return width
