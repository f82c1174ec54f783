"""Temporal Alignment for video watermark tuning: motion-compensate consecutive frames before the temporal loss.

VidSig's released temporal term (:func:`vistune.tuners.watermark.video.temporal_loss`) is an MSE between the
consecutive-frame differences of the tuned and the original decoder, i.e. on the change of the watermark residual
``r = x_w - x_0`` at a fixed pixel. Two things keep it from holding the background steady: the squared error
puts almost no weight on the many small changes that make up flicker, and where content moves it asks the
residual to stay in place while the decoder (which sees one frame at a time) carries it along with the content.

:class:`TemporalAlignment` estimates the original video's motion once, from the frozen decoder's frames (OpenCV
Farneback optical flow, backward from frame t+1 to frame t), and keeps per pixel the zero motion where it explains
the pixel as well as the flow (within ``zero_motion_tolerance``: Farneback's sub-pixel noise on static texture
would otherwise blur the residual it warps), and drops pixels neither explains (occlusions, photometric error
above ``max_error``). :meth:`TemporalAlignment.loss` then penalizes ``|r[t+1] - warp(r[t])|`` on the kept pixels,
an L1 term because flicker is judged by mean absolute change. It holds no trainable weights and is used in
training only: the tuned decoder stays a plain per-frame decoder. :meth:`TemporalAlignment.identity` is the same
term without motion compensation, for ablations.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _gray(frame: torch.Tensor) -> np.ndarray:
    return cv2.cvtColor((frame.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY)


def _backward_flow(frames: torch.Tensor) -> torch.Tensor:
    """Farneback flow ``(T-1, H, W, 2)`` (x, y) from frame t+1 back to frame t of one ``(T, 3, H, W)`` clip."""
    gray = [_gray(f) for f in frames]
    # pyr_scale 0.5, 2 levels, 7-px window, 3 iterations, poly_n 5, poly_sigma 1.1: small enough for 32-px frames
    flows = [cv2.calcOpticalFlowFarneback(gray[t + 1], gray[t], None, 0.5, 2, 7, 3, 5, 1.1, 0)
             for t in range(len(gray) - 1)]
    return torch.from_numpy(np.stack(flows))


def _identity_grid(height: int, width: int) -> torch.Tensor:
    """``(H, W, 2)`` normalized (x, y) positions of every pixel, for ``grid_sample`` with ``align_corners=True``."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xs / max(width - 1, 1) * 2 - 1, ys / max(height - 1, 1) * 2 - 1], -1)


def _warp(frames: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample ``(B, C, H, W)`` frames at the normalized positions ``grid`` ``(B, H, W, 2)``."""
    return F.grid_sample(frames, grid.to(frames.dtype), mode="bilinear", padding_mode="border", align_corners=True)


class TemporalAlignment(nn.Module):
    """Per clip and frame pair, where each pixel of frame t+1 came from in frame t (``grid``, normalized for
    ``grid_sample``) and whether that is trusted (``valid``); built with :meth:`from_frames`."""

    def __init__(self, grid: torch.Tensor, valid: torch.Tensor):
        super().__init__()
        if grid.ndim != 5 or grid.shape[-1] != 2 or grid.shape[:4] != valid.shape:
            raise ValueError(f"grid (N, T-1, H, W, 2) and valid (N, T-1, H, W) expected, got {tuple(grid.shape)} "
                             f"and {tuple(valid.shape)}")
        self.register_buffer("grid", grid.float(), persistent=False)
        self.register_buffer("valid", valid.bool(), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_frames(cls, frames: torch.Tensor, max_error: float = 0.05,
                    zero_motion_tolerance: float = 0.0125) -> "TemporalAlignment":
        """Align ``(N, T, 3, H, W)`` frames in [0, 1] (the original decoder's)."""
        if frames.ndim != 5 or frames.shape[1] < 2 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (N, T >= 2, 3, H, W), got {tuple(frames.shape)}")
        frames = frames.detach().float().cpu()
        h, w = frames.shape[-2:]
        identity = _identity_grid(h, w)
        scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)])
        grids, valids = [], []
        for clip in frames:
            grid = identity + _backward_flow(clip) * scale  # (T-1, H, W, 2)
            target, source = clip[1:], clip[:-1]
            err_flow = (target - _warp(source, grid)).abs().mean(1)
            err_zero = (target - source).abs().mean(1)
            keep_zero = err_zero <= err_flow + zero_motion_tolerance
            grids.append(torch.where(keep_zero[..., None], identity, grid))
            valids.append(torch.where(keep_zero, err_zero, err_flow) < max_error)
        return cls(torch.stack(grids), torch.stack(valids))

    @classmethod
    def identity(cls, num_clips: int, num_frames: int, height: int, width: int) -> "TemporalAlignment":
        """No motion compensation: every pixel compared in place and trusted (the ablation of the flow)."""
        grid = _identity_grid(height, width)
        return cls(grid.expand(num_clips, num_frames - 1, height, width, 2).clone(),
                   torch.ones(num_clips, num_frames - 1, height, width, dtype=torch.bool))

    def __len__(self) -> int:
        return self.grid.shape[0]

    def loss(self, xw: torch.Tensor, x0: torch.Tensor, index: torch.Tensor | list[int]) -> torch.Tensor:
        """``100 * mean |r[t+1] - warp(r[t])|`` over the trusted pixels of clips ``index``, with ``r = xw - x0``
        for ``(n, T, 3, H, W)`` videos in [0, 1] (a loss of 1 is a mean change of one percent of the range)."""
        index = torch.as_tensor(index, device=self.grid.device)
        grid, valid = self.grid[index].flatten(0, 1), self.valid[index]
        if xw.shape[:2] != (len(index), valid.shape[1] + 1) or xw.shape[-2:] != valid.shape[-2:]:
            raise ValueError(f"videos of shape {tuple(xw.shape)} do not match the alignment's "
                             f"({len(index)}, {valid.shape[1] + 1}, 3, {valid.shape[2]}, {valid.shape[3]})")
        residual = xw - x0
        warped = _warp(residual[:, :-1].flatten(0, 1), grid).view_as(residual[:, 1:])
        change = (residual[:, 1:] - warped).abs().mean(2)  # (n, T-1, H, W)
        mask = valid.to(change.device)
        return change[mask].mean() * 100 if mask.any() else change.sum() * 0
