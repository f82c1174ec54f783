"""The modules of HST's side network, as in the official ``models/vit_custom_modules.py`` (AFeng-x/HST)."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

#: LayerNorm of the side blocks and stage outputs (timm's ViT norm_layer, as the official code passes it).
SideNorm = partial(nn.LayerNorm, eps=1e-6)


def init_side_weights(module: nn.Module) -> None:
    """The official init: trunc-normal(0.02) Linear weights, zero biases; LayerNorm 1/0; conv normal(sqrt(2/fan_out))."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            module.bias.data.zero_()


class Stem(nn.Module):
    """Stage 1 embedding (official ``Head``): 3x3 s2 conv (no bias) + BN + ReLU, 2x2 s2 conv, LayerNorm -> stride 4."""

    def __init__(self, dim: int, in_chans: int = 3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, dim, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, kernel_size=2, stride=2),
        )
        self.norm = nn.LayerNorm(dim)
        self.apply(init_side_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.conv(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class OverlapPatchEmbed(nn.Module):
    """Stages 2-4 embedding: 3x3 stride-2 conv (padding 1) + LayerNorm, halving the resolution."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 3, stride: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_side_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class SideCrossAttention(nn.Module):
    """Official ``M_C_Attention``: queries from the side tokens, keys/values from a few ViT tokens (linear cost)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(kv)), split(self.v(kv)))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SideMlp(nn.Module):
    """Official ``Mlp_LE``: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SideBlock(nn.Module):
    """Official ``M_Block``: ``x += CrossAttn(norm1(x), kv)``; ``x += bridged ViT map``; ``x += MLP(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = SideNorm(dim)
        self.attn = SideCrossAttention(dim, num_heads)
        self.norm2 = SideNorm(dim)
        self.mlp = SideMlp(dim, int(dim * mlp_ratio))
        self.apply(init_side_weights)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, vit: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), kv)
        x = x + vit
        return x + self.mlp(self.norm2(x))


class ClassifierHead(nn.Module):
    """Mean pool of the last stage's tokens -> ``BatchNorm1d(affine=False)`` -> Linear (official ``fc_norm``/``head``)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc_norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        init_side_weights(self.fc)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc_norm(feature_map.flatten(2).mean(-1)))
