"""Decoder layers of diffusers VAEs (``AutoencoderKL``, ``AutoencoderKLTemporalDecoder``): the parametrised leaf
modules a decoder tuner can update, and a way to run them with updated weights without editing the module."""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import BackboneMismatchError

#: Leaf module types whose forward can run with updated weights (all a diffusers VAE decoder holds).
SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.GroupNorm, nn.LayerNorm)


def decoder_layers(vae: nn.Module, include_post_quant_conv: bool = False) -> dict[str, nn.Module]:
    """Name -> module for every leaf module with parameters on the decoding path (``decoder.*`` and optionally
    ``post_quant_conv``), named relative to the VAE. Raises for a model without a ``decoder``."""
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, nn.Module):
        raise BackboneMismatchError(f"{type(vae).__name__} has no .decoder; expected a diffusers AutoencoderKL-like VAE")
    roots = [("decoder", decoder)]
    pqc = getattr(vae, "post_quant_conv", None)
    if include_post_quant_conv and isinstance(pqc, nn.Module):
        roots.append(("post_quant_conv", pqc))
    layers = {}
    for prefix, root in roots:
        for name, module in root.named_modules():
            if list(module.parameters(recurse=False)):
                full = f"{prefix}.{name}" if name else prefix
                if not isinstance(module, SUPPORTED):
                    raise BackboneMismatchError(f"decoder layer {full} is a {type(module).__name__}, which vistune "
                                                "cannot update; supported: " + ", ".join(t.__name__ for t in SUPPORTED))
                layers[full] = module
    return layers


def functional_forward(module: nn.Module, params: Callable[[], dict[str, torch.Tensor]]) -> Callable:
    """A forward for ``module`` that uses ``params()`` (e.g. weight + delta) instead of its own parameters."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        p = params()
        if isinstance(self, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self._conv_forward(x, p["weight"], p.get("bias"))
        if isinstance(self, nn.Linear):
            return F.linear(x, p["weight"], p.get("bias"))
        if isinstance(self, nn.GroupNorm):
            return F.group_norm(x, self.num_groups, p.get("weight"), p.get("bias"), self.eps)
        if isinstance(self, nn.LayerNorm):
            return F.layer_norm(x, self.normalized_shape, p.get("weight"), p.get("bias"), self.eps)
        raise TypeError(type(self).__name__)

    return forward


def override_forward(module: nn.Module, forward: Callable) -> None:
    """Route calls of ``module`` through ``forward`` (an instance attribute; :func:`restore_forward` removes it)."""
    module.forward = types.MethodType(forward, module)


def restore_forward(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)
