"""Multi-scale features (strides 4/8/16/32) from a timm ViT, and torchvision's FPN on top of them."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from ..sites.vit import find_vit_blocks, vit_patch_maps
from ..tuners.hst.model import check_image_size, find_hst, hst_features

STRIDES = (4, 8, 16, 32)


def vit_normalization(vit: nn.Module) -> tuple[list[float], list[float]]:
    """The ``(mean, std)`` the ViT expects its [0, 1] input normalised with (timm's pretrained_cfg; 0.5/0.5 if none)."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean = [float(v) for v in cfg.get("mean", (0.5, 0.5, 0.5))]
    std = [float(v) for v in cfg.get("std", (0.5, 0.5, 0.5))]
    return mean, std


class HSTPyramid(nn.Module):
    """The 4 side-stage maps of the HST tuner attached to ``vit`` (normalised images in, an OrderedDict out)."""

    def __init__(self, vit: nn.Module, name: str | None = None):
        super().__init__()
        self.vit = vit
        self.tuner_name = name
        self.channels = list(find_hst(vit, name).config.stage_dims)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((str(i), f) for i, f in enumerate(hst_features(self.vit, images, self.tuner_name)))


class ViTSimplePyramid(nn.Module):
    """Baseline pyramid for a plain ViT: its last (normed) patch map resized to strides 4/8/16/32 (ViTDet's simple
    pyramid with the learned up/down convolutions left to the FPN's lateral convs)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        if not hasattr(vit, "forward_features") or not isinstance(getattr(vit, "num_prefix_tokens", None), int):
            find_vit_blocks(vit)  # raises the site's clear error for a non-ViT
        # read from the model, not its blocks: peft LoRA replaces the blocks' Linear layers
        self.channels = [int(vit.num_features)] * len(STRIDES)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        grid = check_image_size(self.vit, images)
        tokens = self.vit.forward_features(images)
        fmap = vit_patch_maps(tokens, num_prefix_tokens=self.num_prefix_tokens, grid_size=grid)
        height, width = images.shape[-2:]
        out = OrderedDict()
        for i, stride in enumerate(STRIDES):
            size = (max(1, height // stride), max(1, width // stride))
            if size[0] >= fmap.shape[-2]:
                out[str(i)] = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
            else:
                out[str(i)] = F.adaptive_avg_pool2d(fmap, size)
        return out


class FPNBackbone(nn.Module):
    """``pyramid`` followed by ``torchvision.ops.FeaturePyramidNetwork``; ``out_channels`` as torchvision's
    detectors expect of a backbone."""

    def __init__(self, pyramid: nn.Module, out_channels: int = 64):
        super().__init__()
        self.body = pyramid
        self.fpn = FeaturePyramidNetwork(list(pyramid.channels), out_channels)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(images))
