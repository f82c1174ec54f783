"""The per-skip MLP of SC-Tuner."""

from __future__ import annotations

import math

import torch
from torch import nn


class SCAdapter(nn.Module):
    """``Linear_up(GELU(Linear_down(x)))`` over the channels of an NCHW map; the caller adds the residual.

    ``ln1`` keeps kaiming-uniform(a=sqrt(5)) weights, ``ln2`` starts at zero (weight and bias), so the tuned
    skip ``x + SCAdapter(x)`` equals ``x`` exactly at init. Parameter names match SCEdit's ``SCEAdapter``.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the official code
        self.ln2 = nn.Linear(hidden, dim)
        nn.init.kaiming_uniform_(self.ln1.weight, a=math.sqrt(5))
        nn.init.zeros_(self.ln2.weight)
        nn.init.zeros_(self.ln2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 1).to(self.ln1.weight.dtype)  # (B, H, W, C): Linear acts on channels
        out = self.ln2(self.act(self.ln1(tokens)))
        return out.permute(0, 3, 1, 2).to(x.dtype)
