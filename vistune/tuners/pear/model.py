"""Pear tuner: an adapter tuner whose pruned positions run a shared retained adapter."""

from __future__ import annotations

from torch import nn

from ...core.errors import BackboneMismatchError
from ..adapter.model import AdapterTuner, position_key
from .config import PearConfig, parse_position


class PearTuner(AdapterTuner):
    """Stores one adapter per retained position; each position in ``config.shared`` runs the retained adapter
    it maps to (the same module object, so training it through any position updates all its users)."""

    config_class = PearConfig

    def __init__(self, config: PearConfig, model: nn.Module):
        super().__init__(config, model)
        valid = {position_key(kind, i) for kind, i in self.positions()}
        unknown = sorted({k for pair in config.shared.items() for k in pair} - valid, key=parse_position)
        if unknown:
            raise BackboneMismatchError(
                f"the Pear sharing map names positions {unknown} that this ViT ({self.layout['depth']} blocks, "
                f"targets {self.targets}) does not have"
            )

    def owned_positions(self) -> list[tuple[str, int]]:
        shared = self.config.shared
        return [(kind, i) for kind, i in self.positions() if position_key(kind, i) not in shared]

    def adapter_at(self, kind: str, index: int) -> nn.Module | None:
        retained = self.config.shared.get(position_key(kind, index))
        if retained is not None:
            kind, index = parse_position(retained)
        return super().adapter_at(kind, index)

    def sharing(self) -> dict[str, list[str]]:
        """Retained position -> every position it serves (itself first)."""
        users = {position_key(k, i): [position_key(k, i)] for k, i in self.owned_positions()}
        for pruned, retained in self.config.shared.items():
            users[retained].append(pruned)
        return users
