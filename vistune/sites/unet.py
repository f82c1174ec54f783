"""Skip connections of diffusers U-Nets: where they are, and one shared set of hooks that edits them.

A diffusers U-Net collects ``down_block_res_samples``: the ``conv_in`` output, then every resnet(+attention)
output and every downsampler output of the encoder. Each up block receives its share as
``res_hidden_states_tuple`` and consumes the *last* element first. ``UNet2DConditionModel`` passes the tuple
as a keyword, ``UNet2DModel`` positionally. A forward pre-hook on each up block rewrites the tuple, so tuners
change only what the decoder reads: the encoder's own forward (and its backward) is untouched, and no tensor
of the encoder needs to be kept for backward when the backbone is frozen.

Several tuners may edit the same skip. Each contributes a *delta* computed from the original skip tensor and
the site adds them: ``x_new = x + sum_k delta_k(x)``, which is how SCEdit composes SC- and CSC-Tuners. Deltas
are summed in the order of their editors' keys (tuner names), so the result does not depend on the order the
tuners were attached or loaded in. FreeU, when enabled, acts after these hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import BackboneMismatchError


@dataclasses.dataclass(frozen=True)
class UNetSkip:
    """One skip connection of a U-Net.

    ``encoder_index`` is its position in ``down_block_res_samples`` (0 = ``conv_in`` output);
    ``decoder_index`` the order in which the decoder consumes it (0 = deepest, consumed first; SCEdit's ``m``);
    ``up_block``/``position`` where it sits in that up block's ``res_hidden_states_tuple``;
    ``downsample`` whether a downsampler produced it; ``stride`` its resolution divisor relative to ``conv_in``.
    """

    encoder_index: int
    decoder_index: int
    channels: int
    up_block: int
    position: int
    downsample: bool
    stride: int


#: Returns the change to add to one skip tensor, or ``None`` for no change.
SkipEditor = Callable[[UNetSkip, torch.Tensor], "torch.Tensor | None"]


def _require_unet(unet: nn.Module) -> None:
    parts = [getattr(unet, attr, None) for attr in ("conv_in", "down_blocks", "up_blocks")]
    if parts[0] is None or not all(isinstance(p, nn.ModuleList) for p in parts[1:]):
        raise BackboneMismatchError(
            f"{type(unet).__name__} has no U-Net skip connections: expected a diffusers U-Net "
            "(UNet2DConditionModel, UNet2DModel) with conv_in, down_blocks and up_blocks"
        )


def _channels(module: nn.Module, what: str) -> int:
    channels = getattr(module, "out_channels", None)
    if not isinstance(channels, int):
        raise BackboneMismatchError(f"cannot read the output channels of {what} ({type(module).__name__})")
    return channels


def find_unet_skips(unet: nn.Module) -> list[UNetSkip]:
    """Every skip connection of a diffusers U-Net, in decoder order (``decoder_index`` 0 first).

    Reads the module tree only (no forward pass), so it works on a model built on the ``meta`` device.
    SD1.5/2.1 give 12 skips, SDXL 9.
    """
    _require_unet(unet)
    encoder: list[tuple[int, bool, int]] = [(_channels(unet.conv_in, "conv_in"), False, 1)]
    stride = 1
    for b, block in enumerate(unet.down_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", ())):
            encoder.append((_channels(resnet, f"down_blocks.{b}.resnets.{j}"), False, stride))
        for j, down in enumerate(getattr(block, "downsamplers", None) or ()):
            stride *= 2
            encoder.append((_channels(down, f"down_blocks.{b}.downsamplers.{j}"), True, stride))

    consumed = sum(len(getattr(block, "resnets", ())) for block in unet.up_blocks)
    if consumed != len(encoder):
        raise BackboneMismatchError(
            f"{type(unet).__name__}: the encoder produces {len(encoder)} skips but the up blocks consume "
            f"{consumed}; this U-Net layout is not supported"
        )

    skips: list[UNetSkip] = []
    remaining = list(range(len(encoder)))
    for b, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        taken, remaining = remaining[-n:], remaining[:-n]
        first = len(skips)
        for position, encoder_index in enumerate(taken):
            channels, downsample, skip_stride = encoder[encoder_index]
            skips.append(
                UNetSkip(
                    encoder_index=encoder_index,
                    decoder_index=first + (n - 1 - position),  # the last tuple element is read first
                    channels=channels,
                    up_block=b,
                    position=position,
                    downsample=downsample,
                    stride=skip_stride,
                )
            )
    skips.sort(key=lambda s: s.decoder_index)
    _check_up_block_inputs(unet, skips)
    return skips


def _check_up_block_inputs(unet: nn.Module, skips: list[UNetSkip]) -> None:
    """Each up-block resnet reads ``cat([hidden, skip])``: its input width must be hidden width + skip width.

    Confirms the skip-to-resnet assignment against the module tree before any hook is installed.
    """
    mid = getattr(unet, "mid_block", None)
    mid_resnets = getattr(mid, "resnets", None)
    hidden = _channels(mid_resnets[-1], "mid_block") if mid_resnets else skips[0].channels
    by_place = {(s.up_block, s.position): s for s in skips}
    for b, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        for k, resnet in enumerate(block.resnets):
            skip = by_place[(b, n - 1 - k)]
            in_channels = getattr(resnet, "in_channels", None)
            if isinstance(in_channels, int) and in_channels != hidden + skip.channels:
                raise BackboneMismatchError(
                    f"up_blocks.{b}.resnets.{k} reads {in_channels} channels, expected {hidden} hidden + "
                    f"{skip.channels} skip; this U-Net layout is not supported"
                )
            hidden = _channels(resnet, f"up_blocks.{b}.resnets.{k}")


_SITE_ATTR = "_vistune_unet_skip_site"


class _SkipHook:
    """The pre-hook of one up block; a small object (not a closure) so it survives deepcopy and pickling."""

    def __init__(self, site: "UNetSkipSite", block_index: int):
        self.site = site
        self.block_index = block_index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        return self.site.pre_hook(self.block_index, args, kwargs)


class UNetSkipSite:
    """The up-block pre-hooks of one U-Net, shared by every tuner that edits its skips.

    The site lives on the U-Net (a private attribute) only while at least one editor is registered, so a U-Net
    with no tuners runs its stock code, and a ``deepcopy`` of a tuned U-Net carries its own site and hooks.
    """

    def __init__(self, unet: nn.Module):
        self.skips = find_unet_skips(unet)
        self._by_block: dict[int, dict[int, UNetSkip]] = {}
        for skip in self.skips:
            self._by_block.setdefault(skip.up_block, {})[skip.position] = skip
        self._editors: dict[str, SkipEditor] = {}

    @property
    def editors(self) -> dict[str, SkipEditor]:
        return dict(self._editors)

    def add_editor(self, unet: nn.Module, key: str, editor: SkipEditor) -> None:
        """Route every skip through ``editor``; ``key`` (the tuner's name) orders the deltas and removes it again."""
        if key in self._editors:
            raise KeyError(f"an editor with key {key!r} is already registered")
        if not self._editors:
            for b, block in enumerate(unet.up_blocks):
                block.register_forward_pre_hook(_SkipHook(self, b), with_kwargs=True)
        self._editors = dict(sorted({**self._editors, key: editor}.items()))

    def remove_editor(self, unet: nn.Module, key: str) -> None:
        """Unregister ``key``; the last one out removes the hooks and the site itself."""
        self._editors.pop(key, None)
        if self._editors:
            return
        for block in unet.up_blocks:
            for hook_id, hook in list(block._forward_pre_hooks.items()):
                if isinstance(hook, _SkipHook) and hook.site is self:
                    del block._forward_pre_hooks[hook_id]
                    block._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        if unet.__dict__.get(_SITE_ATTR) is self:
            del unet.__dict__[_SITE_ATTR]

    def pre_hook(self, block_index: int, args: tuple, kwargs: dict[str, Any]):
        if "res_hidden_states_tuple" in kwargs:
            kwargs["res_hidden_states_tuple"] = self._edit(block_index, kwargs["res_hidden_states_tuple"])
        elif len(args) >= 2:  # UNet2DModel calls up blocks positionally: (hidden, res_samples, temb, ...)
            args = (args[0], self._edit(block_index, args[1]), *args[2:])
        else:
            raise BackboneMismatchError(f"up_blocks.{block_index} was called without res_hidden_states_tuple")
        return args, kwargs

    def _edit(self, block_index: int, res: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        skips = self._by_block[block_index]
        if len(res) != len(skips):
            raise BackboneMismatchError(
                f"up_blocks.{block_index} received {len(res)} skips, expected {len(skips)}"
            )
        edited = []
        for position, x in enumerate(res):
            skip = skips[position]
            if x.shape[1] != skip.channels:
                raise BackboneMismatchError(
                    f"skip {skip.decoder_index} has {x.shape[1]} channels at run time, expected {skip.channels}"
                )
            out = x
            for editor in self._editors.values():
                delta = editor(skip, x)
                if delta is not None:
                    out = out + delta
            edited.append(out)
        return tuple(edited)


def unet_skip_site(unet: nn.Module) -> UNetSkipSite:
    """The shared skip site of ``unet``, created on first use (it removes itself with its last editor)."""
    site = unet.__dict__.get(_SITE_ATTR)
    if site is None:
        site = UNetSkipSite(unet)
        unet.__dict__[_SITE_ATTR] = site
    return site
