"""Task heads on FPN features: a semantic-FPN segmentation head and torchvision FCOS / RetinaNet detectors."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .pyramid import STRIDES, FPNBackbone

DETECTORS = ("fcos", "retinanet")


class SemanticFPNHead(nn.Module):
    """Panoptic-FPN style semantic head: every FPN level upsampled to the finest, summed, 3x3 conv + BN + ReLU,
    1x1 classifier, bilinear upsampling to the image size."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, features: "OrderedDict[str, torch.Tensor]", size: tuple[int, int]) -> torch.Tensor:
        levels = list(features.values())
        target = levels[0].shape[-2:]
        fused = levels[0]
        for level in levels[1:]:
            fused = fused + F.interpolate(level, size=target, mode="bilinear", align_corners=False)
        return F.interpolate(self.classifier(self.fuse(fused)), size=size, mode="bilinear", align_corners=False)


def build_detector(
    backbone: FPNBackbone,
    num_classes: int,
    image_size: int | tuple[int, int],
    image_mean: list[float],
    image_std: list[float],
    arch: str = "fcos",
    **kwargs,
) -> nn.Module:
    """A torchvision FCOS or RetinaNet on ``backbone`` (FPN levels at strides 4/8/16/32).

    ``num_classes`` counts the background (labels 1..num_classes-1), as torchvision's detectors do. The
    detector's transform keeps images at ``image_size`` (the ViT's fixed input) and normalises them with the
    ViT's mean/std, so it takes [0, 1] images and targets in pixel ``xyxy`` boxes.
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if arch not in DETECTORS:
        raise ValueError(f"unknown detector {arch!r}; expected one of {DETECTORS}")
    if arch == "fcos" and backbone.out_channels % 32:
        raise ValueError(f"FCOS's head uses GroupNorm(32): FPN channels must be a multiple of 32, got {backbone.out_channels}")
    size = image_size if isinstance(image_size, int) else max(image_size)
    common = dict(min_size=size, max_size=size, image_mean=image_mean, image_std=image_std, **kwargs)
    if arch == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
        return FCOS(backbone, num_classes, anchor_generator=anchors, **common)
    anchors = AnchorGenerator(
        tuple((2 * s, int(2 * s * 1.26), int(2 * s * 1.59)) for s in STRIDES), ((0.5, 1.0, 2.0),) * len(STRIDES)
    )
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, **common)
