"""The procedural "shapes world": seeded images of coloured shapes with exact ground truth.

Every image is rendered without anti-aliasing (a pixel belongs to a shape iff its centre
lies inside it), so masks, boxes and edges are exact.
Everything is a pure function of its seed (``numpy.random.default_rng``); no global RNG.

Conventions
-----------
* Pixel ``(x, y)`` is column ``x``, row ``y``; pixel centres sit on integer coordinates.
* ``ShapeSpec.size`` is the circumradius: the shape fits in the disk of that radius.
* Boxes are ``xyxy`` with exclusive upper edges: ``x1 = last visible column + 1``.
* Class ids are 1-based (``SHAPES[k - 1]``); 0 is background.
* Masks are shape silhouettes in every style (an outline shape's mask covers its inside).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

#: Named shape colours, chosen far apart in Lab (also after darkening / pastel mixing).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 140, 0),
    "yellow": (240, 220, 30),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "purple": (145, 50, 185),
}

#: Named backgrounds: achromatic, so every shape colour differs clearly from each of them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (125, 125, 125),
}

STYLES: tuple[str, ...] = ("plain", "striped", "outline", "pastel", "noise")

#: (shape, colour) pairs never used for training; every shape appears once or twice.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "purple"),
        ("square", "orange"),
        ("triangle", "blue"),
        ("star", "green"),
        ("circle", "yellow"),
    }
)

PASTEL_MIX = 0.5  # pastel colour = (1 - m) * colour + m * white
STRIPE_DARK = 0.45  # the dark stripes are colour * STRIPE_DARK
NOISE_AMPLITUDE = 0.25  # std of the darkening brightness texture (mean 0.75, <= 1)
MAX_OCCLUSION = 0.1  # default: at most this fraction of any shape may be hidden

# Circumradius as a fraction of the image side, by number of shapes in the scene.
_RADIUS_RANGE = {1: (0.22, 0.33), 2: (0.17, 0.26), 3: (0.16, 0.22)}

SeedLike = Union[int, Sequence[int], np.random.Generator]


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: class name, colour name, centre (x, y) px, circumradius px, rotation deg."""

    shape: str
    color: str
    center: tuple[float, float]
    size: float
    rotation: float = 0.0

    @property
    def label(self) -> int:
        """1-based class id, as used in the semantic mask."""
        return SHAPES.index(self.shape) + 1


def shape_polygon(spec: ShapeSpec) -> np.ndarray:
    """Float (K, 2) vertices (x, y) of the shape outline (a 64-gon for the circle)."""
    cx, cy = spec.center
    r, rot = spec.size, math.radians(spec.rotation)
    if spec.shape == "circle":
        n, radii, start = 64, np.ones(64), 0.0
    elif spec.shape == "square":
        n, radii, start = 4, np.ones(4), math.pi / 4
    elif spec.shape == "triangle":
        n, radii, start = 3, np.ones(3), -math.pi / 2
    elif spec.shape == "star":
        n, radii, start = 10, np.tile([1.0, 0.5], 5), -math.pi / 2
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    ang = start + rot + 2 * math.pi * np.arange(n) / n
    return np.stack([cx + r * radii * np.cos(ang), cy + r * radii * np.sin(ang)], axis=1)


def _convex_pieces(spec: ShapeSpec) -> list[np.ndarray]:
    """The shape as a union of convex polygons (the star: inner pentagon + 5 arm triangles)."""
    poly = shape_polygon(spec)
    if spec.shape != "star":
        return [poly]
    outer, inner = poly[0::2], poly[1::2]
    return [inner] + [np.stack([inner[k - 1], outer[k], inner[k]]) for k in range(5)]


def _inside_convex(poly: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which points (xs row, ys column broadcast) lie inside or on a convex polygon."""
    x, y = poly[:, 0], poly[:, 1]
    ex, ey = np.roll(x, -1) - x, np.roll(y, -1) - y
    orient = np.sign(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    inside = np.ones(np.broadcast_shapes(xs.shape, ys.shape), bool)
    for k in range(len(poly)):
        inside &= orient * (ex[k] * (ys - y[k]) - ey[k] * (xs - x[k])) >= -1e-9
    return inside


def shape_mask(spec: ShapeSpec, size: int) -> np.ndarray:
    """Exact boolean silhouette: pixel (x, y) is in iff its centre lies inside the shape.

    Point sampling at pixel centres (no anti-aliasing), so sub-pixel positions are honoured
    exactly and the mask centroid tracks the true centre.
    """
    mask = np.zeros((size, size), bool)
    (cx, cy), r = spec.center, spec.size
    x0, x1 = max(math.floor(cx - r), 0), min(math.ceil(cx + r) + 1, size)
    y0, y1 = max(math.floor(cy - r), 0), min(math.ceil(cy + r) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return mask
    xs = np.arange(x0, x1, dtype=np.float64)[None, :]
    ys = np.arange(y0, y1, dtype=np.float64)[:, None]
    if spec.shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    else:
        inside = np.zeros((y1 - y0, x1 - x0), bool)
        for piece in _convex_pieces(spec):
            inside |= _inside_convex(piece, xs, ys)
    mask[y0:y1, x0:x1] = inside
    return mask


# --------------------------------------------------------------------------- rendering


def _stripe_pattern(size: int) -> np.ndarray:
    """Diagonal 45-degree stripes; period scales with the image (4+4 px along x at 64 px)."""
    width = max(2, round(size / 16))
    yy, xx = np.mgrid[:size, :size]
    return ((xx + yy) // width) % 2 == 0


def _outline_thickness(size: int) -> int:
    """Outline width in px: 2 at 64 px, 1 at 32 px."""
    return max(1, round(size / 32))


def _noise_texture(size: int, seed: SeedLike) -> np.ndarray:
    """Brightness factor in [0.35, 1] (grain ~2 px). Only darkening, so that multiplying
    an sRGB colour by it keeps the hue (brightening would clip toward yellow/white)."""
    n = _rng(seed).standard_normal((size, size)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), 0.8)
    n /= n.std() + 1e-8
    return np.clip(0.75 + NOISE_AMPLITUDE * n, 0.35, 1.0)


def style_color(color: str, style: str) -> np.ndarray:
    """Base RGB (float) of a named colour in a style (pastel mixes toward white)."""
    c = np.asarray(COLORS[color], np.float32)
    return c * (1 - PASTEL_MIX) + 255 * PASTEL_MIX if style == "pastel" else c


def recolor_pastel(image: Any, soft: float = 60.0) -> np.ndarray:
    """Any RGB image with its shapes mixed toward white as the pastel style mixes them, and nothing else changed.

    The background colour is the median of the border; a pixel is mixed in proportion to its RGB distance from it
    (fully from ``soft`` up), so soft shape edges of generated images blend. On a plain scene this gives the pastel
    scene's pixels; on a model's output it is the pastel style without any change of shape.
    """
    rgb = to_rgb_uint8(image).astype(np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    weight = np.clip(np.linalg.norm(rgb - np.median(border, axis=0), axis=-1, keepdims=True) / soft, 0.0, 1.0)
    return np.clip(np.round(rgb + weight * PASTEL_MIX * (255.0 - rgb)), 0, 255).astype(np.uint8)


@dataclass(eq=False)
class ShapesSample:
    """A rendered scene with exact ground truth (see module docstring for conventions)."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    mask: np.ndarray  # H x W int64 semantic map, 0 = background, k = SHAPES[k-1]
    instance_mask: np.ndarray  # H x W int64, i = i-th spec (1-based), later specs on top
    boxes: np.ndarray  # N x 4 float32 xyxy of the visible part
    labels: np.ndarray  # N int64 class ids (1-based)
    colors: tuple[str, ...]  # N colour names
    edges: np.ndarray  # H x W uint8 {0,1}: inner boundary pixels of visible instances
    caption: str
    background: str
    style: str
    specs: tuple[ShapeSpec, ...]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(colour, shape) pairs in caption order (left to right)."""
        return [(s.color, s.shape) for s in _caption_order(self.specs)]


def instance_edges(instance_mask: np.ndarray) -> np.ndarray:
    """uint8 {0,1} map of foreground pixels with a 4-neighbour of another instance id."""
    p = np.pad(instance_mask, 1)
    c = p[1:-1, 1:-1]
    diff = (p[:-2, 1:-1] != c) | (p[2:, 1:-1] != c) | (p[1:-1, :-2] != c) | (p[1:-1, 2:] != c)
    return ((c > 0) & diff).astype(np.uint8)


def render_scene(
    specs: Sequence[ShapeSpec],
    background: str = "white",
    size: int = 64,
    style: str = "plain",
    seed: SeedLike = 0,
    caption_style: bool = False,
) -> ShapesSample:
    """Render explicit specs (later ones on top). ``seed`` only drives the noise texture."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    bg = np.asarray(BACKGROUNDS[background], np.uint8)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = bg
    instance = np.zeros((size, size), np.int64)
    stripes = _stripe_pattern(size) if style == "striped" else None
    texture = _noise_texture(size, seed) if style == "noise" else None
    kernel = np.ones((3, 3), np.uint8)
    for i, spec in enumerate(specs):
        m = shape_mask(spec, size)
        instance[m] = i + 1
        base = style_color(spec.color, style)
        if style == "striped":
            image[m & stripes] = base.astype(np.uint8)
            image[m & ~stripes] = (base * STRIPE_DARK).astype(np.uint8)
        elif style == "noise":
            image[m] = np.clip(base * texture[m][:, None], 0, 255).astype(np.uint8)
        else:
            image[m] = base.astype(np.uint8)
        if style == "outline":
            inner = cv2.erode(m.astype(np.uint8), kernel, iterations=_outline_thickness(size),
                              borderType=cv2.BORDER_CONSTANT, borderValue=0)
            image[inner.astype(bool)] = bg
    labels = np.array([s.label for s in specs], np.int64)
    mask = np.concatenate([[0], labels])[instance]
    boxes = np.zeros((len(specs), 4), np.float32)
    for i in range(len(specs)):
        x, y, w, h = cv2.boundingRect((instance == i + 1).astype(np.uint8))
        boxes[i] = (x, y, x + w, y + h)
    return ShapesSample(
        image=image,
        mask=mask,
        instance_mask=instance,
        boxes=boxes,
        labels=labels,
        colors=tuple(s.color for s in specs),
        edges=instance_edges(instance),
        caption=make_caption(
            [(s.color, s.shape) for s in _caption_order(specs)],
            background,
            style if caption_style else None,
        ),
        background=background,
        style=style,
        specs=tuple(specs),
    )


# --------------------------------------------------------------------------- captions


def _caption_order(specs: Sequence[ShapeSpec]) -> list[ShapeSpec]:
    return sorted(specs, key=lambda s: (s.center[0], s.center[1]))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(
    pairs: Sequence[tuple[str, str]], background: str, style: str | None = None
) -> str:
    """'a red circle, a blue square and a green star on a white background' (+ ', S style')."""
    items = [f"{_article(c)} {c} {s}" for c, s in pairs]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    text = f"{body} on {_article(background)} {background} background"
    return text + (f", {style} style" if style and style != "plain" else "")


_PAIR_RE = re.compile(r"\b(%s)\s+(%s)s?\b" % ("|".join(COLORS), "|".join(SHAPES)))
_BG_RE = re.compile(r"\b(%s)\s+background\b" % "|".join(BACKGROUNDS))


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """Inverse of ``make_caption``: ([(colour, shape), ...] in text order, background or None)."""
    text = text.lower()
    bg = _BG_RE.search(text)
    return [(m.group(1), m.group(2)) for m in _PAIR_RE.finditer(text)], (
        bg.group(1) if bg else None
    )


def held_out_prompts(
    backgrounds: Iterable[str] | None = None, with_companion: bool = False, seed: int = 0
) -> list[str]:
    """Evaluation captions built from HELD_OUT_PAIRS, one per (pair, background).

    With ``with_companion`` each prompt also names one random training pair, to test
    composition of a held-out pair with a seen one.
    """
    rng = np.random.default_rng(seed)
    seen = [p for p in all_pairs() if p not in HELD_OUT_PAIRS]
    prompts = []
    for shape, color in sorted(HELD_OUT_PAIRS):
        for bg in backgrounds or BACKGROUNDS:
            pairs = [(color, shape)]
            if with_companion:
                s, c = seen[rng.integers(len(seen))]
                pairs.append((c, s))
            prompts.append(make_caption(pairs, bg))
    return prompts


def all_pairs() -> list[tuple[str, str]]:
    """Every (shape, colour) pair of the vocabulary."""
    return [(s, c) for s in SHAPES for c in COLORS]


# --------------------------------------------------------------------------- sampling


def _num_shapes(rng: np.random.Generator, num_shapes: int | tuple[int, int]) -> int:
    if isinstance(num_shapes, int):
        return num_shapes
    lo, hi = num_shapes
    return int(rng.integers(lo, hi + 1))


def _place(
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]],
    size: int,
    radius_range: tuple[float, float],
    max_occlusion: float,
    max_tries: int = 100,
) -> list[ShapeSpec] | None:
    """Random placement keeping each shape >= (1 - max_occlusion) visible.

    Same-coloured shapes may not touch (they would merge into one blob for a checker).
    Returns None when a shape cannot be placed.
    """
    specs: list[ShapeSpec] = []
    full_area: list[int] = []
    instance = np.zeros((size, size), np.int16)
    kernel = np.ones((5, 5), np.uint8)
    for k, (shape, color) in enumerate(pairs):
        for _ in range(max_tries):
            r = rng.uniform(*radius_range) * size
            cx, cy = rng.uniform(r, size - 1 - r, size=2)
            rot = float(rng.uniform(0, 360))
            spec = ShapeSpec(shape, color, (float(cx), float(cy)), float(r), rot)
            m = shape_mask(spec, size)
            near = cv2.dilate(m.astype(np.uint8), kernel).astype(bool)
            ok = True
            for j, other in enumerate(specs):
                vis = instance == j + 1
                if other.color == color and (near & vis).any():
                    ok = False
                elif (vis & ~m).sum() < (1 - max_occlusion) * full_area[j]:
                    ok = False
                if not ok:
                    break
            if ok:
                instance[m] = k + 1
                specs.append(spec)
                full_area.append(int(m.sum()))
                break
        else:
            return None
    return specs


def sample_scene(
    seed_or_rng: SeedLike,
    size: int = 64,
    num_shapes: int | tuple[int, int] = (1, 3),
    style: str = "plain",
    exclude: Iterable[tuple[str, str]] | None = None,
    background: str | None = None,
    radius_range: tuple[float, float] | None = None,
    max_occlusion: float = MAX_OCCLUSION,
    caption_style: bool = False,
) -> ShapesSample:
    """Sample and render a random scene.

    ``exclude``: (shape, colour) pairs never drawn (e.g. HELD_OUT_PAIRS for training).
    ``radius_range``: circumradius as a fraction of ``size``; default depends on the count
    so that a lone shape spans >= ~44 % of the side and each of three >= ~32 % (stars and
    squares below ~6 px circumradius stop being recognisable at 32 px once blurred).
    """
    rng = _rng(seed_or_rng)
    banned = set(exclude or ())
    allowed = [p for p in all_pairs() if p not in banned]
    for _ in range(100):
        n = _num_shapes(rng, num_shapes)
        idx = rng.choice(len(allowed), size=n, replace=False)
        pairs = [allowed[i] for i in idx]
        bg = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        specs = _place(rng, pairs, size, radius_range or _RADIUS_RANGE[min(n, 3)], max_occlusion)
        if specs is not None:
            texture_seed = int(rng.integers(2**31))
            return render_scene(specs, bg, size, style, texture_seed, caption_style)
    raise RuntimeError("could not place shapes; loosen radius_range or max_occlusion")


# --------------------------------------------------------------------------- style statistics


@dataclass(eq=False)
class ColorSegmentation:
    """Background estimate plus per-pixel named-colour labels (-1 = background)."""

    background: str
    background_lab: np.ndarray  # (3,) Lab of the estimated background
    foreground: np.ndarray  # H x W bool
    labels: np.ndarray  # H x W int, index into COLOR_NAMES or -1
    lab: np.ndarray  # H x W x 3 float32 Lab image


COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
FOREGROUND_DELTA_E = 20.0  # Lab distance from the background that counts as foreground
_L_WEIGHT = 0.5  # lightness matters less than hue when naming colours


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb, np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _prototypes() -> tuple[np.ndarray, np.ndarray]:
    """Lab prototypes of each colour as plain, dark-stripe and pastel variants."""
    rgb, owner = [], []
    for k, name in enumerate(COLOR_NAMES):
        c = np.asarray(COLORS[name], np.float32)
        for v in (c, c * STRIPE_DARK, style_color(name, "pastel")):
            rgb.append(v)
            owner.append(k)
    return _to_lab(np.array([rgb])).reshape(-1, 3), np.array(owner)


_PROTO_LAB, _PROTO_OWNER = _prototypes()
_BG_LAB = _to_lab(np.array([list(BACKGROUNDS.values())], np.float32))[0]


def to_rgb_uint8(image: Any) -> np.ndarray:
    """H x W x 3 uint8 RGB from uint8/float numpy (HWC), PIL, or a 3xHxW tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu().float().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def segment_colors(image: Any, smooth: int = 5) -> ColorSegmentation:
    """Background = median border colour; foreground = far from it in Lab; then name colours.

    Each foreground pixel takes the colour whose nearest prototype (plain, dark or pastel
    variant, lightness down-weighted) is closest, which keeps stripes and noisy or pastel
    fills in one colour class; then a ``smooth`` x ``smooth`` mode filter.
    """
    rgb = to_rgb_uint8(image)
    lab = _to_lab(rgb)
    border = np.concatenate([lab[:2].reshape(-1, 3), lab[-2:].reshape(-1, 3),
                             lab[:, :2].reshape(-1, 3), lab[:, -2:].reshape(-1, 3)])
    bg_lab = np.median(border, axis=0)
    bg_name = list(BACKGROUNDS)[int(np.argmin(np.linalg.norm(_BG_LAB - bg_lab, axis=1)))]
    fg = np.linalg.norm(lab - bg_lab, axis=-1) > FOREGROUND_DELTA_E
    w = np.array([_L_WEIGHT, 1.0, 1.0], np.float32)
    d = np.linalg.norm((lab[fg][:, None, :] - _PROTO_LAB[None]) * w, axis=-1)
    raw = np.full(fg.shape, -1, np.int64)
    raw[fg] = _PROTO_OWNER[np.argmin(d, axis=1)]
    labels = np.full(fg.shape, -1, np.int64)
    if smooth > 1 and fg.any():
        # Mode filter: each foreground pixel takes the commonest colour of its window's
        # foreground pixels (removes speckle from texture/noise, keeps the fg outline).
        votes = np.stack([cv2.boxFilter((raw == k).astype(np.float32), -1, (smooth, smooth))
                          for k in range(len(COLOR_NAMES))])
        labels[fg] = np.argmax(votes[:, fg], axis=0)
    else:
        labels = raw
    return ColorSegmentation(bg_name, bg_lab, fg, labels, lab)


STAT_SIZE = 64  # style statistics are computed at this resolution
_K3 = np.ones((3, 3), np.uint8)
INTERIOR_ERODE = 3  # px (at STAT_SIZE) kept clear of region boundaries


def _interior(seg: ColorSegmentation, erode: int = INTERIOR_ERODE) -> np.ndarray:
    """Pixels deep inside a single-colour region (no shape or colour boundary nearby)."""
    out = np.zeros(seg.labels.shape, bool)
    for k in np.unique(seg.labels[seg.labels >= 0]):
        m = cv2.erode((seg.labels == k).astype(np.uint8), _K3, iterations=erode,
                      borderType=cv2.BORDER_CONSTANT, borderValue=0)
        out |= m.astype(bool)
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, -1)
    return filled.astype(bool)


def _tensor_eigs(gx: np.ndarray, gy: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    """Eigenvalues (lambda1 >= lambda2) of the mean colour structure tensor over ``where``."""
    if where.sum() < 4:
        return 0.0, 0.0
    jxx = float((gx[where] ** 2).sum(1).mean())
    jyy = float((gy[where] ** 2).sum(1).mean())
    jxy = float((gx[where] * gy[where]).sum(1).mean())
    half_trace, det = (jxx + jyy) / 2, jxx * jyy - jxy**2
    root = math.sqrt(max(half_trace**2 - det, 0.0))
    return half_trace + root, max(half_trace - root, 0.0)


def style_statistics(image: Any) -> dict[str, float]:
    """All style statistics of an RGB image at once; higher = more of that style.

    With J the colour structure tensor (Sobel gradients of RGB in [0, 1]) averaged over
    the interiors of single-colour regions, minus the same over the background (so
    sensor/diffusion noise present everywhere cancels):
    * striped: lambda1 - lambda2 of J, the oriented high-frequency energy;
    * noise: lambda2 of J, the unoriented texture energy;
    * outline: fraction of the hole-filled foreground that is background-coloured;
    * pastel: 1 - mean HSV saturation of region interiors.
    Needs no ground truth (background from the border); images are resized to STAT_SIZE.
    """
    rgb = to_rgb_uint8(image)
    if rgb.shape[:2] != (STAT_SIZE, STAT_SIZE):
        interp = cv2.INTER_AREA if rgb.shape[0] > STAT_SIZE else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (STAT_SIZE, STAT_SIZE), interpolation=interp)
    seg = segment_colors(rgb)
    filled = _fill_holes(seg.foreground)
    outline = float((filled & ~seg.foreground).sum() / max(filled.sum(), 1))
    inner = _interior(seg)
    if inner.sum() < 4:
        return {"striped": 0.0, "noise": 0.0, "outline": outline, "pastel": 0.0}
    away = ~cv2.dilate(seg.foreground.astype(np.uint8), _K3, iterations=2).astype(bool)
    x = rgb.astype(np.float32) / 255.0
    gx = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    in1, in2 = _tensor_eigs(gx, gy, inner)
    bg1, bg2 = _tensor_eigs(gx, gy, away)
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1][inner].astype(np.float32) / 255.0
    return {
        "striped": max((in1 - in2) - (bg1 - bg2), 0.0),
        "noise": max(in2 - bg2, 0.0),
        "outline": outline,
        "pastel": float(1.0 - sat.mean()),
    }


def style_statistic(image: Any, style: str) -> float:
    """Numeric evidence for ``style`` in any RGB image (higher = more); see style_statistics."""
    if style == "plain" or style not in STYLES:
        raise ValueError(f"no statistic for style {style!r}; use one of {STYLES[1:]}")
    return style_statistics(image)[style]


# --------------------------------------------------------------------------- videos


@dataclass(eq=False)
class ShapesClip:
    """Moving-shape video with per-frame ground truth (T frames, N shapes)."""

    frames: np.ndarray  # T x H x W x 3 uint8
    masks: np.ndarray  # T x H x W int64 semantic
    instance_masks: np.ndarray  # T x H x W int64
    edges: np.ndarray  # T x H x W uint8
    boxes: np.ndarray  # T x N x 4 float32 visible boxes (NaN when fully hidden)
    labels: np.ndarray  # N int64
    colors: tuple[str, ...]
    specs: list[tuple[ShapeSpec, ...]]  # per frame
    displacements: np.ndarray  # (T-1) x N x 2: centre[t+1] - centre[t], px
    caption: str
    background: str
    style: str


def _bounce(pos: float, vel: float, lo: float, hi: float) -> tuple[float, float]:
    if hi <= lo:
        return (lo + hi) / 2, vel
    while pos < lo or pos > hi:
        if pos < lo:
            pos, vel = 2 * lo - pos, -vel
        if pos > hi:
            pos, vel = 2 * hi - pos, -vel
    return pos, vel


def sample_clip(
    seed: SeedLike,
    num_frames: int = 8,
    size: int = 64,
    num_shapes: int | tuple[int, int] = (1, 3),
    style: str = "plain",
    exclude: Iterable[tuple[str, str]] | None = None,
    speed: tuple[float, float] = (1.0, 3.0),
    rotate: bool = True,
    resize: bool = False,
) -> ShapesClip:
    """Shapes moving at constant velocity (``speed`` px/frame at 64 px, scaled with size),
    bouncing off the borders; optionally rotating (<= 6 deg/frame) and slowly growing or
    shrinking (<= 3 %/frame). Frame 0 obeys the scene occlusion limit; later frames may
    overlap freely. Stripes and noise texture are fixed to the image, not the shape.
    """
    rng = _rng(seed)
    first = sample_scene(rng, size, num_shapes, "plain", exclude)
    n = len(first.specs)
    ang = rng.uniform(0, 2 * math.pi, n)
    spd = rng.uniform(*speed, n) * size / 64
    vel = np.stack([spd * np.cos(ang), spd * np.sin(ang)], 1)
    spin = rng.uniform(-6, 6, n) if rotate else np.zeros(n)
    grow = rng.uniform(-0.03, 0.03, n) if resize else np.zeros(n)
    texture_seed = int(rng.integers(2**31))
    r0 = np.array([s.size for s in first.specs])
    state = [list(s.center) + [s.size, s.rotation] for s in first.specs]
    frames_specs: list[tuple[ShapeSpec, ...]] = []
    for t in range(num_frames):
        frames_specs.append(tuple(
            ShapeSpec(s.shape, s.color, (st[0], st[1]), st[2], st[3] % 360)
            for s, st in zip(first.specs, state)
        ))
        for i, st in enumerate(state):
            hi = min(1.3 * r0[i], size / 2 - 1)
            st[2] = float(np.clip(st[2] * (1 + grow[i]), 0.7 * r0[i], hi))
            st[0], vel[i, 0] = _bounce(st[0] + vel[i, 0], vel[i, 0], st[2], size - 1 - st[2])
            st[1], vel[i, 1] = _bounce(st[1] + vel[i, 1], vel[i, 1], st[2], size - 1 - st[2])
            st[3] += spin[i]
    renders = [render_scene(sp, first.background, size, style, texture_seed) for sp in frames_specs]
    centers = np.array([[s.center for s in sp] for sp in frames_specs], np.float64)
    boxes = np.stack([r.boxes for r in renders]).astype(np.float32)
    for t, r in enumerate(renders):
        hidden = [i for i in range(n) if not (r.instance_mask == i + 1).any()]
        boxes[t, hidden] = np.nan
    return ShapesClip(
        frames=np.stack([r.image for r in renders]),
        masks=np.stack([r.mask for r in renders]),
        instance_masks=np.stack([r.instance_mask for r in renders]),
        edges=np.stack([r.edges for r in renders]),
        boxes=boxes,
        labels=first.labels,
        colors=first.colors,
        specs=frames_specs,
        displacements=np.diff(centers, axis=0),
        caption=first.caption,
        background=first.background,
        style=style,
    )


# --------------------------------------------------------------------------- datasets


class ShapesDataset(Dataset):
    """Map-style dataset; item ``i`` is ``sample_scene(default_rng([seed, i]), ...)``.

    Items do not depend on access order or workers. ``exclude`` defaults to
    HELD_OUT_PAIRS (training use); pass ``None`` to draw from every pair.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        size: int = 64,
        style: str = "plain",
        num_shapes: int | tuple[int, int] = (1, 3),
        exclude: Iterable[tuple[str, str]] | None = HELD_OUT_PAIRS,
        caption_style: bool = False,
    ) -> None:
        self.num_samples, self.seed, self.size, self.style = num_samples, seed, size, style
        self.num_shapes, self.caption_style = num_shapes, caption_style
        self.exclude = frozenset(exclude or ())

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> ShapesSample:
        """The full ShapesSample behind item ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        return sample_scene(rng, self.size, self.num_shapes, self.style, self.exclude,
                            caption_style=self.caption_style)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.scene(index)
        return {
            "pixel_values": torch.from_numpy(s.image).permute(2, 0, 1).float().div_(255.0),
            "caption": s.caption,
            "mask": torch.from_numpy(s.mask),
            "boxes": torch.from_numpy(s.boxes),
            "labels": torch.from_numpy(s.labels),
            "edges": torch.from_numpy(s.edges).float()[None],
        }


_STACKED = ("pixel_values", "mask", "edges")


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack fixed-size fields (pixel_values, mask, edges); keep lists for the rest."""
    return {k: torch.stack([b[k] for b in batch]) if k in _STACKED else [b[k] for b in batch]
            for k in batch[0]}


def export_imagefolder(
    directory: str | Path,
    num_samples: int,
    seed: int = 0,
    size: int = 64,
    style: str = "plain",
    num_shapes: int | tuple[int, int] = (1, 3),
    exclude: Iterable[tuple[str, str]] | None = HELD_OUT_PAIRS,
    save_masks: bool = False,
    save_edges: bool = False,
) -> Path:
    """Write ShapesDataset items as an HF ``imagefolder``; returns the images folder.

    Layout: ``directory/images/{i:06d}.png`` + ``directory/images/metadata.jsonl`` with
    ``file_name`` and ``text`` (the caption), plus optional sibling folders
    ``directory/masks`` (semantic class ids as uint8 PNG) and ``directory/edges`` (0/255),
    referenced by ``mask_file_name`` / ``edge_file_name`` relative to the images folder.
    """
    root = Path(directory)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for sub, on in (("masks", save_masks), ("edges", save_edges)):
        if on:
            (root / sub).mkdir(exist_ok=True)
    ds = ShapesDataset(num_samples, seed, size, style, num_shapes, exclude)
    with open(img_dir / "metadata.jsonl", "w") as meta:
        for i in range(num_samples):
            s = ds.scene(i)
            name = f"{i:06d}.png"
            cv2.imwrite(str(img_dir / name), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
            row = {"file_name": name, "text": s.caption, "background": s.background, "style": style}
            if save_masks:
                cv2.imwrite(str(root / "masks" / name), s.mask.astype(np.uint8))
                row["mask_file_name"] = f"../masks/{name}"
            if save_edges:
                cv2.imwrite(str(root / "edges" / name), s.edges * 255)
                row["edge_file_name"] = f"../edges/{name}"
            meta.write(json.dumps(row) + "\n")
    return img_dir
