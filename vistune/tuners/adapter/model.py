"""Adapter tuner: bottleneck adapters routed into timm ViT blocks through the shared ViT block site."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import BackboneMismatchError
from ...core.tuner import Tuner
from ...sites.vit import ViTBlock, find_vit_blocks, vit_block_site
from .config import AdapterConfig
from .layer import BottleneckAdapter

#: style -> {adapter kind: site point}
STYLE_POINTS = {
    "adaptformer": {"mlp": "parallel_mlp"},
    "pfeiffer": {"mlp": "mlp_branch"},
    "houlsby": {"attn": "attn_branch", "mlp": "mlp_branch"},
}


def position_key(kind: str, index: int) -> str:
    """The name of one adapter position, e.g. ``"mlp.3"`` (used by Pear's sharing map and importances)."""
    return f"{kind}.{index}"


def target_indices(config: AdapterConfig, blocks: list[ViTBlock]) -> list[int]:
    """The block indices ``config`` targets, checked against the model's depth."""
    targets = list(range(len(blocks))) if config.target_blocks is None else list(config.target_blocks)
    missing = [i for i in targets if i >= len(blocks)]
    if missing:
        raise BackboneMismatchError(
            f"target_blocks {missing} do not exist: this ViT has {len(blocks)} blocks (0..{len(blocks) - 1})"
        )
    return targets


def vit_layout(blocks: list[ViTBlock]) -> dict:
    """What adapter checkpoints are sized for: depth and token width."""
    return {"depth": len(blocks), "embed_dim": blocks[0].dim}


class _Editor:
    """The site editor of one adapter kind; a small object (not a closure) so deepcopy keeps it bound."""

    def __init__(self, tuner: "AdapterTuner", kind: str):
        self.tuner = tuner
        self.kind = kind

    def __call__(self, block: ViTBlock, x: torch.Tensor) -> torch.Tensor | None:
        return self.tuner.delta(self.kind, block, x)


class AdapterTuner(Tuner):
    """One :class:`BottleneckAdapter` per targeted position: ``self.attn[str(i)]`` / ``self.mlp[str(i)]``.

    Each adapter adds ``scale * adapter_scale * A(x)`` at its style's point (see :class:`AdapterConfig`).
    An adapter is not a linear change of the backbone's weights (the activation sits between Down and Up),
    so :meth:`merge` into the backbone raises; MoSA's experts merge into one plain adapter instead.
    """

    config_class = AdapterConfig

    def __init__(self, config: AdapterConfig, model: nn.Module):
        super().__init__(config)
        blocks = find_vit_blocks(model)
        self.targets = target_indices(config, blocks)
        self.dim = blocks[0].dim
        self.build_adapters()
        self.layout = vit_layout(blocks)

    # -- construction, overridden by MoSA (other modules) and Pear (shared positions) -------------------------
    def positions(self) -> list[tuple[str, int]]:
        """Every (kind, block index) that has an adapter, in depth order."""
        return [(kind, i) for i in self.targets for kind in self.config.kinds]

    def owned_positions(self) -> list[tuple[str, int]]:
        """The positions whose adapter this tuner stores (all of them for a plain adapter)."""
        return self.positions()

    def new_adapter(self, kind: str, index: int) -> nn.Module:
        c = self.config
        return BottleneckAdapter(
            self.dim, c.bottleneck, layernorm=c.adapter_layernorm, activation=c.activation, dropout=c.dropout
        )

    def build_adapters(self) -> None:
        for kind in ("attn", "mlp"):
            if kind in self.config.kinds:
                owned = [i for k, i in self.owned_positions() if k == kind]
                setattr(self, kind, nn.ModuleDict({str(i): self.new_adapter(kind, i) for i in owned}))

    def adapter_at(self, kind: str, index: int) -> nn.Module | None:
        """The adapter that serves position (kind, index), or None."""
        adapters = getattr(self, kind, None)
        if adapters is None or str(index) not in adapters:
            return None
        return adapters[str(index)]

    def run_adapter(self, adapter: nn.Module, kind: str, index: int, x: torch.Tensor) -> torch.Tensor:
        return adapter(x)

    # -- hooks -----------------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        self.train(model.training)  # a tuner attached to a model in eval mode must not draw experts or drop out
        site = vit_block_site(model)
        added = []
        try:
            for kind, point in STYLE_POINTS[self.config.style].items():
                site.add_editor(model, point, self.name, _Editor(self, kind))
                added.append(point)
        except BaseException:
            for point in added:
                site.remove_editor(model, point, self.name)
            raise

    def uninstall(self, model: nn.Module) -> None:
        site = vit_block_site(model)
        for point in STYLE_POINTS[self.config.style].values():
            site.remove_editor(model, point, self.name)

    def delta(self, kind: str, block: ViTBlock, x: torch.Tensor) -> torch.Tensor | None:
        """What this tuner adds at (kind, block) for input ``x``; None when off or not targeted."""
        scale = self.scale * self.config.adapter_scale
        if scale == 0:
            return None
        adapter = self.adapter_at(kind, block.index)
        if adapter is None:
            return None
        dtype = next(adapter.parameters()).dtype
        out = self.run_adapter(adapter, kind, block.index, x.to(dtype)).to(x.dtype)
        return out if scale == 1 else out * scale
