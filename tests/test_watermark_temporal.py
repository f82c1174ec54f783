"""Temporal Alignment: the flow finds a known motion, an aligned residual costs nothing, flicker does."""

import numpy as np
import pytest
import torch

from vistune.tuners.watermark.temporal import TemporalAlignment
from vistune.tuners.watermark.video import shapes_clips, temporal_loss


def _moving_square_clip(frames: int = 4, size: int = 32, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright textured square moving ``step`` px right per frame over a static smooth background, and a mask
    of the square's pixels per frame."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    background = np.stack([0.3 + 0.2 * xx, 0.3 + 0.2 * yy, 0.4 + 0 * xx])
    texture = 0.6 + 0.3 * rng.random((3, 10, 10))
    clip, masks = [], []
    for t in range(frames):
        frame, mask = background.copy(), np.zeros((size, size), bool)
        x = 8 + step * t
        frame[:, 11:21, x:x + 10] = texture
        mask[11:21, x:x + 10] = True
        clip.append(frame)
        masks.append(mask)
    return torch.tensor(np.stack(clip), dtype=torch.float32)[None], torch.tensor(np.stack(masks))[None]


def test_flow_follows_a_known_motion_and_keeps_static_pixels_in_place():
    clip, masks = _moving_square_clip()
    alignment = TemporalAlignment.from_frames(clip)
    assert alignment.grid.shape == (1, 3, 32, 32, 2) and len(alignment) == 1
    pixel = alignment.grid[0, 0, 15, 14] * 31 / 2 + 15.5  # a textured pixel inside the square in frame 1
    assert abs(float(pixel[0]) - 13) < 0.5 and abs(float(pixel[1]) - 15) < 0.5  # came from one pixel left
    far = alignment.grid[0, :, 2:6, 2:6] * 31 / 2 + 15.5  # background far from the square: zero motion, exactly
    ys, xs = torch.meshgrid(torch.arange(2, 6.0), torch.arange(2, 6.0), indexing="ij")
    assert torch.equal(far[..., 0], xs.expand_as(far[..., 0])) and torch.equal(far[..., 1], ys.expand_as(far[..., 1]))
    assert alignment.valid[0, :, 2:6, 2:6].all() and alignment.valid.float().mean() > 0.9


def test_aligned_loss_ignores_a_residual_that_moves_with_content_and_penalizes_flicker():
    clip, masks = _moving_square_clip()
    alignment = TemporalAlignment.from_frames(clip)
    g = torch.Generator().manual_seed(0)
    pattern = 0.02 * torch.randn(3, 10, 10, generator=g)
    moving = torch.zeros_like(clip)  # a residual glued to the square: no flicker at all
    for t in range(clip.shape[1]):
        moving[0, t, :, 11:21, 8 + t:18 + t] = pattern
    square = masks[:, 1:]
    inner = alignment.valid & square
    for shift, dim in ((1, -1), (-1, -1), (1, -2), (-1, -2)):
        inner &= torch.roll(square, shift, dim)
    sub = TemporalAlignment(alignment.grid, inner)  # the square's interior, away from its edges
    assert sub.loss(clip + moving, clip, [0]) < 0.05 * float(100 * moving.abs().mean(2)[:, 1:][inner].mean())
    assert temporal_loss(clip + moving, clip) > 0  # VidSig's unaligned term charges the same residual
    flicker = 0.02 * torch.randn(clip.shape, generator=g)  # a residual that changes in place every frame
    static = ~(masks[:, 1:] | masks[:, :-1])
    expected = (flicker[:, 1:] - flicker[:, :-1]).abs().mean(2)[static].mean() * 100
    only_static = TemporalAlignment(alignment.grid, alignment.valid & static)
    torch.testing.assert_close(only_static.loss(clip + flicker, clip, torch.tensor([0])), expected)
    assert alignment.loss(clip, clip, [0]) == 0


def test_identity_alignment_is_the_in_place_residual_change():
    clip, _ = _moving_square_clip()
    residual = 0.02 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(1))
    identity = TemporalAlignment.identity(1, clip.shape[1], 32, 32)
    assert identity.valid.all()
    expected = (residual[:, 1:] - residual[:, :-1]).abs().mean(2).mean() * 100
    torch.testing.assert_close(identity.loss(clip + residual, clip, [0]), expected)


def test_alignment_errors_and_shapes_world_coverage():
    with pytest.raises(ValueError, match=r"\(N, T >= 2"):
        TemporalAlignment.from_frames(torch.rand(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="grid"):
        TemporalAlignment(torch.zeros(1, 2, 8, 8, 2), torch.ones(1, 3, 8, 8, dtype=torch.bool))
    frames, static = shapes_clips(3, num_frames=4, seed=0, size=32)
    alignment = TemporalAlignment.from_frames(frames)
    assert alignment.valid[static].float().mean() > 0.95  # the ground-truth background is trusted
    with pytest.raises(ValueError, match="do not match"):
        alignment.loss(frames[:1, :3], frames[:1, :3], [0])
