"""Tests of the analytic checker and the generic metrics."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.data import SHAPES, ShapeSpec, render_scene, sample_scene, shape_mask
from vistune.metrics import (
    binomial_p_value,
    caption_fidelity,
    caption_misses,
    checker_accuracy,
    classify_contour,
    degrade,
    detect_background,
    detect_shapes,
    edge_f1,
    edge_precision_recall,
    mean_iou,
    pair_recall,
    psnr,
    style_statistic,
)


def test_classify_contour_on_ideal_shapes_at_all_rotations():
    import cv2

    for shape in SHAPES:
        for rot in range(0, 360, 13):
            m = shape_mask(ShapeSpec(shape, "red", (63.5, 63.5), 40.0, rot), 128)
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_NONE)
            assert classify_contour(contours[0])[0] == shape, (shape, rot)


def test_checker_accuracy_on_ground_truth_images():
    r64 = checker_accuracy(200, seed=7, size=64)
    assert r64["pair_recall"] >= 0.95 and r64["image_all_found"] >= 0.95
    assert r64["spurious_per_image"] <= 0.05 and r64["background"] == 1.0
    r32 = checker_accuracy(100, seed=7, size=32)
    assert r32["pair_recall"] >= 0.93
    blurred = checker_accuracy(100, seed=7, size=64, blur_sigma=0.7, noise_std=8 / 255)
    assert blurred["pair_recall"] >= 0.95


def test_caption_fidelity_own_vs_mismatched_captions():
    scenes = [sample_scene(np.random.default_rng([11, i])) for i in range(80)]
    images = [s.image for s in scenes]
    captions = [s.caption for s in scenes]
    assert caption_fidelity(images, captions) >= 0.95
    assert caption_fidelity(images, captions, check_background=True) >= 0.95
    assert pair_recall(images, captions) >= 0.95
    shifted = captions[1:] + captions[:1]
    assert caption_fidelity(images, shifted) <= 0.15
    assert pair_recall(images, shifted) <= 0.3


def test_caption_misses_names_what_was_seen_instead():
    image = render_scene([ShapeSpec("square", "red", (32, 32), 18)], "white").image
    blank = np.full((64, 64, 3), 255, np.uint8)
    cases = {
        "a red square on a white background": "found",
        "a red circle on a white background": "wrong_shape",
        "a blue square on a white background": "wrong_colour",
        "a blue star on a white background": "missing",
    }
    for prompt, kind in cases.items():
        counts = caption_misses([image], [prompt])
        assert counts == {**dict.fromkeys(("found", "wrong_shape", "wrong_colour", "missing"), 0), kind: 1}, prompt
    two = caption_misses([image, blank], ["a red square and a blue star on a white background"] * 2)
    assert two == {"found": 1, "wrong_shape": 0, "wrong_colour": 0, "missing": 3}
    with pytest.raises(ValueError, match="same length"):
        caption_misses([image], [])


def test_checker_accepts_pil_tensor_and_float_inputs():
    s = sample_scene(3)
    ref = detect_shapes(s.image)
    assert [(d.color, d.shape) for d in ref] == s.pairs
    as_tensor = torch.from_numpy(s.image).permute(2, 0, 1).float() / 255
    for other in (Image.fromarray(s.image), as_tensor, s.image.astype(np.float32) / 255):
        assert detect_shapes(other) == ref
    assert detect_background(s.image) == s.background
    big = np.array(Image.fromarray(s.image).resize((256, 256), Image.NEAREST))
    assert [(d.color, d.shape) for d in detect_shapes(big)] == s.pairs
    wide = np.empty((64, 100, 3), np.uint8)
    wide[:] = s.image[0, 0]
    wide[:, 18:82] = s.image
    assert [(d.color, d.shape) for d in detect_shapes(wide)] == s.pairs
    x0, y0, x1, y1 = ref[0].box
    gt = s.boxes[[sp.color for sp in s.specs].index(ref[0].color)]
    assert np.allclose([x0, y0, x1, y1], gt, atol=1.5)


def test_checker_sees_nothing_on_blank_images():
    assert detect_shapes(np.full((64, 64, 3), 250, np.uint8)) == []
    noisy = degrade(np.full((64, 64, 3), 125, np.uint8), blur_sigma=0.7, noise_std=8 / 255)
    assert detect_shapes(noisy) == []
    assert detect_background(noisy) == "gray"


def test_style_statistic_is_reexported():
    assert style_statistic(sample_scene(1, style="pastel").image, "pastel") > 0.4


def test_edge_f1_hand_computed():
    target = np.zeros((10, 10), np.uint8)
    target[5] = 1
    shifted = np.roll(target, 1, axis=0)
    assert edge_f1(target, target, tolerance=0) == 1.0
    assert edge_f1(shifted, target, tolerance=1) == 1.0
    assert edge_f1(shifted, target, tolerance=0) == 0.0
    half = np.zeros_like(target)
    half[5, :5] = 1
    half[8, 5:] = 1  # 3 px away: outside the tolerance
    # precision 5/10; recall 6/10 (target column 5 is 1 px from predicted (5, 4))
    assert edge_precision_recall(half, target, tolerance=1) == (0.5, 0.6)
    assert edge_f1(half, target) == pytest.approx(2 * 0.5 * 0.6 / 1.1)
    assert edge_f1(np.zeros_like(target), target) == 0.0
    assert edge_f1(np.zeros_like(target), np.zeros_like(target)) == 1.0


def test_mean_iou_hand_computed():
    t = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 1, 1])
    assert mean_iou(t, t, 2) == 1.0
    assert mean_iou(p, t, 2) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mean_iou(p, np.array([0, 255, 1, 1]), 2, ignore_index=255) == 1.0
    assert mean_iou(torch.tensor(p), torch.tensor(t), 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    s = sample_scene(0)
    assert mean_iou(s.mask, s.mask, len(SHAPES) + 1) == 1.0


def test_psnr_hand_computed():
    a = np.zeros((8, 8, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))
    x = np.zeros((4, 4), np.float32)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)


def test_binomial_p_value_hand_computed():
    assert binomial_p_value(41, 48) == pytest.approx(3.1202e-7, rel=1e-4)
    assert binomial_p_value(0, 48) == 1.0
    assert binomial_p_value(48, 48) == 2.0**-48
    assert binomial_p_value(2, 3) == pytest.approx(0.5)  # (3 + 1) / 8
    with pytest.raises(ValueError):
        binomial_p_value(5, 4)


# --------------------------------------------------------------------------- control fidelity (eval_csc)


def test_shape_class_mask_recovers_the_ground_truth_mask_of_real_scenes():
    from vistune.data import ShapesDataset
    from vistune.metrics import shape_class_mask, shape_miou

    data = ShapesDataset(16, seed=10_000, size=64, num_shapes=(1, 2))
    scores = []
    for i in range(16):
        s = data.scene(i)
        predicted = shape_class_mask(s.image)
        assert predicted.shape == s.mask.shape and predicted.dtype == np.int64
        assert set(np.unique(predicted)) <= set(range(len(SHAPES) + 1))
        scores.append(shape_miou(s.image, s.mask))
    assert np.mean(scores) > 0.93 and min(scores) > 0.85, scores
    # a shuffled pairing or a blank image scores far lower; a blank image predicts background only
    shuffled = [shape_miou(data.scene(i).image, data.scene((i + 1) % 16).mask) for i in range(16)]
    assert np.mean(shuffled) < 0.5
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert (shape_class_mask(blank) == 0).all()
    assert shape_miou(blank, data.scene(0).mask) < 0.5
    with pytest.raises(ValueError):
        shape_miou(data.scene(0).image, data.scene(0).mask[:32])


def test_shape_class_mask_names_the_shape_of_a_single_large_shape():
    from vistune.data.shapes import ShapeSpec, render_scene
    from vistune.metrics import shape_class_mask

    for k, shape in enumerate(SHAPES, start=1):
        s = render_scene([ShapeSpec(shape, "red", (32.0, 32.0), 22.0, 10.0)], "white", 64)
        predicted = shape_class_mask(s.image)
        inside = s.mask == k
        assert (predicted[inside] == k).mean() > 0.95, shape
        assert (predicted[~inside] == 0).mean() > 0.97, shape


def test_color_layout_error_reference_values():
    from vistune.conditions import color
    from vistune.metrics import color_layout_error

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    layout = color(image, cell=16)[0]
    assert color_layout_error(image, layout, cell=16) == 0.0
    assert color_layout_error(image, layout.permute(1, 2, 0).numpy(), cell=16) == 0.0  # H x W x 3 floats too
    flat = np.full((64, 64, 3), 100, np.uint8)
    assert color_layout_error(flat, np.full((64, 64, 3), 110, np.uint8)) == pytest.approx(10.0)
    assert color_layout_error(flat, np.full((64, 64, 3), 110, np.uint8)) < color_layout_error(
        flat, np.full((64, 64, 3), 200, np.uint8))
    with pytest.raises(ValueError):
        color_layout_error(flat, np.zeros((32, 32, 3), np.uint8))
