"""Perturbation-Aware Suppression (VidSig, ``src/finetune/pas.py``): score each decoder layer by how much a small
weight perturbation changes the decoded images perceptually, and freeze the most sensitive ones.

VidSig adds absolute N(0, 0.01^2) noise per parameter tensor and measures the output MSE (``noise="absolute"``,
the default, with ``sigma=0.01``); ``noise="relative"`` scales it by each tensor's RMS instead, so that layers of
different weight scales are compared at the same relative change. The change is measured with the
decoder-tuning image loss (MSE + SSIM term), averaged over ``iterations`` draws. On the tiny SD decoder the two
rank very differently: absolute noise picks the output and upsampling convolutions and the shortcut, as in
VidSig's released freeze lists; relative noise picks mostly normalization layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...sites.vae import decoder_layers
from .losses import image_loss
from .train import decode


#: Default noise std per PAS noise kind: VidSig's absolute 0.01, or 10 % of each tensor's RMS.
NOISE_SIGMA = {"absolute": 0.01, "relative": 0.1}


@torch.no_grad()
def pas_sensitivity(vae: nn.Module, latents: torch.Tensor, sigma: float | None = None, iterations: int = 3,
                    seed: int = 0, include_post_quant_conv: bool = False, noise: str = "absolute") -> dict[str, float]:
    """Sensitivity of every decoder layer (name -> mean perceptual change) to weight noise of std ``sigma``
    (default 0.01 absolute, 0.1 relative); the VAE is restored exactly."""
    if noise not in NOISE_SIGMA:
        raise ValueError(f"PAS noise must be one of {sorted(NOISE_SIGMA)}, got {noise!r}")
    sigma = NOISE_SIGMA[noise] if sigma is None else sigma
    layers = decoder_layers(vae, include_post_quant_conv)
    generator = torch.Generator().manual_seed(seed)
    base = decode(vae, latents)
    scores = {}
    for name, module in layers.items():
        params = list(module.parameters(recurse=False))
        saved = [p.detach().clone() for p in params]
        total = 0.0
        for _ in range(iterations):
            for p, orig in zip(params, saved):
                scale = orig.float().pow(2).mean().sqrt().clamp_min(1e-3) if noise == "relative" else 1.0
                p.copy_(orig + sigma * scale * torch.randn(p.shape, generator=generator).to(p))
            total += float(image_loss(decode(vae, latents), base))
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
