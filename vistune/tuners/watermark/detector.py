"""Watermark keys and detection: matched bits, the binomial-tail p-value under "not watermarked", a decision at a
chosen false-positive rate, for images and (bits aggregated over frames) videos.

Under the null hypothesis (an image not made by the watermarked decoder) a whitened extractor's bits are fair,
independent coins, so the number of bits matching a ``k``-bit key is Binomial(k, 1/2): the p-value of ``m``
matches is ``P[X >= m]`` (48 bits, 41 matches: 3.1e-7) and the decision threshold at a false-positive rate
``fpr`` is the smallest ``m`` with ``P[X >= m] <= fpr`` (48 bits, fpr 1e-6: 41).

Crops: a position-aware extractor (``head="flatten"``) reads an image smaller than the generator's output size
twice, as it is (a resized image) and as the centre crop of an output-size image (put back in the middle of a grey
canvas, :func:`~vistune.tuners.watermark.attacks.place_on_canvas`), and keeps the reading with more matches. Two
readings are two tests, so the p-value is Bonferroni-corrected (``min(1, 2 P[X >= m])``) and the threshold is the
one at ``fpr / 2`` (48 bits, fpr 1e-6: still 41).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...core.serialization import atomic_write
from ...metrics import binomial_p_value
from .attacks import place_on_canvas
from .hidden import HiddenExtractor, check_images, load_extractor

KEY_FORMAT = "vistune-watermark-key"


def match_threshold(num_bits: int, fpr: float) -> int:
    """The fewest matched bits whose binomial tail ``P[X >= m]`` is at most ``fpr`` (``num_bits + 1`` if none is)."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    tail = 0.0
    for m in range(num_bits, -1, -1):
        tail += math.comb(num_bits, m) / 2**num_bits
        if tail > fpr:
            return m + 1
    return 0


@dataclasses.dataclass(frozen=True)
class WatermarkKey:
    """A ``k``-bit watermark message (Stable Signature draws one per watermarked decoder)."""

    bits: tuple[int, ...]

    def __post_init__(self) -> None:
        bits = tuple(int(b) for b in self.bits)
        if not bits or any(b not in (0, 1) for b in bits):
            raise ValueError("a watermark key is a non-empty sequence of 0/1 bits")
        object.__setattr__(self, "bits", bits)

    @property
    def num_bits(self) -> int:
        return len(self.bits)

    @classmethod
    def random(cls, num_bits: int = 48, seed: int | None = None) -> "WatermarkKey":
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return cls(tuple(torch.randint(0, 2, (num_bits,), generator=generator).tolist()))

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.bits, dtype=torch.float32, device=device)

    def to_string(self) -> str:
        return "".join(map(str, self.bits))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the key as JSON (atomically): ``{"format", "num_bits", "bits": "0110..."}``."""
        path = Path(path)
        text = json.dumps({"format": KEY_FORMAT, "num_bits": self.num_bits, "bits": self.to_string()}, indent=2) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, num_bits: int | None = None) -> "WatermarkKey":
        """Read a key file; a ``ValueError`` if it is malformed or (with ``num_bits``) has another bit length."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"key file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"key file {path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or not isinstance(data.get("bits"), str) or set(data["bits"]) - {"0", "1"}:
            raise ValueError(f"key file {path} must hold {{\"bits\": \"0101...\"}} (a string of 0/1)")
        key = cls(tuple(int(c) for c in data["bits"]))
        if data.get("num_bits", key.num_bits) != key.num_bits:
            raise ValueError(f"key file {path}: num_bits {data['num_bits']} but {key.num_bits} bits given")
        if num_bits is not None and key.num_bits != num_bits:
            raise ValueError(f"key file {path} holds a {key.num_bits}-bit key but the extractor reads {num_bits} bits")
        return key


@dataclasses.dataclass
class Detection:
    """The result for one image (or one video): decoded bits, matches with the key, p-value, decision."""

    bits: tuple[int, ...]
    matches: int
    num_bits: int
    p_value: float
    threshold: int
    detected: bool
    readings: int = 1

    @property
    def bit_accuracy(self) -> float:
        return self.matches / self.num_bits

    def to_dict(self) -> dict[str, Any]:
        return {"matches": self.matches, "num_bits": self.num_bits, "bit_accuracy": self.bit_accuracy,
                "p_value": self.p_value, "threshold": self.threshold, "detected": self.detected,
                "readings": self.readings, "bits": "".join(map(str, self.bits))}


class WatermarkDetector:
    """Reads the key's bits with the (whitened) extractor and decides at false-positive rate ``fpr``.

    Args:
        key: the :class:`WatermarkKey` (its length must equal the extractor's bit count).
        extractor: a :class:`HiddenExtractor` or a folder; default the shipped ``assets/watermark-extractor``.
        fpr: false-positive rate of the decision (default 1e-6, as Stable Signature's evaluation).
        output_size: side of the watermarked generator's images (default: the extractor's ``input_size``, 32 for
            the shipped tiny SD). With a ``flatten`` extractor, smaller images are also read as a centre crop of
            an image of this size (see the module docstring); ``0`` turns that second reading off.
    """

    def __init__(self, key: WatermarkKey, extractor: HiddenExtractor | str | os.PathLike | None = None,
                 fpr: float = 1e-6, device: str | torch.device = "cpu", output_size: int | None = None):
        if not isinstance(extractor, HiddenExtractor):
            extractor = load_extractor(extractor, device)
        if key.num_bits != extractor.num_bits:
            raise ValueError(f"the key has {key.num_bits} bits but the extractor reads {extractor.num_bits}")
        if output_size is not None and (isinstance(output_size, bool) or not isinstance(output_size, int)
                                        or output_size < 0):
            raise ValueError(f"output_size must be a non-negative int, got {output_size!r}")
        self.key, self.extractor, self.fpr = key, extractor.eval(), fpr
        self.output_size = extractor.config.input_size if output_size is None else output_size
        self.threshold = match_threshold(key.num_bits, fpr)
        self.device = next(extractor.parameters()).device

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The extractor's (whitened) logits of the images as they are."""
        images = check_images(images, self.extractor.config.min_size)
        return torch.cat([self.extractor(images[i:i + batch_size].to(self.device)).cpu()
                          for i in range(0, len(images), batch_size)])

    def readings(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The inputs the extractor reads for a batch of one size: the images, and for a ``flatten`` extractor
        and images smaller than ``output_size`` (larger on neither side), also the images as the centre crop of
        an ``output_size`` image on a grey canvas, scaled to the extractor's input size."""
        images = check_images(images, self.extractor.config.min_size)
        config, n = self.extractor.config, self.output_size
        h, w = images.shape[-2:]
        if config.head != "flatten" or not n or h > n or w > n or (h, w) == (n, n):
            return [images]
        side, crop = config.input_size, images
        if side != n:
            size = (max(1, round(h * side / n)), max(1, round(w * side / n)))
            crop = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                                   antialias=True)
        top, left = round((side - crop.shape[-2]) / 2), round((side - crop.shape[-1]) / 2)
        return [images, place_on_canvas(crop, (side, side), top, left)]

    def _result(self, bits: torch.Tensor, readings: int = 1) -> Detection:
        matches = int((bits == self.key.tensor()).sum())
        threshold = self.threshold if readings == 1 else match_threshold(self.key.num_bits, self.fpr / readings)
        p_value = min(1.0, readings * binomial_p_value(matches, self.key.num_bits))
        return Detection(tuple(int(b) for b in bits.tolist()), matches, self.key.num_bits, p_value, threshold,
                         matches >= threshold, readings)

    def _best(self, bits: list[torch.Tensor]) -> torch.Tensor:
        """Per row, the reading (``bits[r]``, each ``(B, k)``) with the most matches (the first on ties)."""
        stacked = torch.stack(bits)
        matches = (stacked == self.key.tensor()).sum(-1)
        return stacked[matches.argmax(0), torch.arange(stacked.shape[1])]

    def detect(self, images: torch.Tensor) -> list[Detection]:
        """One :class:`Detection` per image of a ``(B, 3, H, W)`` batch in [0, 1]."""
        views = self.readings(images)
        bits = self._best([(self.logits(v) > 0).float() for v in views])
        return [self._result(row, len(views)) for row in bits]

    def detect_video(self, frames: torch.Tensor) -> Detection:
        """One decision for a ``(T, 3, H, W)`` video: per-frame bits combined by majority vote (VidSig's
        ``attack.py``), ties broken by the mean logit, for each reading of :meth:`readings`. A video needs at
        least 2 frames (use :meth:`detect` for a single image)."""
        frames = check_images(frames, self.extractor.config.min_size)
        if frames.shape[0] < 2:
            raise ValueError(f"a video needs at least 2 frames, got {frames.shape[0]}; use detect() for one image")
        views = self.readings(frames)
        votes = []
        for view in views:
            logits = self.logits(view)
            vote = (logits > 0).float().mean(0)
            votes.append(torch.where(vote == 0.5, (logits.mean(0) > 0).float(), (vote > 0.5).float()))
        return self._result(self._best([v[None] for v in votes])[0], len(views))


# ---------------------------------------------------------------------------------------------- files


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a ``(3, H, W)`` float tensor in [0, 1].

    RGB images load as they are; an RGBA image whose alpha is fully opaque loads as its RGB. Grayscale images and
    RGBA images with transparency raise a ``ValueError``: the watermark lives in the colours of an RGB image, and a
    conversion would be read as "not watermarked" instead of failing.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except Exception as err:
        raise ValueError(f"{path} is not a readable image: {err}") from err
    if image.mode in ("L", "LA", "1", "I", "I;16", "F"):
        raise ValueError(f"{path} is a grayscale image ({image.mode}); watermarks are read from RGB images")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"))
        if (rgba[..., 3] != 255).any():
            raise ValueError(f"{path} has transparent pixels (alpha); flatten it onto a background first")
        array = rgba[..., :3]
    else:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def detect_files(detector: WatermarkDetector, paths: Sequence[str | os.PathLike]) -> list[Detection]:
    """Detect in each image file (images of different sizes are read one by one)."""
    return [detector.detect(load_image(p)[None])[0] for p in paths]
