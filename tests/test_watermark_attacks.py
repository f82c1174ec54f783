"""The watermark attack suite: shapes, exact reference behaviour, real JPEG, straight-through gradients, video."""

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from vistune.tuners.watermark.attacks import (
    IMAGE_ATTACKS, TRAIN_AUGMENTATIONS, VIDEO_ATTACKS, RandomAttack, center_crop, frame_drop, frame_insert, frame_swap,
    get_attack, parse_attack_spec, jpeg, jpeg_straight_through, resize, temporal_crop, video_compress,
)


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


def psnr(a, b):
    return 10 * math.log10(1 / torch.mean((a - b) ** 2).item())


@pytest.mark.parametrize("name", sorted(IMAGE_ATTACKS))
def test_every_image_attack_keeps_images_valid(name):
    x = images()
    y = get_attack(name)(x)
    assert y.shape[:2] == (2, 3) and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    if name != "none":
        assert y.shape != x.shape or not torch.equal(y, x)


def test_crop_and_resize_use_area_fractions():
    x = images(size=32)
    assert center_crop(x, 0.5).shape[-2:] == (23, 23)  # round(32 * sqrt(0.5))
    assert center_crop(x, 0.1).shape[-2:] == (10, 10)
    assert resize(x, 0.3).shape[-2:] == (18, 18)
    torch.testing.assert_close(center_crop(x, 0.25), x[..., 8:24, 8:24])


def test_brightness_and_combination_match_torchvision():
    x = images()
    torch.testing.assert_close(IMAGE_ATTACKS["brightness_2.0"](x), (x * 2).clamp(0, 1))
    torch.testing.assert_close(IMAGE_ATTACKS["contrast_1.5"](x), TF.adjust_contrast(x, 1.5))
    comb = IMAGE_ATTACKS["comb"](x)
    assert comb.shape[-2:] == (23, 23)


def test_jpeg_is_real_and_quality_ordered():
    x = images(size=64)
    q95, q80, q50 = jpeg(x, 95), jpeg(x, 80), jpeg(x, 50)
    assert psnr(q95, x) > psnr(q80, x) > psnr(q50, x) > 20
    # quantised to 8 bits: JPEG output is always a multiple of 1/255
    torch.testing.assert_close(q80 * 255, (q80 * 255).round())


def test_straight_through_jpeg_has_identity_gradient():
    x = images().requires_grad_(True)
    y = jpeg_straight_through(x, 50)
    torch.testing.assert_close(y.detach(), jpeg(x.detach(), 50))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("choice", TRAIN_AUGMENTATIONS)
def test_training_augmentations_are_differentiable(choice):
    x = images().requires_grad_(True)
    y = RandomAttack().apply(choice, x, torch.Generator().manual_seed(1))
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_attack_spec_names_and_weights():
    assert parse_attack_spec("identity, brightness:4,jpeg:0.5") == (["identity", "brightness", "jpeg"], [1.0, 4.0, 0.5])
    assert parse_attack_spec("") == ([], [])
    for spec, message in [("identity,glitter", "unknown attack 'glitter'"), ("brightness:x", "not a number"),
                          ("brightness:0", "positive"), ("jpeg:-1", "positive"), ("jpeg:nan", "positive")]:
        with pytest.raises(ValueError, match=message):
            parse_attack_spec(spec)


def test_random_attack_draws_in_proportion_to_integer_or_float_weights():
    attack = RandomAttack(["identity", "brightness"], [1, 3])  # integers are weights too
    g = torch.Generator().manual_seed(0)
    draws = [attack.augmentations[int(torch.multinomial(attack.weights, 1, generator=g))] for _ in range(2000)]
    assert 0.70 < draws.count("brightness") / len(draws) < 0.80
    only = RandomAttack(["identity", "brightness"], [0.0, 2.5])  # a zero weight is never drawn
    assert {int(torch.multinomial(only.weights, 1, generator=g)) for _ in range(200)} == {1}
    for bad in ([1.0], [1.0, -1.0], [0, 0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="non-negative numbers"):
            RandomAttack(["identity", "brightness"], bad)


def test_random_attack_draws_are_seeded_and_names_checked():
    x = images()
    a = RandomAttack()(x, torch.Generator().manual_seed(5))
    b = RandomAttack()(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown augmentation"):
        RandomAttack(["jpeg", "cartoonify"])
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("cartoonify")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        jpeg(torch.rand(3, 8, 8), 50)


def test_video_attacks():
    v = images(n=8, size=16)
    assert torch.equal(frame_drop(v), v[::2])
    swapped = frame_swap(v)
    assert torch.equal(swapped[0], v[1]) and torch.equal(swapped[1], v[0]) and torch.equal(swapped[7], v[6])
    odd = frame_swap(v[:5])
    assert torch.equal(odd[4], v[4])
    inserted = frame_insert(v)
    assert inserted.shape[0] == 12 and torch.equal(inserted[0], v[0]) and torch.equal(inserted[3], v[2])
    assert temporal_crop(v).shape[0] == 4
    compressed = video_compress(v)
    assert compressed.shape == v.shape and psnr(compressed, v) > 15
    for name, attack in VIDEO_ATTACKS.items():
        out = attack(v)
        assert out.ndim == 4 and out.shape[1] == 3, name
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_drop(v[:1])


def test_crop_in_place_keeps_the_region_where_it_was():
    from vistune.tuners.watermark.attacks import CANVAS_FILL, crop_in_place, place_on_canvas

    x = images()
    y = crop_in_place(x, 0.5, torch.Generator().manual_seed(3))
    kept = (y != CANVAS_FILL).all(1)  # (B, H, W): where the crop is (images() has no exact 0.5 pixels)
    rows, cols = kept[0].any(1).nonzero().flatten(), kept[0].any(0).nonzero().flatten()
    top, left, h, w = int(rows[0]), int(cols[0]), len(rows), len(cols)
    assert (h, w) == (23, 23) and bool(kept[0, top:top + h, left:left + w].all())
    torch.testing.assert_close(y[..., top:top + h, left:left + w], x[..., top:top + h, left:left + w])
    assert int(kept[0].sum()) == h * w
    torch.testing.assert_close(place_on_canvas(center_crop(x, 0.25), (32, 32), 8, 8)[..., 8:24, 8:24], x[..., 8:24, 8:24])
    with pytest.raises(ValueError, match="does not fit"):
        place_on_canvas(x, (16, 16), 0, 0)
