from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.conditions import (
    CONDITIONS,
    ConditionError,
    canny,
    color,
    control_size,
    fit,
    get_condition,
    grayscale,
    lineart,
    palette,
    segmentation,
    segmentation_from_mask,
    soft_edge,
    to_image_tensor,
    vae_scale_factor,
)


def square_scene(size=64, background=(30, 60, 200), shape=(230, 200, 20)) -> np.ndarray:
    """A flat background with a flat square in the middle (HWC uint8 RGB)."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    a, b = size // 4, 3 * size // 4
    image[a:b, a:b] = shape
    return image


def assert_condition_tensor(out, batch, height, width):
    assert out.shape == (batch, 3, height, width) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_every_condition_reads_every_input_kind_and_returns_bchw_in_unit_range(name):
    extract = get_condition(name)
    rgb = square_scene(48)
    inputs = [
        Image.fromarray(rgb),
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(rgb).convert("RGBA"),
        rgb,
        rgb.astype(np.float32) / 255,
        rgb[:, :, 0],
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,  # CHW
        torch.from_numpy(rgb).permute(2, 0, 1)[None].repeat(2, 1, 1, 1),  # BCHW uint8
    ]
    for image in inputs:
        out = extract(image, (32, 40))
        assert_condition_tensor(out, 2 if isinstance(image, torch.Tensor) and image.ndim == 4 else 1, 32, 40)
    assert_condition_tensor(extract([rgb, rgb]), 2, 48, 48)  # a list is a batch; size None keeps the input size


def test_rgba_and_grey_inputs_are_converted_like_their_rgb_version():
    rgb = square_scene(32)
    rgba = Image.fromarray(rgb).convert("RGBA")
    assert torch.equal(canny(rgba), canny(rgb))
    grey = Image.fromarray(rgb).convert("L")
    assert torch.equal(canny(grey), canny(np.asarray(grey)[:, :, None].repeat(3, axis=2)))


def test_resize_covers_the_target_then_center_crops():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :20] = 255  # the outer quarters are cropped away for a square target
    image[:, 60:] = 255
    image[:, 38:42] = 128  # a marker in the middle survives
    out = fit(image, (20, 20))
    assert out.shape == (20, 20, 3)
    assert out[:, 0].max() < 128 and out[:, -1].max() < 128
    assert out[:, 9:11].max() >= 100
    assert fit(image, (80, 160)).shape == (80, 160, 3)  # enlarging keeps the aspect ratio exactly
    assert to_image_tensor(image, 16).shape == (1, 3, 16, 16)
    with pytest.raises(ConditionError, match="height, width"):
        fit(image, (0, 4))


def test_canny_marks_the_border_of_a_square_and_nothing_else():
    edges = canny(square_scene(64))[0, 0]
    assert edges.max() == 1 and set(edges.unique().tolist()) <= {0.0, 1.0}
    rows, cols = torch.nonzero(edges, as_tuple=True)
    assert rows.min() >= 14 and rows.max() <= 49 and cols.min() >= 14 and cols.max() <= 49
    assert edges[30:34, 30:34].sum() == 0 and edges[:10].sum() == 0
    assert torch.equal(edges, canny(square_scene(64))[0, 1])  # three equal channels


def test_canny_sees_edges_between_equally_bright_colours():
    image = square_scene(64, background=(0, 128, 0), shape=(128, 0, 128))
    assert canny(image).sum() > 0


def test_soft_edge_is_graded_and_peaks_at_the_border():
    soft = soft_edge(square_scene(64))[0, 0]
    assert soft.max() == 1 and soft[30:34, 30:34].max() < 0.05
    assert ((soft > 0.05) & (soft < 0.95)).sum() > 50  # graded, unlike canny
    assert soft[16, 32] > 0.5  # the square's top border


def test_color_is_a_coarse_block_layout():
    image = np.zeros((128, 128, 3), np.uint8)
    image[:, 64:] = (255, 0, 0)
    out = color(image, cell=64)[0]
    assert torch.equal(out[:, :, :64], torch.zeros(3, 128, 64))
    assert torch.equal(out[0, :, 64:], torch.ones(128, 64)) and out[1:, :, 64:].max() == 0
    blocks = color(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8), cell=32)[0]
    assert len(torch.unique(blocks.reshape(3, -1), dim=1).T) <= 16  # 4 x 4 cells, each one colour
    # the default keeps SCEdit's 8 x 8 grid at any size: 4 px cells at 32 px, each the mean of its block
    small = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    default = color(small)[0]
    assert len(torch.unique(default.reshape(3, -1), dim=1).T) == 64
    block = torch.from_numpy(small[4:8, 8:12].reshape(-1, 3).mean(0) / 255).float()
    torch.testing.assert_close(default[:, 5, 9], block, atol=1 / 255 + 1e-6, rtol=0)


def test_segmentation_from_an_integer_mask_uses_one_colour_per_class():
    mask = np.zeros((32, 32), np.int64)
    mask[:, 16:] = 2
    mask[:8, :8] = 7
    out = segmentation(mask)[0]  # an int64 mask is read as classes
    colors = torch.from_numpy(palette(256)).float() / 255
    assert torch.equal(out[:, 20, 20], colors[2]) and torch.equal(out[:, 0, 0], colors[7])
    assert torch.equal(out[:, 20, 0], colors[0])
    assert len({tuple(c) for c in palette(256).tolist()}) == 256
    resized = segmentation_from_mask(torch.from_numpy(mask)[None], (64, 64))[0]  # nearest: no blended colours
    assert len(torch.unique(resized.reshape(3, -1), dim=1).T) == 3
    with pytest.raises(ConditionError, match="0..255"):
        segmentation_from_mask(np.full((4, 4), 300))


def test_segmentation_of_an_image_clusters_its_colours_deterministically():
    image = square_scene(64)
    image[:8, :8] = (250, 250, 250)
    out = segmentation(image, segments=8)
    colours = torch.unique(out[0].reshape(3, -1), dim=1).T
    assert len(colours) == 3  # three flat colours, three classes, even when asking for more
    assert torch.equal(out[0, :, 40, 2], torch.zeros(3))  # the largest region (background) is class 0: black
    assert torch.equal(out, segmentation(image, segments=8))


def test_grayscale_and_lineart():
    image = square_scene(64)
    grey = grayscale(image)[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert abs(grey[0, 0, 0].item() - (0.299 * 30 + 0.587 * 60 + 0.114 * 200) / 255) < 2 / 255
    drawing = np.full((64, 64, 3), 255, np.uint8)
    drawing[30:33, 8:56] = 0  # a dark stroke
    lines = lineart(drawing)[0, 0]
    assert lines[31, 20:40].min() == 1 and lines[:20].max() == 0 and lines[45:].max() == 0


def test_unknown_conditions_and_unreadable_inputs_are_refused():
    with pytest.raises(ConditionError, match=r"unknown condition 'depth'.*'canny'.*'soft_edge'"):
        get_condition("depth")
    with pytest.raises(ConditionError, match=r"in \[0, 1\]"):
        canny(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(ConditionError, match="cannot read"):
        canny("image.png")
    with pytest.raises(ConditionError, match="1-4 channels"):
        canny(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ConditionError, match="dtype int64"):
        canny(np.zeros((8, 8, 3), np.int64))


def test_control_size_reads_the_vae_factor():
    """Reads ``vae.config.block_out_channels`` as diffusers' AutoencoderKL has it (a stand-in keeps this file free
    of the diffusers import)."""
    tiny = SimpleNamespace(config=SimpleNamespace(block_out_channels=(8, 16)))
    assert vae_scale_factor(tiny) == 2 and control_size(tiny, (16, 24)) == (32, 48)
    sd_vae = SimpleNamespace(config={"block_out_channels": [128, 256, 512, 512]})  # diffusers' FrozenDict is a dict
    assert vae_scale_factor(sd_vae) == 8 and control_size(sd_vae, 64) == (512, 512)
    with pytest.raises(ConditionError, match="block_out_channels"):
        vae_scale_factor(object())
