"""MoSA's split projection and adapter: experts as disjoint element-wise masks over one matrix."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import TunerError
from ..adapter.layer import init_down, init_up, make_activation


def split_assignment(shape: tuple[int, int], num_experts: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Which expert owns each entry of a ``shape`` matrix (uint8), from ranked random scores cut into equal bands.

    ``mode`` ``"all"`` bands the whole matrix, ``"row"`` each row, ``"column"`` each column (MoSA's
    ``Pruner.divide``). The masks ``assign == i`` are disjoint and tile the matrix.
    """
    rows, cols = shape
    if mode == "column":
        return split_assignment((cols, rows), num_experts, "row", generator).t().contiguous()
    groups, size = (1, rows * cols) if mode == "all" else (rows, cols)
    if size < num_experts:
        raise TunerError(
            f"cannot split a {rows}x{cols} projection into {num_experts} non-empty experts with split_mode "
            f"{mode!r} ({size} entries per group); use fewer experts, a wider bottleneck or split_mode 'all'"
        )
    bands = torch.arange(size) * num_experts // size
    assign = torch.empty(groups, size, dtype=torch.uint8)
    for g in range(groups):
        perm = torch.randperm(size, generator=generator)
        assign[g, perm] = bands.to(torch.uint8)
    return assign.view(rows, cols)


class MoSALinear(nn.Module):
    """A Linear split into ``num_experts`` sparse experts.

    Expert ``i`` is ``where(assign == i, weights[i], init_weight)`` with its own bias ``biases[i]``: only its
    masked entries are free (gradient masking by construction, so any optimizer and weight decay leave the
    other entries at their initial values), and an expert that is not drawn gets no gradient at all.
    """

    def __init__(self, base: nn.Linear, num_experts: int, split_mode: str, generator: torch.Generator):
        super().__init__()
        if num_experts > 255:
            raise TunerError(f"at most 255 experts per projection, got {num_experts}")
        self.num_experts = num_experts
        weight, bias = base.weight.detach(), base.bias.detach()
        self.register_buffer("init_weight", weight.clone())
        self.register_buffer("assign", split_assignment(tuple(weight.shape), num_experts, split_mode, generator))
        self.weights = nn.ParameterList([nn.Parameter(weight.clone()) for _ in range(num_experts)])
        self.biases = nn.ParameterList([nn.Parameter(bias.clone()) for _ in range(num_experts)])

    def mask(self, expert: int) -> torch.Tensor:
        return self.assign == expert

    def expert_weight(self, expert: int) -> torch.Tensor:
        return torch.where(self.mask(expert), self.weights[expert], self.init_weight)

    def merged(self, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The single (weight, bias) the experts fold into: ``"joint"`` = each expert's own entries,
        ``"add"`` = the mean of the experts (= ``(joint + (N-1) * init) / N``); bias = mean of the experts'."""
        joint = torch.gather(torch.stack(list(self.weights)), 0, self.assign.long().unsqueeze(0)).squeeze(0)
        n = self.num_experts
        weight = joint if mode == "joint" or n == 1 else (joint + (n - 1) * self.init_weight) / n
        bias = torch.stack(list(self.biases)).mean(0)
        return weight, bias

    def forward(self, x: torch.Tensor, expert: int | None, mode: str) -> torch.Tensor:
        if expert is None:
            weight, bias = self.merged(mode)
        else:
            weight, bias = self.expert_weight(expert), self.biases[expert]
        return F.linear(x, weight, bias)


#: ``draw(n)`` returns a random expert index in ``[0, n)``.
Draw = Callable[[int], int]


class MoSAAdapter(nn.Module):
    """A bottleneck adapter (``norm``, ``down``, act, ``up``) whose projections are :class:`MoSALinear`.

    With ``share_down`` the Down projection is one dense ``nn.Linear`` shared by all experts. Both projections
    start from the same initialisation as :class:`~vistune.tuners.adapter.BottleneckAdapter`.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        *,
        layernorm: bool,
        activation: str,
        dropout: float,
        num_experts: int,
        share_down: bool,
        split_mode: str,
        generator: torch.Generator,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        down, up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        init_down(down)
        init_up(up)
        self.down = down if share_down else MoSALinear(down, num_experts, split_mode, generator)
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.up = MoSALinear(up, num_experts, split_mode, generator)

    def forward(self, x: torch.Tensor, draw: Draw | None, mode: str) -> torch.Tensor:
        h = self.norm(x)
        h = self._project(self.down, h, draw, mode)
        h = self.drop(self.act(h))
        return self._project(self.up, h, draw, mode)

    @staticmethod
    def _project(proj: nn.Module, x: torch.Tensor, draw: Draw | None, mode: str) -> torch.Tensor:
        if isinstance(proj, MoSALinear):
            return proj(x, None if draw is None else draw(proj.num_experts), mode)
        return proj(x)
