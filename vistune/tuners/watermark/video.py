"""Video watermarking with a per-frame ``AutoencoderKL`` decoder (VidSig): the temporal objective, moving-shape
training clips, and a temporal-consistency statistic that uses the clips' exact ground truth.

VidSig's temporal alignment as released (``src/finetune/train.py``) is a loss, not a module: besides the per-frame
message loss it adds a video-level message loss on the frame-averaged logits and a perceptual loss between the
frame differences of the tuned and the original decoder, ``lambda_t * L(x_w[t+1] - x_w[t], x_0[t+1] - x_0[t])``
(:func:`temporal_loss`). Given a :class:`~vistune.tuners.watermark.temporal.TemporalAlignment`, the temporal term
compares motion-compensated residuals instead (see that module for why).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.shapes import sample_clip
from .attacks import RandomAttack
from .hidden import HiddenExtractor
from .losses import image_loss, message_loss
from .temporal import TemporalAlignment
from .train import decode


def shapes_clips(count: int, num_frames: int = 8, seed: int = 0, size: int = 32):
    """``count`` moving-shape clips: frames ``(count, T, 3, size, size)`` in [0, 1] and ``static`` masks
    ``(count, T-1, size, size)`` (True where no shape covers the pixel in frame t nor t+1, so the original
    content there does not change: the clips' background and textures are fixed to the image)."""
    frames, static = [], []
    for i in range(count):
        clip = sample_clip(np.random.default_rng([seed, i]), num_frames=num_frames, size=size)
        frames.append(clip.frames)
        background = clip.instance_masks == 0
        static.append(background[1:] & background[:-1])
    frames_t = torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3).float() / 255
    return frames_t, torch.from_numpy(np.stack(static))


def background_flicker(frames: torch.Tensor, static: torch.Tensor) -> float:
    """Mean absolute frame-to-frame change (0-255 scale) over the pixels that are static by ground truth, for
    ``(N, T, 3, H, W)`` frames: 0 for a perfectly stable video; a watermark that varies across frames raises it."""
    diff = (frames[:, 1:] - frames[:, :-1]).abs().mean(2) * 255  # (N, T-1, H, W)
    mask = static.to(diff.device)
    return float(diff[mask].mean()) if mask.any() else float("nan")


def temporal_loss(xw: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """VidSig's temporal term on ``(N, T, 3, H, W)`` videos: 100 * MSE between consecutive-frame differences."""
    return F.mse_loss(xw[:, 1:] - xw[:, :-1], x0[:, 1:] - x0[:, :-1]) * 100


def video_watermark_loss(
    vae: nn.Module,
    extractor: HiddenExtractor,
    latents: torch.Tensor,
    reference: torch.Tensor,
    key: torch.Tensor,
    lambda_w: float = 1.0,
    lambda_i: float = 1.0,
    lambda_t: float = 1.0,
    alpha_frame: float = 1.0,
    alpha_video: float = 1.0,
    alignment: TemporalAlignment | None = None,
    index: torch.Tensor | list[int] | None = None,
    attack: RandomAttack | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VidSig's objective for ``(N, T, C, h, w)`` latents and ``(N, T, 3, H, W)`` reference frames:
    ``lambda_w (alpha_frame BCE(W(x_t), key) + alpha_video BCE(mean_t W(x_t), key)) + lambda_i L_img + lambda_t L_t``,
    with ``L_t`` :func:`temporal_loss`, or ``alignment.loss`` when an alignment of the clips is given (``index``:
    which of its clips the batch holds). ``attack`` (an image attack) is applied to the frames the extractor reads."""
    if alignment is not None and index is None:
        raise ValueError("an alignment needs the batch's clip index")
    n, t = latents.shape[:2]
    xw = decode(vae, latents.flatten(0, 1))
    logits = extractor(attack(xw, generator) if attack is not None else xw).view(n, t, -1)
    xw = xw.view(n, t, *xw.shape[1:])
    loss_frame = message_loss(logits.flatten(0, 1), key)
    loss_video = message_loss(logits.mean(1), key)
    loss_i = image_loss(xw.flatten(0, 1), reference.flatten(0, 1))
    loss_t = temporal_loss(xw, reference) if alignment is None else alignment.loss(xw, reference, index)
    loss = lambda_w * (alpha_frame * loss_frame + alpha_video * loss_video) + lambda_i * loss_i + lambda_t * loss_t
    with torch.no_grad():
        acc = ((logits > 0).float() == key).float().mean().item()
        mse = torch.mean((xw - reference) ** 2).item()
    return loss, {"loss_w": loss_frame.item(), "loss_t": loss_t.item(), "bit_acc": acc,
                  "psnr": float(10 * np.log10(1 / max(mse, 1e-12)))}
