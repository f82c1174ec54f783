"""The bottleneck adapter module: ``Up(act(Down(LN(x))))`` over the token width."""

from __future__ import annotations

import math

import torch
from torch import nn


def make_activation(name: str) -> nn.Module:
    """``"gelu"`` (exact erf GELU), ``"relu"`` or ``"silu"``."""
    return {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}[name]()


def init_down(linear: nn.Linear) -> None:
    """Down projection: kaiming-uniform(a=sqrt(5)) weight (torch's Linear default), zero bias (AdaptFormer)."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    nn.init.zeros_(linear.bias)


def init_up(linear: nn.Linear) -> None:
    """Up projection: zero weight and bias, so the adapter outputs exactly 0 at init."""
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


class BottleneckAdapter(nn.Module):
    """``up(drop(act(down(norm(x)))))``; the caller scales the output and adds it where its style says.

    ``norm`` is a LayerNorm (or Identity when ``layernorm`` is False), ``down`` is ``Linear(dim, bottleneck)``,
    ``up`` is ``Linear(bottleneck, dim)`` initialised to zero: the adapter is exactly zero at init.
    """

    def __init__(self, dim: int, bottleneck: int, *, layernorm: bool, activation: str, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        init_down(self.down)
        init_up(self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(self.norm(x)))))
