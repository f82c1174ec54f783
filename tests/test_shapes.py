"""Tests of the shapes world: determinism, exact ground truth, captions, styles, clips, export."""

import json
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from vistune.data import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT_PAIRS,
    SHAPES,
    STYLES,
    ShapesDataset,
    ShapeSpec,
    collate_fn,
    export_imagefolder,
    held_out_prompts,
    make_caption,
    parse_caption,
    recolor_pastel,
    render_scene,
    sample_clip,
    sample_scene,
    shape_mask,
    style_statistic,
)
from vistune.data.shapes import MAX_OCCLUSION

FIELDS = ("image", "mask", "instance_mask", "boxes", "labels", "edges")


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS) and (
        a.caption == b.caption and a.specs == b.specs
    )


@pytest.mark.parametrize("style", STYLES)
def test_same_seed_same_scene_and_different_seeds_differ(style):
    assert _same(sample_scene(7, style=style), sample_scene(7, style=style))
    assert _same(sample_scene(np.random.default_rng(7), style=style), sample_scene(7, style=style))
    images = {sample_scene(s, style=style).image.tobytes() for s in range(20)}
    assert len(images) == 20


def test_dataset_items_do_not_depend_on_access_order():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3)
    forward = [a[i] for i in range(10)]
    backward = [b[i] for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["caption"] == y["caption"]
    assert not torch.equal(ShapesDataset(5, seed=4)[0]["pixel_values"], a[0]["pixel_values"])
    with pytest.raises(IndexError):
        a[50]


def _inner_boundary(instance: np.ndarray) -> np.ndarray:
    """Independent edge reference: each instance minus its 4-connected erosion."""
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    out = np.zeros(instance.shape, bool)
    for i in np.unique(instance[instance > 0]):
        m = (instance == i).astype(np.uint8)
        inner = cv2.erode(m, cross, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        out |= (m > 0) & (inner == 0)
    return out


@pytest.mark.parametrize("size", [64, 32, 48])
def test_ground_truth_matches_the_plain_image(size):
    for seed in range(60):
        s = sample_scene(seed, size=size)
        n = len(s.specs)
        assert 1 <= n <= 3 and len(set(zip(s.colors, (sp.shape for sp in s.specs)))) == n
        assert np.array_equal(s.mask, np.concatenate([[0], s.labels])[s.instance_mask])
        assert np.all(s.image[s.instance_mask == 0] == BACKGROUNDS[s.background])
        for i, spec in enumerate(s.specs):
            vis = s.instance_mask == i + 1
            assert np.all(s.image[vis] == COLORS[spec.color])
            assert vis.sum() >= (1 - MAX_OCCLUSION) * shape_mask(spec, size).sum() - 1e-9
            ys, xs = np.nonzero(vis)
            assert s.boxes[i].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert s.labels[i] == SHAPES.index(spec.shape) + 1
        assert s.edges.dtype == np.uint8 and set(np.unique(s.edges)) <= {0, 1}
        assert np.array_equal(s.edges.astype(bool), _inner_boundary(s.instance_mask))


@pytest.mark.parametrize("style", STYLES[1:])
def test_styles_keep_exact_masks_and_change_only_the_shapes(style):
    for seed in range(10):
        plain, styled = sample_scene(seed), sample_scene(seed, style=style)
        for f in ("mask", "instance_mask", "boxes", "edges"):
            assert np.array_equal(getattr(plain, f), getattr(styled, f))
        bg = styled.instance_mask == 0
        assert np.array_equal(plain.image[bg], styled.image[bg])
        assert not np.array_equal(plain.image, styled.image)


def test_caption_lists_the_scene_and_round_trips():
    for seed in range(200):
        s = sample_scene(seed)
        pairs, bg = parse_caption(s.caption)
        assert Counter(pairs) == Counter((c, sp.shape) for c, sp in zip(s.colors, s.specs))
        assert pairs == s.pairs and bg == s.background
        assert make_caption(pairs, bg) == s.caption


def test_caption_format():
    def spec(shape, color, x):
        return ShapeSpec(shape, color, (x, 32.0), 8.0)

    one = render_scene([spec("circle", "red", 20)], "white")
    assert one.caption == "a red circle on a white background"
    two = render_scene([spec("square", "blue", 45), spec("circle", "orange", 15)], "gray")
    assert two.caption == "an orange circle and a blue square on a gray background"
    three = render_scene(
        [spec("star", "green", 52), spec("circle", "red", 10), spec("square", "blue", 31)],
        "black", style="striped", caption_style=True,
    )
    assert three.caption == (
        "a red circle, a blue square and a green star on a black background, striped style"
    )
    assert parse_caption(three.caption) == (
        [("red", "circle"), ("blue", "square"), ("green", "star")], "black"
    )


def test_exclude_really_excludes_and_held_out_prompts_use_only_held_out_pairs():
    assert {s for s, _ in HELD_OUT_PAIRS} == set(SHAPES)
    seen = set()
    for seed in range(1500):
        s = sample_scene(seed, exclude=HELD_OUT_PAIRS)
        seen |= {(sp.shape, sp.color) for sp in s.specs}
    assert not seen & HELD_OUT_PAIRS
    assert len(seen) == len(SHAPES) * len(COLORS) - len(HELD_OUT_PAIRS)
    assert ShapesDataset(1).exclude == HELD_OUT_PAIRS
    everything = {(sp.shape, sp.color) for i in range(600) for sp in sample_scene(i).specs}
    assert HELD_OUT_PAIRS <= everything
    prompts = held_out_prompts(with_companion=True)
    assert len(prompts) == len(HELD_OUT_PAIRS) * len(BACKGROUNDS)
    for p in prompts:
        pairs, _ = parse_caption(p)
        assert (pairs[0][1], pairs[0][0]) in HELD_OUT_PAIRS
        assert (pairs[1][1], pairs[1][0]) not in HELD_OUT_PAIRS


@pytest.mark.parametrize("style", STYLES[1:])
def test_style_statistic_separates_each_style_from_plain(style):
    plain = [sample_scene(np.random.default_rng([2024, i])).image for i in range(40)]
    styled = [sample_scene(np.random.default_rng([2024, i]), style=style).image for i in range(40)]
    p = np.array([style_statistic(x, style) for x in plain])
    q = np.array([style_statistic(x, style) for x in styled])
    assert q.min() > p.max()
    assert q.mean() - p.mean() > 2 * (p.std() + q.std())
    # Graceful degradation: still separated on average after blur + noise.
    from vistune.metrics import degrade

    def soft(images):
        return np.array([style_statistic(degrade(x, 0.7, 8 / 255, seed=i), style)
                         for i, x in enumerate(images)])

    pd, qd = soft(plain), soft(styled)
    assert qd.mean() - pd.mean() > 1.5 * (pd.std() + qd.std())
    with pytest.raises(ValueError):
        style_statistic(plain[0], "plain")


@pytest.mark.parametrize("size", [32, 64])
def test_recolor_pastel_turns_a_plain_scene_into_the_pastel_one(size):
    for i in range(12):  # every background occurs
        plain = sample_scene(np.random.default_rng([7, i]), size=size)
        pastel = sample_scene(np.random.default_rng([7, i]), size=size, style="pastel")
        recolored = recolor_pastel(plain.image)
        assert recolored.dtype == np.uint8 and recolored.shape == plain.image.shape
        assert np.abs(recolored.astype(int) - pastel.image.astype(int)).max() <= 1
        assert style_statistic(recolored, "pastel") == pytest.approx(style_statistic(pastel.image, "pastel"), abs=0.01)
    assert np.array_equal(recolor_pastel(pastel.image / 255.0), recolor_pastel(pastel.image))  # float input too


def test_clip_frames_move_by_the_recorded_displacement():
    errors = []
    for seed in range(8):
        clip = sample_clip(seed, num_frames=6, rotate=False)
        n = len(clip.labels)
        assert clip.frames.shape == (6, 64, 64, 3) and clip.displacements.shape == (5, n, 2)
        for t in range(5):
            for i in range(n):
                a, b = clip.instance_masks[t] == i + 1, clip.instance_masks[t + 1] == i + 1
                if (a.sum() != shape_mask(clip.specs[t][i], 64).sum()
                        or b.sum() != shape_mask(clip.specs[t + 1][i], 64).sum()):
                    continue  # occluded in one of the two frames
                moved = np.argwhere(b).mean(0)[::-1] - np.argwhere(a).mean(0)[::-1]
                errors.append(moved - clip.displacements[t, i])
        for t, specs in enumerate(clip.specs):
            expected = render_scene(specs, clip.background).image
            np.testing.assert_array_equal(clip.frames[t], expected)
            assert all(sp.size <= sp.center[0] <= 63 - sp.size for sp in specs)
    errors = np.abs(np.array(errors))
    assert len(errors) > 50
    # Mask centroids follow the true centres up to rasterisation (~0.1 px).
    assert errors.mean() < 0.12 and errors.max() < 0.6


def test_clip_moves_and_is_deterministic():
    a, b = sample_clip(5, resize=True), sample_clip(5, resize=True)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.displacements, b.displacements)
    assert np.abs(a.displacements).max() > 0.5
    assert not np.array_equal(a.frames[0], a.frames[-1])


def test_dataset_items_and_collate():
    ds = ShapesDataset(6, seed=1, size=32, style="striped")
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert 0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert item["mask"].dtype == torch.int64 and item["edges"].shape == (1, 32, 32)
    assert item["boxes"].dtype == torch.float32 and item["labels"].dtype == torch.int64
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 32, 32)
    assert isinstance(batch["caption"], list) and isinstance(batch["boxes"], list)
    assert batch["caption"][1] == ds[1]["caption"]


def test_export_imagefolder(tmp_path):
    img_dir = export_imagefolder(tmp_path / "out", 5, seed=2, size=32, save_masks=True,
                                 save_edges=True)
    ds = ShapesDataset(5, seed=2, size=32)
    rows = [json.loads(line) for line in (img_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for i, row in enumerate(rows):
        scene = ds.scene(i)
        assert row["text"] == scene.caption
        assert np.array_equal(np.array(Image.open(img_dir / row["file_name"]).convert("RGB")),
                              scene.image)
        assert np.array_equal(np.array(Image.open(img_dir / row["mask_file_name"])), scene.mask)
        assert np.array_equal(np.array(Image.open(img_dir / row["edge_file_name"])) > 0,
                              scene.edges > 0)
