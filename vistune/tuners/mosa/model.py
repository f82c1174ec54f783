"""MoSA tuner: sparse-expert adapters, one random expert per block in training, merged weights in eval."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import TunerError
from ..adapter.model import AdapterTuner
from .config import MoSAConfig
from .layer import MoSAAdapter, MoSALinear

_KIND_CODE = {"attn": 0, "mlp": 1}


class MoSATuner(AdapterTuner):
    """An :class:`AdapterTuner` whose adapters are :class:`MoSAAdapter` s.

    Training forwards draw experts from ``self.generator`` (CPU, seeded with ``config.seed``): per block, in
    forward order, first Down then Up. Two forwards therefore use two different draws, which is how the
    consistency loss is computed (see :func:`mosa_consistency_loss`). With gradient checkpointing a
    recomputed block draws again; do not combine the two. Eval forwards use the merged projections.
    """

    config_class = MoSAConfig

    def __init__(self, config: MoSAConfig, model: nn.Module):
        super().__init__(config, model)
        self.generator = torch.Generator().manual_seed(config.seed)

    def reseed(self, seed: int) -> None:
        """Restart the expert draws from ``seed`` (the masks do not change)."""
        self.generator.manual_seed(seed)

    def new_adapter(self, kind: str, index: int) -> nn.Module:
        c = self.config
        counts = dict(zip(self.targets, c.expert_counts(len(self.targets))))
        mask_generator = torch.Generator().manual_seed(c.seed * 1_000_003 + 2 * index + _KIND_CODE[kind])
        return MoSAAdapter(
            self.dim,
            c.bottleneck,
            layernorm=c.adapter_layernorm,
            activation=c.activation,
            dropout=c.dropout,
            num_experts=counts[index],
            share_down=c.share == "down",
            split_mode=c.split_mode,
            generator=mask_generator,
        )

    def draw(self, num_experts: int) -> int:
        return int(torch.randint(num_experts, (1,), generator=self.generator).item())

    def run_adapter(self, adapter: nn.Module, kind: str, index: int, x: torch.Tensor) -> torch.Tensor:
        return adapter(x, self.draw if self.training else None, self.config.merge_mode)

    def expert_counts(self) -> dict[str, int]:
        """Experts per adapter position, e.g. ``{"mlp.0": 2, "mlp.3": 4}``."""
        return {f"{kind}.{i}": self.adapter_at(kind, i).up.num_experts for kind, i in self.positions()}

    def merged_adapter_state(self, mode: str | None = None) -> dict[str, torch.Tensor]:
        """The state dict of the plain :class:`AdapterTuner` the experts merge into (``mode`` defaults to the
        config's ``merge_mode``)."""
        mode = self.config.merge_mode if mode is None else mode
        state: dict[str, torch.Tensor] = {}
        for kind, i in self.owned_positions():
            adapter = self.adapter_at(kind, i)
            prefix = f"{kind}.{i}."
            for key, value in adapter.norm.state_dict().items():
                state[prefix + "norm." + key] = value.detach().clone()
            for proj_name in ("down", "up"):
                proj = getattr(adapter, proj_name)
                if isinstance(proj, MoSALinear):
                    weight, bias = proj.merged(mode)
                else:
                    weight, bias = proj.weight, proj.bias
                state[prefix + proj_name + ".weight"] = weight.detach().clone()
                state[prefix + proj_name + ".bias"] = bias.detach().clone()
        return state

    def merge(self, backbone: nn.Module) -> None:
        raise TunerError(
            "MoSA merges its experts into one plain adapter, not into the backbone (an adapter is not a linear "
            "weight change): use vistune.tuners.mosa.merge_mosa(model, name)"
        )
