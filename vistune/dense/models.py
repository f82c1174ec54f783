"""Task models that take [0, 1] images: a classifier (the ViT, or HST's head on it) and a segmenter."""

from __future__ import annotations

import torch
from torch import nn

from .heads import SemanticFPNHead
from .pyramid import FPNBackbone


class _Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=True)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


class Classifier(nn.Module):
    """``vit(normalise(images))``: the ViT's own head, or HST's when an HST tuner with a head is attached."""

    def __init__(self, vit: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.vit = vit
        self.normalize = _Normalize(mean, std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(self.normalize(images))


class Segmenter(nn.Module):
    """``head(fpn(pyramid(normalise(images))))``: per-pixel class logits ``(B, K, H, W)``."""

    def __init__(self, backbone: FPNBackbone, num_classes: int, mean: list[float], std: list[float], hidden: int = 64):
        super().__init__()
        self.normalize = _Normalize(mean, std)
        self.backbone = backbone
        self.head = SemanticFPNHead(backbone.out_channels, num_classes, hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.normalize(images)), images.shape[-2:])
