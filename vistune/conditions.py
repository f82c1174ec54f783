"""Condition maps for CSC-Tuner, made with opencv: canny, soft edges, colour layout, segmentation, grayscale, lineart.

Every extractor takes a PIL image (any mode: L, RGB, RGBA, P ... are converted to RGB, alpha dropped), a numpy
array (H x W, H x W x C or B x H x W x C; uint8, or float in [0, 1]), a torch tensor (H x W, C x H x W or
B x C x H x W; float in [0, 1], or uint8) or a list of these, and returns a ``B x 3 x H x W`` float32 tensor in
[0, 1]: what the CSC-Tuner's condition encoder reads (``vistune.tuners.csc_tuner.set_control``).

Resize rule (``size=(height, width)``; ``None`` keeps the input size): the image is scaled, keeping its aspect
ratio, until it *covers* the target (for a square target: its shorter side matches), then center-cropped to the
exact size. Images use area interpolation when shrinking and bilinear when enlarging; class masks use nearest.
Extraction happens after resizing, so edges are one pixel thin at the size the U-Net sees.

The control image for a latent of ``h x w`` is ``control_size(vae, (h, w))`` large: the VAE's factor, read from
the VAE (``2 ** (len(vae.config.block_out_channels) - 1)``: 8 for SD), times the latent size.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image

Size = Union[int, Sequence[int], None]
#: A condition extractor: ``(image, size=None, **options) -> B x 3 x H x W`` float tensor in [0, 1].
Condition = Callable[..., torch.Tensor]


class ConditionError(ValueError):
    """An input a condition extractor cannot read, or an unknown condition name."""


# -- inputs --------------------------------------------------------------------------------------------------------


def _float_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
        raise ConditionError(f"{what} with float values must lie in [0, 1], got [{array.min():.4g}, {array.max():.4g}]")
    return np.round(array * 255.0).astype(np.uint8)


def _hwc_to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    """One H x W (x C) array as H x W x 3 uint8 RGB (grey repeated, alpha dropped)."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = _float_to_uint8(array.astype(np.float32), what)
    elif array.dtype != np.uint8:
        raise ConditionError(
            f"{what} has dtype {array.dtype}; images must be uint8 or float in [0, 1] "
            "(integer class masks go to segmentation_from_mask)"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise ConditionError(f"{what} must be H x W or H x W x C with 1-4 channels, got shape {array.shape}")
    if array.shape[2] in (1, 2):  # grey (+ alpha)
        array = np.repeat(array[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def to_rgb_arrays(image: Any) -> list[np.ndarray]:
    """``image`` (PIL / numpy / torch / list, see module doc) as a list of H x W x 3 uint8 RGB arrays."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ConditionError("empty list of images")
        return [array for item in image for array in to_rgb_arrays(item)]
    if isinstance(image, Image.Image):
        return [np.asarray(image.convert("RGB"))]
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ConditionError(f"image tensor must be H x W, C x H x W or B x C x H x W, got shape {tuple(image.shape)}")
        if tensor.dtype not in (torch.uint8, torch.bool) and not tensor.is_floating_point():
            raise ConditionError(f"image tensor has dtype {tensor.dtype}; use float in [0, 1] or uint8")
        array = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        return [_hwc_to_rgb(np.moveaxis(item, 0, -1), "image tensor") for item in array]
    if isinstance(image, np.ndarray):
        if image.ndim == 4:
            return [_hwc_to_rgb(item, "image array") for item in image]
        return [_hwc_to_rgb(image, "image array")]
    raise ConditionError(f"cannot read an image from {type(image).__name__}; pass a PIL image, numpy array or tensor")


def _target(size: Size, shape: tuple[int, ...]) -> tuple[int, int]:
    if size is None:
        return int(shape[0]), int(shape[1])
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ConditionError(f"size must be (height, width) in pixels, an int, or None; got {size!r}")
    return int(size[0]), int(size[1])


def fit(array: np.ndarray, size: Size, nearest: bool = False) -> np.ndarray:
    """Scale ``array`` (H x W [x C]) to cover ``size`` keeping its aspect ratio, then center-crop to it exactly."""
    height, width = _target(size, array.shape)
    h, w = array.shape[:2]
    if (h, w) == (height, width):
        return array
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    resized = cv2.resize(array, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


def _stack(maps: list[np.ndarray]) -> torch.Tensor:
    """H x W or H x W x 3 uint8 maps -> B x 3 x H x W float32 in [0, 1]."""
    out = []
    for m in maps:
        if m.ndim == 2:
            m = np.repeat(m[:, :, None], 3, axis=2)
        out.append(torch.from_numpy(np.ascontiguousarray(m)).permute(2, 0, 1))
    return torch.stack(out).float().div_(255.0)


def to_image_tensor(image: Any, size: Size = None) -> torch.Tensor:
    """The image itself (no extraction) as a B x 3 x H x W float tensor in [0, 1], fitted to ``size``."""
    return _stack([fit(a, size) for a in to_rgb_arrays(image)])


# -- extractors ----------------------------------------------------------------------------------------------------


def canny(image: Any, size: Size = None, *, low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edges (white on black) on the RGB image, so edges between equally bright colours survive.

    ``low``/``high`` are the hysteresis thresholds (SCEdit's and ControlNet's defaults: 100, 200).
    """
    return _stack([cv2.Canny(fit(a, size), low, high) for a in to_rgb_arrays(image)])


def _soft_edge_one(rgb: np.ndarray, sigma: float) -> np.ndarray:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    gray = cv2.GaussianBlur(gray, (0, 0), 1.0)
    magnitude = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))
    if sigma > 0:
        magnitude = cv2.GaussianBlur(magnitude, (0, 0), sigma)
    peak = float(magnitude.max())
    if peak > 1e-6:
        magnitude = magnitude / peak
    return np.round(np.clip(magnitude, 0, 1) * 255).astype(np.uint8)


def soft_edge(image: Any, size: Size = None, *, sigma: float = 1.5) -> torch.Tensor:
    """Soft edges: Gaussian-blurred Sobel gradient magnitude of the grey image, scaled so its peak is 1.

    A weight-free stand-in for HED/PiDiNet soft edges (those need pretrained networks): thick, graded
    boundaries instead of canny's thin binary ones. ``sigma`` (pixels) sets the softness; 0 disables the blur.
    """
    return _stack([_soft_edge_one(fit(a, size), sigma) for a in to_rgb_arrays(image)])


def color(image: Any, size: Size = None, *, cell: int | None = None) -> torch.Tensor:
    """Coarse colour layout: the mean colour of ``cell`` x ``cell`` pixel blocks, upsampled with nearest.

    SCEdit's colour annotator downsamples 64x, an 8 x 8 grid at 512 px; by default ``cell`` keeps that 8 x 8 grid at
    any size (``min(H, W) // 8`` pixels, at least 1), so a 32 px image gets 4 px cells rather than one flat colour.
    With an explicit ``cell`` the grid has ``max(1, round(H / cell))`` rows (same for columns).
    """
    maps = []
    for a in to_rgb_arrays(image):
        a = fit(a, size)
        h, w = a.shape[:2]
        side = cell if cell is not None else max(1, min(h, w) // 8)
        grid = (max(1, round(w / side)), max(1, round(h / side)))
        small = cv2.resize(a, grid, interpolation=cv2.INTER_AREA)
        maps.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))
    return _stack(maps)


def palette(num_classes: int) -> np.ndarray:
    """``num_classes`` x 3 uint8 colours: the PASCAL VOC colour code (class 0 black, then well separated)."""
    colors = np.zeros((num_classes, 3), np.uint8)
    for label in range(num_classes):
        value, r, g, b = label, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colors[label] = (r, g, b)
    return colors


def _is_mask(image: Any) -> bool:
    """A class mask: an integer (not uint8) numpy array or tensor of H x W or B x H x W."""
    if isinstance(image, np.ndarray):
        return image.ndim in (2, 3) and np.issubdtype(image.dtype, np.integer) and image.dtype != np.uint8
    if isinstance(image, torch.Tensor):
        return image.ndim in (2, 3) and not image.is_floating_point() and image.dtype not in (torch.uint8, torch.bool)
    return False


def segmentation_from_mask(mask: Any, size: Size = None) -> torch.Tensor:
    """Colour-coded class map of an integer mask (H x W or B x H x W, classes 0..255) with :func:`palette`."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer) or min(array.shape) < 1:
        raise ConditionError(f"a class mask must be an integer H x W or B x H x W array, got {array.dtype} {array.shape}")
    if array.min() < 0 or array.max() > 255:
        raise ConditionError(f"class ids must lie in 0..255, got {array.min()}..{array.max()}")
    colors = palette(256)
    return _stack([colors[fit(m.astype(np.uint8), size, nearest=True)] for m in array])


def _cluster_labels(rgb: np.ndarray, segments: int, smooth: int) -> np.ndarray:
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    sample = pixels[:: max(1, len(pixels) // 4096)]
    k = min(segments, len(np.unique(sample, axis=0)))
    if k <= 1:
        return np.zeros(rgb.shape[:2], np.uint8)
    cv2.setRNGSeed(0)  # deterministic k-means++ seeding
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.5)
    _, _, centres = cv2.kmeans(sample, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    distances = ((pixels[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    labels = distances.argmin(1)
    counts = np.bincount(labels, minlength=k)
    # classes by area (largest first, ties by centre brightness), so the same scene gets the same colours
    order = sorted(range(k), key=lambda c: (-counts[c], float(centres[c].sum())))
    rank = np.empty(k, np.uint8)
    rank[order] = np.arange(k, dtype=np.uint8)
    label_map = rank[labels].reshape(rgb.shape[:2])
    if smooth > 1:
        label_map = cv2.medianBlur(label_map, smooth if smooth % 2 else smooth + 1)
    return label_map


def segmentation(image: Any, size: Size = None, *, segments: int = 8, smooth: int = 5) -> torch.Tensor:
    """Segmentation map: an integer class mask is colour-coded (:func:`segmentation_from_mask`); an image is
    split into at most ``segments`` colour clusters (k-means on RGB, seeded), numbered by area (largest = 0,
    black), median-filtered over ``smooth`` pixels against speckle, and colour-coded the same way.

    uint8 arrays are read as images; pass uint8 class masks to :func:`segmentation_from_mask` directly.
    """
    if _is_mask(image):
        return segmentation_from_mask(image, size)
    if not 1 <= segments <= 255:
        raise ConditionError(f"segments must be in 1..255, got {segments}")
    colors = palette(256)
    return _stack([colors[_cluster_labels(fit(a, size), segments, smooth)] for a in to_rgb_arrays(image)])


def grayscale(image: Any, size: Size = None) -> torch.Tensor:
    """Luminance (ITU-R 601 weights) repeated to three channels."""
    return _stack([cv2.cvtColor(fit(a, size), cv2.COLOR_RGB2GRAY) for a in to_rgb_arrays(image)])


def lineart(image: Any, size: Size = None, *, block: int = 9, offset: float = 4.0) -> torch.Tensor:
    """Line drawing, white lines on black: pixels darker than their ``block`` x ``block`` neighbourhood mean by
    more than ``offset`` grey levels (adaptive threshold of the lightly blurred grey image).

    A weight-free stand-in for learned lineart annotators: dark strokes and the dark side of boundaries.
    """
    block = block if block % 2 else block + 1
    maps = []
    for a in to_rgb_arrays(image):
        gray = cv2.GaussianBlur(cv2.cvtColor(fit(a, size), cv2.COLOR_RGB2GRAY), (3, 3), 0)
        maps.append(cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, max(3, block), offset))
    return _stack(maps)


#: Condition extractors by name.
CONDITIONS: dict[str, Condition] = {
    "canny": canny,
    "soft_edge": soft_edge,
    "color": color,
    "segmentation": segmentation,
    "grayscale": grayscale,
    "lineart": lineart,
}


def get_condition(name: str) -> Condition:
    """The extractor registered as ``name``; an error listing the known names otherwise."""
    try:
        return CONDITIONS[name]
    except (KeyError, TypeError):
        raise ConditionError(f"unknown condition {name!r}; known conditions: {sorted(CONDITIONS)}") from None


# -- sizes -----------------------------------------------------------------------------------------------------------


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent pixel of a diffusers VAE: ``2 ** (len(vae.config.block_out_channels) - 1)`` (SD: 8)."""
    config = getattr(vae, "config", vae)
    channels = config.get("block_out_channels") if isinstance(config, dict) else getattr(config, "block_out_channels", None)
    if not channels:
        raise ConditionError(f"{type(vae).__name__} has no config.block_out_channels; is it a diffusers VAE?")
    return 2 ** (len(channels) - 1)


def control_size(vae: Any, latent_hw: Union[int, Sequence[int]]) -> tuple[int, int]:
    """``(height, width)`` of the control image for a latent of ``latent_hw`` (an int or ``(h, w)``)."""
    if isinstance(latent_hw, int):
        latent_hw = (latent_hw, latent_hw)
    h, w = (int(v) for v in latent_hw)
    factor = vae_scale_factor(vae)
    return h * factor, w * factor
