"""Perturbation-Aware Suppression (VidSig, ``src/finetune/pas.py``): score each decoder layer by how much a small
weight perturbation changes the decoded images perceptually, and freeze the most sensitive ones.

VidSig adds absolute N(0, 0.01^2) noise per parameter tensor and measures the output MSE; here the noise is
relative (``sigma`` times each tensor's RMS, so layers of different scales are comparable) and the change is
measured with the decoder-tuning image loss (MSE + SSIM term), averaged over ``iterations`` draws.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...sites.vae import decoder_layers
from .losses import image_loss


def _decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def pas_sensitivity(vae: nn.Module, latents: torch.Tensor, sigma: float = 0.1, iterations: int = 3, seed: int = 0,
                    include_post_quant_conv: bool = False) -> dict[str, float]:
    """Sensitivity of every decoder layer (name -> mean perceptual change); the VAE is restored exactly."""
    layers = decoder_layers(vae, include_post_quant_conv)
    generator = torch.Generator().manual_seed(seed)
    base = _decode(vae, latents)
    scores = {}
    for name, module in layers.items():
        params = list(module.parameters(recurse=False))
        saved = [p.detach().clone() for p in params]
        total = 0.0
        for _ in range(iterations):
            for p, orig in zip(params, saved):
                rms = orig.float().pow(2).mean().sqrt().clamp_min(1e-3)
                p.copy_(orig + sigma * rms * torch.randn(p.shape, generator=generator).to(p))
            total += float(image_loss(_decode(vae, latents), base))
        for p, orig in zip(params, saved):
            p.copy_(orig)
        scores[name] = total / iterations
    return scores


def pas_select(scores: dict[str, float], fraction: float) -> list[str]:
    """The ``ceil(fraction * layers)`` most sensitive layers (to freeze), most sensitive first."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the frozen fraction must be in [0, 1), got {fraction}")
    ranked = sorted(scores, key=lambda n: -scores[n])
    return ranked[: math.ceil(fraction * len(ranked))]
