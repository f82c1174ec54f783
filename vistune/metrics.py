"""Analytic shapes-world checker and small honest metrics (no learned model anywhere).

The checker finds shapes with plain image processing: background from the border,
foreground by Lab distance, colour names by nearest prototype, shape class from the
contour geometry of each connected single-colour component.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import torch

from vistune.data.shapes import (
    COLOR_NAMES,
    STYLES,
    parse_caption,
    sample_scene,
    segment_colors,
    style_statistic,
    style_statistics,
    to_rgb_uint8,
)

__all__ = [
    "DetectedShape", "detect_shapes", "detect_background", "classify_contour", "radial_harmonics",
    "caption_fidelity", "pair_recall", "caption_misses", "checker_accuracy", "degrade", "style_separation",
    "edge_f1", "edge_precision_recall", "mean_iou", "psnr", "binomial_p_value",
    "style_statistic", "style_statistics", "to_rgb_uint8",
    "shape_class_mask", "shape_miou", "color_layout_error",
]

WORK_SIZE = 128  # the checker analyses every image at this resolution
UPSAMPLE_SMOOTH = 0.3  # Gaussian sigma (input px) applied after upsampling small images
MIN_AREA_FRACTION = 0.008  # components smaller than this share of the image are dropped

# Radial-profile harmonics: the k-fold symmetric shapes and their ideal amplitudes
# (|k-th Fourier coefficient| of the centroid-to-contour distance over the mean distance).
HARMONICS = {"triangle": (3, 0.275), "square": (4, 0.139), "star": (5, 0.278)}
CIRCLE_LEVEL = 0.4  # a circle is declared when no harmonic reaches this share of its ideal
STAR_DEFECT_DEPTH = 0.12  # concavity depth (share of enclosing radius) that counts for a star


@dataclass(frozen=True)
class DetectedShape:
    """A shape found by the checker; box xyxy and area are in input-image pixels."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    area: float
    score: float


def _densify(poly: np.ndarray, samples: int) -> np.ndarray:
    """Points spaced evenly along a closed polygon (so straight hull edges count too)."""
    closed = np.vstack([poly, poly[:1]])
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(closed, axis=0).T))])
    t = np.linspace(0, arc[-1], samples, endpoint=False)
    return np.stack([np.interp(t, arc, closed[:, 0]), np.interp(t, arc, closed[:, 1])], 1)


def radial_harmonics(contour: np.ndarray, samples: int = 256) -> np.ndarray:
    """Relative Fourier amplitudes (index k = k-fold) of the centroid-to-contour distance."""
    m = cv2.moments(contour)
    if m["m00"] <= 0:
        return np.zeros(samples // 2 + 1)
    p = _densify(contour.reshape(-1, 2).astype(np.float64), samples)
    dx, dy = p[:, 0] - m["m10"] / m["m00"], p[:, 1] - m["m01"] / m["m00"]
    theta, dist = np.arctan2(dy, dx), np.hypot(dx, dy)
    order = np.argsort(theta)
    grid = np.linspace(-np.pi, np.pi, samples, endpoint=False)
    profile = np.interp(grid, theta[order], dist[order], period=2 * np.pi)
    return 2 * np.abs(np.fft.rfft(profile)) / samples / max(profile.mean(), 1e-9)


def _deep_defects(contour: np.ndarray, radius: float) -> int:
    """Number of concavities deeper than STAR_DEFECT_DEPTH * radius."""
    try:
        hull = cv2.convexHull(contour, returnPoints=False)
        defects = cv2.convexityDefects(contour, hull)
    except cv2.error:  # rare self-touching contours
        return 0
    if defects is None:
        return 0
    return int((defects.reshape(-1, 4)[:, 3] / 256.0 > STAR_DEFECT_DEPTH * radius).sum())


def classify_contour(contour: np.ndarray) -> tuple[str, float]:
    """Shape class and a [0, 1] margin score from one closed contour.

    A regular k-gon's centroid-to-contour distance oscillates k times per turn, so the
    3rd, 4th and 5th radial harmonics (each relative to its ideal amplitude) single out
    triangle, square and star; a circle has none above CIRCLE_LEVEL. Rotation and scale
    invariant, and tolerant of blur-rounded corners. A star is also recognised by >= 3
    deep concavities. Triangle/square/circle are decided on the convex hull, so a bite
    taken by an occluding shape does not turn a circle into a square.
    """
    _, radius = cv2.minEnclosingCircle(contour)
    raw, hull = radial_harmonics(contour), radial_harmonics(cv2.convexHull(contour))
    star = raw[HARMONICS["star"][0]] / HARMONICS["star"][1]
    raw_best = max(CIRCLE_LEVEL, *(raw[k] / ideal for k, ideal in HARMONICS.values()))
    convex = {"circle": CIRCLE_LEVEL}
    convex.update({n: hull[k] / ideal for n, (k, ideal) in HARMONICS.items() if n != "star"})
    if _deep_defects(contour, radius) >= 3 or star >= raw_best:
        others = max(raw[k] / ideal for n, (k, ideal) in HARMONICS.items() if n != "star")
        evidence = max(star, 1.0) if star < raw_best else star  # defects count as ideal
        return "star", float(np.clip((evidence - max(others, CIRCLE_LEVEL)) / CIRCLE_LEVEL, 0, 1))
    ranked = sorted(convex.values(), reverse=True)
    return max(convex, key=convex.get), float(np.clip((ranked[0] - ranked[1]) / CIRCLE_LEVEL, 0, 1))


def _to_work(image: Any) -> tuple[np.ndarray, float]:
    """Resize so the longer side is WORK_SIZE; returns the image and input px per work px."""
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    scale = WORK_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
    work = cv2.resize(rgb, size, interpolation=interp)
    if UPSAMPLE_SMOOTH > 0 and scale > 1:
        # Soften the pixel staircase of upsampled small images (sigma in input pixels).
        work = cv2.GaussianBlur(work, (0, 0), UPSAMPLE_SMOOTH * scale)
    return work, 1.0 / scale


def _shape_contours(work: np.ndarray) -> Iterator[tuple[str, np.ndarray, tuple[int, int, int, int]]]:
    """The checker's shape candidates in a WORK_SIZE image: ``(colour, outer contour, (x, y, w, h) box)``; the
    contour is in the coordinates of the box padded by 1 px.

    Steps: segment_colors (border background, Lab foreground, nearest colour prototype + mode filter); per colour,
    morphological opening and connected components above MIN_AREA_FRACTION; each one's largest outer contour.
    """
    seg = segment_colors(work)
    min_area = MIN_AREA_FRACTION * work.shape[0] * work.shape[1]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    for k, color in enumerate(COLOR_NAMES):
        m = (seg.labels == k).astype(np.uint8)
        if m.sum() < min_area:
            continue
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel)
        n, cc, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        for j in range(1, n):
            x, y, w, h, pixels = stats[j]
            if pixels < min_area:
                continue
            comp = np.pad((cc[y:y + h, x:x + w] == j).astype(np.uint8), 1)
            contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            contour = max(contours, key=cv2.contourArea)
            if cv2.contourArea(contour) >= min_area / 2:
                yield color, contour, (int(x), int(y), int(w), int(h))


def detect_shapes(image: Any) -> list[DetectedShape]:
    """All shapes in an RGB image (any size >= 32), sorted left to right: resize to WORK_SIZE, then
    :func:`classify_contour` on each of :func:`_shape_contours`."""
    work, px = _to_work(image)
    found = []
    for color, contour, (x, y, w, h) in _shape_contours(work):
        shape, score = classify_contour(contour)
        filled = np.zeros((h + 2, w + 2), np.uint8)
        cv2.drawContours(filled, [contour], -1, 1, -1)
        box = (x * px, y * px, (x + w) * px, (y + h) * px)
        found.append(DetectedShape(shape, color, box, float(filled.sum()) * px * px, score))
    return sorted(found, key=lambda d: (d.box[0], d.box[1]))


def detect_background(image: Any) -> str:
    """Nearest named background colour to the median border colour."""
    return segment_colors(to_rgb_uint8(image)).background


def _found_pairs(image: Any) -> Counter:
    return Counter((d.color, d.shape) for d in detect_shapes(image))


def _prompted_and_found(images: Sequence[Any], prompts: Sequence[str]) -> Iterator[tuple[list, Any, Counter, Any]]:
    """Per image: the prompt's (colour, shape) pairs, its background, the checker's pairs found, the image."""
    if len(images) != len(prompts):
        raise ValueError("images and prompts must have the same length")
    for image, prompt in zip(images, prompts):
        wanted, bg = parse_caption(prompt)
        yield wanted, bg, _found_pairs(image), image


def _prompt_hits(images: Sequence[Any], prompts: Sequence[str], check_background: bool):
    for wanted, bg, found, image in _prompted_and_found(images, prompts):
        hits = [found[p] > 0 for p in wanted]
        bg_ok = not check_background or bg is None or detect_background(image) == bg
        yield hits, bg_ok


def caption_fidelity(
    images: Sequence[Any], prompts: Sequence[str], check_background: bool = False
) -> float:
    """Fraction of (image, prompt) pairs where EVERY prompted (colour, shape) is found."""
    res = [all(h) and ok for h, ok in _prompt_hits(images, prompts, check_background)]
    return float(np.mean(res)) if res else float("nan")


def pair_recall(images: Sequence[Any], prompts: Sequence[str]) -> float:
    """Fraction of all prompted (colour, shape) pairs found in their image."""
    hits = [x for h, _ in _prompt_hits(images, prompts, False) for x in h]
    return float(np.mean(hits)) if hits else float("nan")


def caption_misses(images: Sequence[Any], prompts: Sequence[str]) -> dict[str, int]:
    """Why prompted (colour, shape) pairs are missed: a count of every pair by what the checker saw instead.

    ``found``: the pair is there. ``wrong_shape``: the prompted colour is there, on another shape only.
    ``wrong_colour``: the prompted shape is there, in another colour only. ``missing``: neither. Tells a model that
    bends shapes from one that loses the palette at the same caption fidelity.
    """
    counts = dict.fromkeys(("found", "wrong_shape", "wrong_colour", "missing"), 0)
    for wanted, _, found, _ in _prompted_and_found(images, prompts):
        for color, shape in wanted:
            if found[(color, shape)]:
                kind = "found"
            elif any(c == color for c, _ in found):
                kind = "wrong_shape"
            elif any(s == shape for _, s in found):
                kind = "wrong_colour"
            else:
                kind = "missing"
            counts[kind] += 1
    return counts


def degrade(image: np.ndarray, blur_sigma: float = 0.0, noise_std: float = 0.0,
            seed: int = 0) -> np.ndarray:
    """Gaussian blur (sigma px) then additive Gaussian noise (std in [0, 1] units), uint8."""
    if blur_sigma <= 0 and noise_std <= 0:
        return to_rgb_uint8(image)
    x = to_rgb_uint8(image).astype(np.float32)
    if blur_sigma > 0:
        x = cv2.GaussianBlur(x, (0, 0), blur_sigma)
    if noise_std > 0:
        x = x + np.random.default_rng(seed).normal(0, noise_std * 255, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def checker_accuracy(
    num_images: int = 500,
    seed: int = 1234,
    size: int = 64,
    style: str = "plain",
    blur_sigma: float = 0.0,
    noise_std: float = 0.0,
    num_shapes: int | tuple[int, int] = (1, 3),
) -> dict[str, float]:
    """Checker vs ground truth on fresh shapes-world images (optionally degraded).

    pair_recall: share of ground-truth (shape, colour) pairs found; image_all_found: share
    of images with every pair found; image_exact: same and nothing spurious;
    spurious_per_image: detections matching no ground-truth pair; background: accuracy.
    """
    gt_total = hit_total = spurious = all_found = exact = bg_ok = 0
    for i in range(num_images):
        s = sample_scene(np.random.default_rng([seed, i]), size, num_shapes, style)
        img = degrade(s.image, blur_sigma, noise_std, seed=i)
        gt = Counter((c, sh) for c, sh in s.pairs)
        found = _found_pairs(img)
        hits = sum((gt & found).values())
        extra = sum((found - gt).values())
        gt_total += sum(gt.values())
        hit_total += hits
        spurious += extra
        all_found += hits == sum(gt.values())
        exact += hits == sum(gt.values()) and extra == 0
        bg_ok += detect_background(img) == s.background
    return {
        "pair_recall": hit_total / gt_total,
        "image_all_found": all_found / num_images,
        "image_exact": exact / num_images,
        "spurious_per_image": spurious / num_images,
        "background": bg_ok / num_images,
    }


def style_separation(
    num_images: int = 200, seed: int = 99, size: int = 64,
    blur_sigma: float = 0.0, noise_std: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Per style: mean/std of its statistic on plain vs styled ground-truth images of the
    same scenes; d = (mean_style - mean_plain) / sqrt((var_style + var_plain) / 2)
    (Cohen's d) and the worst cases plain_max / style_min (separable if plain_max < style_min)."""
    stats: dict[str, dict[str, list[float]]] = {s: {"plain": [], "style": []} for s in STYLES[1:]}
    for i in range(num_images):
        for variant in ("plain",) + STYLES[1:]:
            s = sample_scene(np.random.default_rng([seed, i]), size, style=variant)
            img = degrade(s.image, blur_sigma, noise_std, seed=i)
            values = style_statistics(img)
            for st in STYLES[1:]:
                if variant == "plain":
                    stats[st]["plain"].append(values[st])
                elif variant == st:
                    stats[st]["style"].append(values[st])
    out = {}
    for st, d in stats.items():
        p, q = np.array(d["plain"]), np.array(d["style"])
        out[st] = {
            "plain_mean": float(p.mean()), "plain_std": float(p.std()),
            "style_mean": float(q.mean()), "style_std": float(q.std()),
            "d": float((q.mean() - p.mean()) / (math.sqrt((q.var() + p.var()) / 2) + 1e-12)),
            "plain_max": float(p.max()), "style_min": float(q.min()),
        }
    return out


# --------------------------------------------------------------------------- generic metrics


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def edge_precision_recall(
    pred_edges: Any, target_edges: Any, tolerance: float = 1
) -> tuple[float, float]:
    """Precision (pred pixels within ``tolerance`` px, Euclidean, of a target edge) and
    recall (target pixels within tolerance of a pred edge). Empty vs empty counts as 1."""
    pred, target = _np(pred_edges) > 0, _np(target_edges) > 0

    def near(src: np.ndarray, dst: np.ndarray) -> float:
        if not src.any():
            return 1.0
        if not dst.any():
            return 0.0
        dist = cv2.distanceTransform((~dst).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return float((dist[src] <= tolerance + 1e-6).mean())

    return near(pred, target), near(target, pred)


def edge_f1(pred_edges: Any, target_edges: Any, tolerance: float = 1) -> float:
    """F1 of edge_precision_recall (2D maps; nonzero = edge)."""
    p, r = edge_precision_recall(pred_edges, target_edges, tolerance)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def mean_iou(pred: Any, target: Any, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean IoU over classes that occur in pred or target (any shape; pixels flattened)."""
    p, t = _np(pred).ravel().astype(np.int64), _np(target).ravel().astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    ok = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    conf = np.bincount(t[ok] * num_classes + p[ok], minlength=num_classes**2)
    conf = conf.reshape(num_classes, num_classes)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


def psnr(a: Any, b: Any, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; data_range defaults to 255 for uint8, else 1."""
    x, y = _np(a), _np(b)
    if data_range is None:
        data_range = 255.0 if x.dtype == np.uint8 else 1.0
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def binomial_p_value(matches: int, bits: int) -> float:
    """One-sided P[X >= matches] for X ~ Binomial(bits, 1/2), exact (e.g. watermark bits)."""
    if not 0 <= matches <= bits:
        raise ValueError("need 0 <= matches <= bits")
    return sum(math.comb(bits, k) for k in range(matches, bits + 1)) / 2**bits


# --------------------------------------------------------------------------- control fidelity


def shape_class_mask(image: Any) -> np.ndarray:
    """Semantic class mask (H x W int64, 0 = background, k = ``SHAPES[k - 1]``) of an RGB image, by the checker.

    The analytic counterpart of a scene's ground-truth ``mask`` (what the ``segmentation`` condition colour-codes):
    the checker's own shape candidates (:func:`_shape_contours`, classified by :func:`classify_contour`), each
    filled outer contour painted with its shape's class id (larger ones first, so a smaller shape on top keeps its
    pixels), then brought back to the input size by a per-pixel majority vote (area-weighted).
    """
    from vistune.data.shapes import SHAPES

    rgb = to_rgb_uint8(image)
    work, _ = _to_work(rgb)
    pieces = []
    for _, contour, (x, y, _, _) in _shape_contours(work):
        filled = np.zeros(work.shape[:2], np.uint8)
        cv2.drawContours(filled, [contour], -1, 1, -1, offset=(x - 1, y - 1))
        pieces.append((int(filled.sum()), filled.astype(bool), SHAPES.index(classify_contour(contour)[0]) + 1))
    labels = np.zeros(work.shape[:2], np.uint8)
    for _, filled, label in sorted(pieces, key=lambda p: -p[0]):
        labels[filled] = label
    h, w = rgb.shape[:2]
    if (h, w) == labels.shape:
        return labels.astype(np.int64)
    # majority vote of the work pixels under each input pixel (area-weighted one-hot, argmax)
    votes = np.stack([cv2.resize((labels == k).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                      for k in range(len(SHAPES) + 1)])
    return votes.argmax(0).astype(np.int64)


def shape_miou(image: Any, target_mask: Any) -> float:
    """mIoU (background + the 4 shape classes, over classes present in either) of :func:`shape_class_mask` of
    ``image`` against a ground-truth class mask of the same size."""
    from vistune.data.shapes import SHAPES

    target = _np(target_mask)
    pred = shape_class_mask(image)
    if pred.shape != target.shape:
        raise ValueError(f"image is {pred.shape[0]}x{pred.shape[1]} but the mask is {target.shape}")
    return mean_iou(pred, target, num_classes=len(SHAPES) + 1)


def color_layout_error(image: Any, layout: Any, cell: int | None = None) -> float:
    """Mean absolute RGB difference (0-255 grey levels) between the coarse colour layout of ``image``
    (:func:`vistune.conditions.color` with ``cell``; default its 8 x 8 grid) and ``layout`` (a colour-layout condition map: H x W x 3
    uint8 / float in [0, 1], or a 3 x H x W tensor in [0, 1], same size). 0 = the same layout; lower is better."""
    from vistune.conditions import color

    ours = color(to_rgb_uint8(image), cell=cell)[0].permute(1, 2, 0).numpy() * 255.0
    reference = to_rgb_uint8(layout).astype(np.float32)
    if ours.shape != reference.shape:
        raise ValueError(f"image layout is {ours.shape} but the condition is {reference.shape}")
    return float(np.abs(ours - reference).mean())
