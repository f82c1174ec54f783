"""The condition side of CSC-Tuner: the encoder to latent resolution and the chain of per-skip convs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CSCTunerConfig


class ConditionEncoder(nn.Sequential):
    """Seven 3x3 convs with SiLU between (none after the last): control image -> latent-resolution map.

    Widths 16/16/32/32/96/96 (times ``encoder_width_ratio``) then ``condition_channels``; convs 2, 4, 6
    stride by 2 for a VAE factor of 8. Default PyTorch init, as SCEdit; module indices 0, 2, ..., 12 match
    SCEdit's ``pre_hint_blocks`` so official weights load by renaming only.
    """

    def __init__(self, config: CSCTunerConfig):
        layers: list[nn.Module] = []
        in_channels = config.in_channels
        for j, (width, stride) in enumerate(zip(config.encoder_widths(), config.encoder_strides())):
            if j:
                layers.append(nn.SiLU())
            layers.append(nn.Conv2d(in_channels, width, 3, stride=stride, padding=1))
            in_channels = width
        super().__init__(*layers)


class SkipFeatureConvs(nn.ModuleList):
    """One zero-initialised conv per encoder skip, chained: ``h_i = conv_i(SiLU(h_{i-1}))``, ``c_i = h_i``.

    Conv ``i`` maps the previous width to skip ``i``'s channels and strides by 2 exactly where the U-Net's
    encoder downsampled (a 3x3 conv with padding 1, or 1x1 with padding 0, halves an H x W map to
    ceil(H/2) x ceil(W/2), as diffusers' downsamplers do), so ``c_i`` has the shape of encoder skip ``i``.
    Weights and biases start at zero, so every ``c_i`` is exactly 0 at init.
    """

    def __init__(self, in_channels: int, skips: list[tuple[int, bool]], kernel_size: int):
        convs = []
        for channels, downsample in skips:
            conv = nn.Conv2d(
                in_channels, channels, kernel_size, stride=2 if downsample else 1, padding=kernel_size // 2
            )
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            convs.append(conv)
            in_channels = channels
        super().__init__(convs)

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for conv in self:
            h = conv(F.silu(h))
            features.append(h)
        return features
