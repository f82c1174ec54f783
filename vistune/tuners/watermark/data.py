"""Unwatermarked training/evaluation images and latents from the shapes world (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...data.shapes import STYLES, sample_scene
from .train import decode


def shapes_images(count: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """``count`` shapes-world scenes in every style, ``(count, 3, size, size)`` floats in [0, 1]; item ``i`` depends
    only on ``(seed, i)``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    images: list[np.ndarray] = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        style = STYLES[int(rng.integers(len(STYLES)))]
        images.append(sample_scene(rng, size=size, style=style).image)
    if not images:
        return torch.empty(0, 3, size, size)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def encode_latents(vae: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Posterior means (``.mode()``, as Stable Signature) of the VAE for [0, 1] ``images``, unscaled."""
    device = next(vae.parameters()).device
    out = [vae.encode(images[i:i + batch_size].to(device) * 2 - 1).latent_dist.mode().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The VAE decoder's images for unscaled ``latents``, as [0, 1] floats on the CPU."""
    device = next(vae.parameters()).device
    out = [decode(vae, latents[i:i + batch_size].to(device)).cpu() for i in range(0, len(latents), batch_size)]
    return torch.cat(out)


def clean_images(count: int, seed: int = 0, size: int = 32, vae: nn.Module | None = None) -> torch.Tensor:
    """Unwatermarked images: shapes scenes, and with a ``vae`` every second one replaced by its VAE
    reconstruction (the look of the decoder's outputs)."""
    images = shapes_images(count, seed, size)
    if vae is not None and count > 1:
        images[1::2] = decode_latents(vae, encode_latents(vae, images[1::2]))
    return images
