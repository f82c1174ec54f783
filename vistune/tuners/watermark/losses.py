"""Losses of watermark decoder tuning that need no downloaded weights: SSIM and the image loss built on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004; Gaussian window, ``C1 = 0.01^2``, ``C2 = 0.03^2``, data range 1),
    per channel over the valid region, averaged; ``reduction="none"`` gives one value per image. The window
    shrinks (odd) for images smaller than it."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    window = min(window, min(x.shape[-2:]) // 2 * 2 - 1 if min(x.shape[-2:]) % 2 == 0 else min(x.shape[-2:]))
    c = x.shape[1]
    w = _gaussian_window(window, sigma, x.device, x.dtype)[:1].expand(c, 1, window, window)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    per_image = s.flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()


def image_loss(xw: torch.Tensor, x0: torch.Tensor, ssim_weight: float = 0.1) -> torch.Tensor:
    """Distance of the watermarked decoder's images to the original decoder's (both [0, 1]):
    ``MSE * 100 + ssim_weight * (1 - SSIM)``. The MSE term bounds PSNR (an MSE term of 0.1 is 30 dB); the SSIM
    term keeps the residual off flat, structure-free regions, where it would be most visible."""
    return F.mse_loss(xw, x0) * 100 + ssim_weight * (1 - ssim(xw, x0))


def message_loss(logits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """BCE of the (whitened) extractor logits against the key bits, broadcast over the batch."""
    return F.binary_cross_entropy_with_logits(logits, key.expand_as(logits))
