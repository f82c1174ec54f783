"""Image and video attacks on watermarked content: a registry of named, deterministic attacks for evaluation and a
random differentiable attack layer for training.

Conventions: images are float tensors ``(B, 3, H, W)`` in ``[0, 1]``; videos are ``(T, 3, H, W)``. Crop and
resize factors are **area** fractions, as in Stable Signature's ``utils_img`` (a side scale of ``sqrt(area)``).
JPEG is real JPEG (opencv, per image, through uint8); in training it passes gradients straight through
(``x + (jpeg(x) - x).detach()``, Stable Signature's ``DiffJPEG``), so the forward pass is the true codec.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

Attack = Callable[[torch.Tensor], torch.Tensor]


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"attacks take RGB images as a (B, 3, H, W) tensor in [0, 1], got {getattr(x, 'shape', type(x))}")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` floats in [0, 1] -> ``(B, H, W, 3)`` uint8 (rounded)."""
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(like.device, like.dtype) / 255


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Real JPEG compression at ``quality`` (opencv, 4:2:0 chroma as libjpeg's default). Not differentiable."""
    _check_images(x)
    out = []
    for image in to_uint8(x):
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("opencv could not JPEG-encode the image")
        out.append(cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    return from_uint8(np.stack(out), x)


def jpeg_straight_through(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG in the forward pass, identity gradient in the backward pass (Stable Signature's ``DiffJPEG``)."""
    return x + (jpeg(x, quality) - x).detach()


def quantize_straight_through(x: torch.Tensor) -> torch.Tensor:
    """Rounding to 8 bits with a straight-through gradient (what saving an image as PNG does)."""
    return x + ((x.clamp(0, 1) * 255).round() / 255 - x).detach()


def _side(size: int, area: float) -> int:
    return max(1, int(round(size * math.sqrt(area))))


def center_crop(x: torch.Tensor, area: float) -> torch.Tensor:
    """Keep the central ``area`` fraction of the image (side ``sqrt(area)``), as Stable Signature's ``center_crop``."""
    _check_images(x)
    h, w = x.shape[-2:]
    return TF.center_crop(x, [_side(h, area), _side(w, area)])


def _crop_box(h: int, w: int, area: float, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    ch, cw = _side(h, area), _side(w, area)
    top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
    return top, left, ch, cw


def random_crop(x: torch.Tensor, area: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep an ``area`` fraction of the image at a random position (the same for the whole batch)."""
    top, left, ch, cw = _crop_box(*x.shape[-2:], area, generator)
    return x[..., top:top + ch, left:left + cw]


#: Value of the pixels a crop removed when it is put back on a canvas of the original size.
CANVAS_FILL = 0.5


def place_on_canvas(x: torch.Tensor, size: tuple[int, int], top: int, left: int) -> torch.Tensor:
    """``x`` pasted at ``(top, left)`` on a ``size`` canvas of grey (:data:`CANVAS_FILL`): a crop put back where
    it was cut from (differentiable in ``x``)."""
    h, w = x.shape[-2:]
    if top < 0 or left < 0 or top + h > size[0] or left + w > size[1]:
        raise ValueError(f"a {h}x{w} image does not fit on a {size[0]}x{size[1]} canvas at ({top}, {left})")
    return F.pad(x - CANVAS_FILL, (left, size[1] - left - w, top, size[0] - top - h)) + CANVAS_FILL


def crop_in_place(x: torch.Tensor, area: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random ``area`` crop left where it was on a grey canvas of the image's size: what the detector's
    centre-crop hypothesis hands the extractor (:class:`~vistune.tuners.watermark.WatermarkDetector`)."""
    top, left, ch, cw = _crop_box(*x.shape[-2:], area, generator)
    return place_on_canvas(x[..., top:top + ch, left:left + cw], tuple(x.shape[-2:]), top, left)


def resize(x: torch.Tensor, area: float) -> torch.Tensor:
    """Resize to an ``area`` fraction of the pixels (side ``sqrt(area)``), bilinear with antialiasing."""
    _check_images(x)
    h, w = x.shape[-2:]
    return TF.resize(x, [_side(h, area), _side(w, area)], antialias=True)


def brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return TF.adjust_brightness(x, factor)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    return TF.adjust_contrast(x, factor)


def saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return TF.adjust_saturation(x, factor)


def blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur with a kernel of ``2 * ceil(2 sigma) + 1`` pixels."""
    size = 2 * math.ceil(2 * sigma) + 1
    return TF.gaussian_blur(x, [size, size], [sigma, sigma])


def noise(x: torch.Tensor, std: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Additive Gaussian noise (seeded, so evaluation is repeatable), clamped to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)).clamp(0, 1)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotation about the centre (bilinear, black corners), as torchvision's ``rotate``."""
    return TF.rotate(x, degrees, interpolation=TF.InterpolationMode.BILINEAR)


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def combined(x: torch.Tensor) -> torch.Tensor:
    """Stable Signature's ``comb``: JPEG 80 of brightness 1.5 of a 50 % centre crop."""
    return jpeg(brightness(center_crop(x, 0.5), 1.5), 80)


#: Named image attacks for evaluation (deterministic). Stable Signature's evaluation set plus the issue's list.
IMAGE_ATTACKS: dict[str, Attack] = {
    "none": lambda x: x,
    "jpeg_80": lambda x: jpeg(x, 80),
    "jpeg_50": lambda x: jpeg(x, 50),
    "crop_0.5": lambda x: center_crop(x, 0.5),
    "crop_0.1": lambda x: center_crop(x, 0.1),
    "resize_0.5": lambda x: resize(x, 0.5),
    "resize_0.3": lambda x: resize(x, 0.3),
    "brightness_1.5": lambda x: brightness(x, 1.5),
    "brightness_2.0": lambda x: brightness(x, 2.0),
    "contrast_1.5": lambda x: contrast(x, 1.5),
    "contrast_2.0": lambda x: contrast(x, 2.0),
    "saturation_1.5": lambda x: saturation(x, 1.5),
    "saturation_2.0": lambda x: saturation(x, 2.0),
    "blur_1": lambda x: blur(x, 1.0),
    "noise_0.05": lambda x: noise(x, 0.05),
    "rotate_10": lambda x: rotate(x, 10),
    "hflip": hflip,
    "comb": combined,
}


# ----------------------------------------------------------------------------------------------------- video


def _check_video(v: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor) or v.ndim != 4 or v.shape[1] != 3:
        raise ValueError(f"video attacks take a (T, 3, H, W) tensor in [0, 1], got {getattr(v, 'shape', type(v))}")
    if v.shape[0] < 2:
        raise ValueError(f"a video attack needs at least 2 frames, got {v.shape[0]}")


def frame_drop(v: torch.Tensor, keep_every: int = 2) -> torch.Tensor:
    """Drop frames, keeping one in ``keep_every`` (from the first)."""
    _check_video(v)
    return v[::keep_every]


def frame_swap(v: torch.Tensor) -> torch.Tensor:
    """Swap each pair of consecutive frames (0<->1, 2<->3, ...)."""
    _check_video(v)
    order = torch.arange(v.shape[0])
    pairs = order[: v.shape[0] // 2 * 2].view(-1, 2).flip(1).reshape(-1)
    order[: len(pairs)] = pairs
    return v[order]


def frame_insert(v: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Insert an unwatermarked frame (uniform noise) after every second frame."""
    _check_video(v)
    generator = torch.Generator().manual_seed(seed)
    frames = []
    for t, frame in enumerate(v):
        frames.append(frame)
        if t % 2 == 1:
            frames.append(torch.rand(frame.shape, generator=generator).to(frame))
    return torch.stack(frames)


def temporal_crop(v: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """Keep the first ``fraction`` of the frames (at least one)."""
    _check_video(v)
    return v[: max(1, int(round(v.shape[0] * fraction)))]


def video_compress(v: torch.Tensor, fps: int = 8) -> torch.Tensor:
    """Lossy video compression: MPEG-4 Part 2 (opencv ``mp4v``) through a temporary file, falling back to
    motion-JPEG at quality 50 (per-frame JPEG) where the opencv build has no MPEG-4 encoder."""
    _check_video(v)
    frames = to_uint8(v)
    t, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        if writer.isOpened():
            for frame in frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            writer.release()
            reader = cv2.VideoCapture(path)
            out = []
            while True:
                ok, frame = reader.read()
                if not ok:
                    break
                out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            reader.release()
            if len(out) == t:
                return from_uint8(np.stack(out), v)
    return jpeg(v, 50)


#: Named video attacks (frame-level attacks map frames to frames; image attacks also apply per frame).
VIDEO_ATTACKS: dict[str, Attack] = {
    "none": lambda v: v,
    "frame_drop": frame_drop,
    "frame_swap": frame_swap,
    "frame_insert": frame_insert,
    "temporal_crop": temporal_crop,
    "compress": video_compress,
    "crop_0.5": lambda v: center_crop(v, 0.5),
    "brightness_1.5": lambda v: brightness(v, 1.5),
}


def get_attack(name: str, video: bool = False) -> Attack:
    """The named attack, or a ``ValueError`` listing the known names."""
    table = VIDEO_ATTACKS if video else IMAGE_ATTACKS
    if name not in table:
        raise ValueError(f"unknown {'video ' if video else ''}attack {name!r}; known: {sorted(table)}")
    return table[name]


# ---------------------------------------------------------------------------------------------- training


#: The training augmentations: one is drawn per batch (Stable Signature's ``HiddenAug`` chooses one of a list).
TRAIN_AUGMENTATIONS: tuple[str, ...] = (
    "identity", "crop", "crop_in_place", "resize", "jpeg", "brightness", "contrast", "saturation", "blur", "noise",
    "rotate", "comb",
)

#: The default augmentations of extractor pre-training (``scripts/train_watermark_extractor.py``): every training
#: augmentation, with cropped images put back in place (``crop_in_place``, the input the detector builds for a crop)
#: instead of read at their own size (``crop``), which a position-aware extractor cannot align.
EXTRACTOR_AUGMENTATIONS: tuple[str, ...] = tuple(a for a in TRAIN_AUGMENTATIONS if a != "crop")


def parse_attack_spec(spec: str) -> tuple[list[str], list[float]]:
    """A command-line list of training attacks, ``"identity,brightness:4"`` -> ``(["identity", "brightness"],
    [1.0, 4.0])``: the names and weights a :class:`RandomAttack` draws them with (``NAME`` alone weighs 1)."""
    names, weights = [], []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, weight = item.partition(":")
        if name not in TRAIN_AUGMENTATIONS:
            raise ValueError(f"unknown attack {name!r}; known: {','.join(TRAIN_AUGMENTATIONS)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"the weight of {name!r} is not a number: {weight!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"the weight of {name!r} must be a positive number, got {weight!r}")
        names.append(name)
        weights.append(value)
    return names, weights


def format_attack_spec(names: Sequence[str], weights: Sequence[float] | None = None) -> str:
    """The inverse of :func:`parse_attack_spec`: ``NAME`` or ``NAME:WEIGHT`` (weight 1 is left out; missing
    weights count as 1), or ``"none"`` for no attack."""
    weights = list(weights or []) + [1.0] * (len(names) - len(weights or []))
    return ",".join(n if w == 1 else f"{n}:{w:g}" for n, w in zip(names, weights)) or "none"


class RandomAttack(nn.Module):
    """Applies one randomly drawn differentiable attack to a batch (all gradients flow, JPEG straight-through).

    Strengths are drawn from ranges that cover the evaluation attacks: crop and resize keep 10-100 % / 25-100 %
    of the area, ``crop_in_place`` 40-100 % (:func:`crop_in_place`), JPEG quality 40-95,
    brightness/contrast/saturation factors 0.5-2, blur sigma 0.3-1.2, noise std up to 0.06, rotation up to 15
    degrees. ``comb`` chains crop, brightness and JPEG.
    """

    def __init__(self, augmentations: Sequence[str] = TRAIN_AUGMENTATIONS, weights: Sequence[float] | None = None):
        super().__init__()
        unknown = sorted(set(augmentations) - set(TRAIN_AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; known: {list(TRAIN_AUGMENTATIONS)}")
        self.augmentations = list(augmentations)
        weights = [1.0] * len(self.augmentations) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.augmentations) or not all(w >= 0 and math.isfinite(w) for w in weights) \
                or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(self.augmentations)} non-negative numbers, not all zero; got {weights}")
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        choice = self.augmentations[int(torch.multinomial(self.weights, 1, generator=generator))]
        return self.apply(choice, x, generator)

    def apply(self, choice: str, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        if choice == "identity":
            return x
        if choice == "crop":
            return random_crop(x, u(0.1, 1.0), generator)
        if choice == "crop_in_place":
            return crop_in_place(x, u(0.4, 1.0), generator)
        if choice == "resize":
            h, w = x.shape[-2:]
            side = math.sqrt(u(0.25, 1.0))
            return F.interpolate(x, size=(max(1, round(h * side)), max(1, round(w * side))), mode="bilinear",
                                 align_corners=False, antialias=True)
        if choice == "jpeg":
            return jpeg_straight_through(x, int(u(40, 95)))
        if choice == "brightness":
            return (x * u(0.5, 2.0)).clamp(0, 1)
        if choice == "contrast":
            return contrast(x, u(0.5, 2.0))
        if choice == "saturation":
            return saturation(x, u(0.5, 2.0))
        if choice == "blur":
            return blur(x, u(0.3, 1.2))
        if choice == "noise":
            return (x + u(0.0, 0.06) * torch.randn(x.shape, generator=generator).to(x)).clamp(0, 1)
        if choice == "rotate":
            return rotate(x, u(-15, 15))
        if choice == "comb":
            return jpeg_straight_through((random_crop(x, u(0.3, 0.7), generator) * u(1.0, 1.7)).clamp(0, 1), 80)
        raise ValueError(f"unknown augmentation {choice!r}")
