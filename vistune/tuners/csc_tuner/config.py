"""Config of SCEdit's CSC-Tuner (controllable SC-Tuner)."""

from __future__ import annotations

import dataclasses
from numbers import Integral
from typing import Any, ClassVar, Optional

from ...core.config import TunerConfig, real_field
from ...core.errors import TunerError

#: Widths of the condition encoder's seven convs before the last one, at ``encoder_width_ratio`` 1 (SCEdit).
ENCODER_WIDTHS = (16, 16, 32, 32, 96, 96)
#: Indices (0..6) of the encoder convs that may stride by 2; SCEdit strides all three (VAE factor 8).
STRIDED_CONVS = (2, 4, 6)


def _int_field(name: str, value: Any, allowed: "tuple[int, ...] | None" = None, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise TunerError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if allowed is not None and value not in allowed:
        raise TunerError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return int(value)


@dataclasses.dataclass
class CSCTunerConfig(TunerConfig):
    """CSC-Tuner: a condition image steers a frozen U-Net through its skip connections (SCEdit).

    A condition encoder (7 convs, SiLU between) maps the control image to latent resolution; a chain of
    zero-initialised convs, one per encoder skip (strided where the U-Net downsamples), yields a feature
    ``c_i`` of each skip's exact shape; the decoder then reads ``x + scale * (c + MLP_m(x + c))``.
    Defaults are SCEdit's SD1.5/2.1 widths (99,111,760 parameters on the SD1.5 U-Net).

    Each condition is its own tuner (its own name); the site sums their deltas, so with conditions ``k``
    a skip becomes ``x + sum_k scale_k * ctrl_k``. The per-condition weight ``w_k`` of SCEdit is this
    tuner's ``scale`` (``config.scale`` is the saved default, :func:`vistune.set_scale` changes it at run
    time, 0 is exactly the base model). SCEdit's global ``control_scale`` is a common factor: multiply
    every condition's scale by it.

    Args:
        condition_channels: output width of the condition encoder (SCEdit ``PRE_HINT_OUT_CHANNELS``, 256).
        encoder_width_ratio: multiplies the encoder widths 16/16/32/32/96/96 (``PRE_HINT_DIM_RATIO``; SDXL
            uses 2.0 with ``condition_channels=320``).
        in_channels: channels of the control image (3; one-channel maps are repeated by ``set_control``).
        dense_kernel_size: kernel of the per-skip convs, 3 (official) or 1 (``DENSE_HINT_KERNAL``).
        down_ratio: hidden width of each skip MLP as a fraction of the skip's channels (official 1.0).
        vae_scale_factor: control image size / latent size: 8 for SD's VAE; a power of two up to 8
            (the first ``log2`` of the encoder's three strided convs stride, the others keep stride 1).
        condition: optional name of the extractor in :data:`vistune.conditions.CONDITIONS` that makes this
            tuner's control images (e.g. ``"canny"``); metadata for pipelines, not used by the maths.
        scale: this condition's weight ``w_k`` (see above).
    """

    tuner_type: ClassVar[str] = "csc_tuner"
    condition_channels: int = 256
    encoder_width_ratio: float = 1.0
    in_channels: int = 3
    dense_kernel_size: int = 3
    down_ratio: float = 1.0
    vae_scale_factor: int = 8
    condition: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.condition_channels = _int_field("condition_channels", self.condition_channels)
        self.encoder_width_ratio = real_field("encoder_width_ratio", self.encoder_width_ratio)
        if not 0 < self.encoder_width_ratio <= 64:
            raise TunerError(f"encoder_width_ratio must be in (0, 64], got {self.encoder_width_ratio}")
        if int(ENCODER_WIDTHS[0] * self.encoder_width_ratio) < 1:
            raise TunerError(f"encoder_width_ratio {self.encoder_width_ratio} leaves the encoder with no channels")
        self.in_channels = _int_field("in_channels", self.in_channels)
        self.dense_kernel_size = _int_field("dense_kernel_size", self.dense_kernel_size, allowed=(1, 3))
        self.down_ratio = real_field("down_ratio", self.down_ratio)
        if not 0 < self.down_ratio <= 64:
            raise TunerError(f"down_ratio must be in (0, 64], got {self.down_ratio}")
        self.vae_scale_factor = _int_field("vae_scale_factor", self.vae_scale_factor, allowed=(1, 2, 4, 8))
        if self.condition is not None and (not isinstance(self.condition, str) or not self.condition):
            raise TunerError(f"condition must be a condition name (e.g. 'canny') or None, got {self.condition!r}")

    def encoder_widths(self) -> list[int]:
        """Output widths of the seven encoder convs (``int(w * ratio)`` as SCEdit, then ``condition_channels``)."""
        return [int(w * self.encoder_width_ratio) for w in ENCODER_WIDTHS] + [self.condition_channels]

    def encoder_strides(self) -> list[int]:
        """Stride of each encoder conv: the first ``log2(vae_scale_factor)`` of convs 2, 4, 6 stride by 2."""
        strided = STRIDED_CONVS[: self.vae_scale_factor.bit_length() - 1]
        return [2 if j in strided else 1 for j in range(len(ENCODER_WIDTHS) + 1)]

    def hidden_width(self, channels: int) -> int:
        """Hidden width of the MLP on a skip of ``channels`` channels (``int(channels * down_ratio)``, as SCEdit)."""
        width = int(channels * self.down_ratio)
        if width < 1:
            raise TunerError(f"down_ratio {self.down_ratio} leaves no hidden units for a {channels}-channel skip")
        return width
