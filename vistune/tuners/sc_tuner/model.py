"""SC-Tuner: tunes the skip connections a diffusers U-Net decoder reads."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import BackboneMismatchError
from ...core.tuner import Tuner
from ...sites.unet import UNetSkip, find_unet_skips, unet_skip_site
from .config import SCTunerConfig
from .layer import SCAdapter


class SCTuner(Tuner):
    """One :class:`SCAdapter` per tuned skip, keyed by decoder index: ``skip = x + scale * MLP_m(x)``.

    The adapters run inside the up blocks' pre-hooks, so with a frozen backbone backward starts at the
    decoder and never enters the down blocks or the mid block.
    """

    config_class = SCTunerConfig

    def __init__(self, config: SCTunerConfig, unet: nn.Module):
        super().__init__(config)
        skips = find_unet_skips(unet)
        targets = range(len(skips)) if config.target_skips is None else config.target_skips
        out_of_range = [m for m in targets if not -len(skips) <= m < len(skips)]
        if out_of_range:
            raise BackboneMismatchError(
                f"target_skips {out_of_range} do not exist: this U-Net has {len(skips)} skips "
                f"(0..{len(skips) - 1}, or -{len(skips)}..-1 from the shallow end)"
            )
        targets = sorted({m % len(skips) for m in targets})
        if len(targets) != len(config.target_skips or targets):
            raise BackboneMismatchError(f"target_skips {config.target_skips} name the same skip twice on this U-Net")
        self.skips = nn.ModuleDict(
            {str(m): SCAdapter(skips[m].channels, config.hidden_width(skips[m].channels)) for m in targets}
        )
        self.layout = {"skip_channels": [skip.channels for skip in skips]}

    def install(self, unet: nn.Module) -> None:
        unet_skip_site(unet).add_editor(unet, self.name, self._edit)

    def uninstall(self, unet: nn.Module) -> None:
        unet_skip_site(unet).remove_editor(unet, self.name)

    def _edit(self, skip: UNetSkip, x: torch.Tensor) -> torch.Tensor | None:
        scale = self.scale
        key = str(skip.decoder_index)
        if scale == 0 or key not in self.skips:
            return None
        delta = self.skips[key](x)
        return delta if scale == 1 else delta * scale
