"""Pieces of watermark decoder tuning shared by ``scripts/train_watermark.py``, the benchmark and the tests."""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from ...core.model import attach, merge_and_unload
from .attacks import RandomAttack
from .config import WatermarkConfig
from .hidden import HiddenExtractor
from .losses import image_loss, message_loss


def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Decoder images in [0, 1] for unscaled latents (differentiable; values outside [0, 1] are clamped)."""
    return (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)


def attach_watermark(vae: nn.Module, config: WatermarkConfig, name: str = "watermark"):
    """Attach a trainable :class:`WatermarkTuner` to ``vae`` (the VAE's own weights stay frozen)."""
    return attach(vae, config, name=name)


def watermark_loss(
    vae: nn.Module,
    extractor: HiddenExtractor,
    latents: torch.Tensor,
    reference: torch.Tensor,
    key: torch.Tensor,
    lambda_w: float = 1.0,
    lambda_i: float = 1.0,
    attack: RandomAttack | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stable Signature's objective ``lambda_w * BCE(W(x_w), key) + lambda_i * L_img(x_w, x_0)`` where ``x_w`` is
    the tuned decoder's image, ``x_0 = reference`` the original decoder's, ``W`` the frozen extractor, optionally
    reading ``x_w`` through a random training attack. Returns the loss and logged values (bit accuracy, PSNR)."""
    xw = decode(vae, latents)
    seen = attack(xw, generator) if attack is not None else xw
    logits = extractor(seen)
    loss_w = message_loss(logits, key)
    loss_i = image_loss(xw, reference)
    loss = lambda_w * loss_w + lambda_i * loss_i
    with torch.no_grad():
        mse = torch.mean((xw - reference) ** 2).item()
        acc = ((logits > 0).float() == key).float().mean().item()
    logs = {"loss_w": loss_w.item(), "loss_i": loss_i.item(), "bit_acc": acc,
            "psnr": 10 * torch.log10(torch.tensor(1 / max(mse, 1e-12))).item()}
    return loss, logs


def merged_vae(vae: nn.Module, name: str = "watermark") -> nn.Module:
    """A copy of ``vae`` with the watermark tuner folded into its decoder weights (a plain diffusers VAE)."""
    out = copy.deepcopy(vae)
    merge_and_unload(out, name)
    return out


def save_vae(vae: nn.Module, output_dir: str | os.PathLike) -> Path:
    """``vae.save_pretrained`` (safetensors) into a staging folder renamed into place, so a crash never leaves a
    half-written model folder."""
    output_dir = Path(output_dir)
    staging = output_dir.with_name(f".{output_dir.name}.{uuid.uuid4().hex}.tmp")
    vae.save_pretrained(staging, safe_serialization=True)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return output_dir
