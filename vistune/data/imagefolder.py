"""Captioned image folders in the Hugging Face ``imagefolder`` layout: images plus ``metadata.jsonl``.

    root/                       (or any sub-folder of it)
      metadata.jsonl            {"file_name": "0001.png", "text": "a red circle on a white background"}
      0001.png ...

This is what :func:`vistune.data.export_imagefolder` writes and what ``datasets.load_dataset("imagefolder")``
reads; ``datasets`` is not needed. Every ``metadata.jsonl`` under ``root`` is read; its ``file_name`` entries
are relative to its own folder. Bad input is handled up front, when the dataset is built, so a training run
never meets it halfway:

* no readable image at all: ``ValueError`` naming the folder;
* images without a caption (not listed in any ``metadata.jsonl``, or with a missing/null ``text``): one warning
  with the count; they get the empty caption (``missing_captions="empty"``, unconditional training examples,
  like caption dropout) or are left out (``"skip"``), or raise (``"error"``);
* unreadable images (corrupt, truncated, not an image, listed but absent): decoded once at build time,
  skipped with one warning and the count, listed in :attr:`CaptionedImageFolder.unreadable`;
* other files a row names in a ``*file_name`` column (e.g. ``mask_file_name``) are not training images.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "metadata.jsonl"
MISSING_CAPTION_POLICIES = ("empty", "skip", "error")


def _read_metadata(path: Path, image_column: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict) or not isinstance(row.get(image_column), str):
            raise ValueError(f"{path}, line {number}: expected a JSON object with a {image_column!r} string")
        rows.append(row)
    return rows


def _readable(path: Path) -> str | None:
    """``None`` when ``path`` decodes as an image, else why not."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "file not found"
    except Exception as err:  # PIL raises many types for corrupt / truncated / foreign files
        return f"{type(err).__name__}: {err}"
    return None


def load_rgb(path: str | os.PathLike, resolution: int | None = None) -> Image.Image:
    """The image at ``path`` as RGB (EXIF orientation applied), shorter side resized to ``resolution`` and
    centre-cropped to a square when ``resolution`` is given."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    if resolution is None:
        return image
    width, height = image.size
    if min(width, height) != resolution:
        scale = resolution / min(width, height)
        width, height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


class CaptionedImageFolder(Dataset):
    """Images and captions from an ``imagefolder`` directory; item ``i`` is
    ``{"pixel_values": 3 x R x R float in [0, 1], "caption": str}`` (square, centre crop), like
    :class:`vistune.data.ShapesDataset`.

    Args:
        root: the folder holding the images and ``metadata.jsonl`` file(s).
        resolution: output side ``R`` in pixels.
        image_column / caption_column: metadata keys of the file name and the caption.
        missing_captions: ``"empty"``, ``"skip"`` or ``"error"`` for images that have no caption.

    Attributes:
        files, captions: the usable examples, sorted by path (the order does not depend on the file system).
        unreadable: ``(path, reason)`` of every image left out because it could not be read.
        num_missing_captions: how many images had no caption (before the policy was applied).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        image_column: str = "file_name",
        caption_column: str = "text",
        missing_captions: str = "empty",
    ) -> None:
        if missing_captions not in MISSING_CAPTION_POLICIES:
            raise ValueError(f"missing_captions must be one of {MISSING_CAPTION_POLICIES}, got {missing_captions!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.root = Path(root)
        self.resolution = resolution
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")

        captions: dict[Path, str | None] = {}
        listed_elsewhere: set[Path] = set()
        duplicates = 0
        for metadata in sorted(self.root.rglob(METADATA_NAME)):
            for row in _read_metadata(metadata, image_column):
                path = (metadata.parent / row[image_column]).resolve()
                text = row.get(caption_column)
                if path in captions:
                    duplicates += 1
                    continue
                captions[path] = None if text is None else str(text)
                listed_elsewhere.update(
                    (metadata.parent / value).resolve()
                    for key, value in row.items()
                    if key != image_column and key.endswith("file_name") and isinstance(value, str)
                )
        on_disk = {
            p.resolve() for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        }
        candidates = sorted((set(captions) | on_disk) - (listed_elsewhere - set(captions)))
        if duplicates:
            warnings.warn(f"{self.root}: {duplicates} metadata rows name an image already listed; kept the first")

        self.unreadable: list[tuple[Path, str]] = []
        self.files: list[Path] = []
        self.captions: list[str] = []
        missing: list[Path] = []
        for path in candidates:
            reason = _readable(path)
            if reason is not None:
                self.unreadable.append((path, reason))
                continue
            caption = captions.get(path)
            if caption is None:
                missing.append(path)
                if missing_captions == "skip":
                    continue
                caption = ""
            self.files.append(path)
            self.captions.append(caption)
        self.num_missing_captions = len(missing)

        if self.unreadable:
            shown = ", ".join(f"{p.name} ({why})" for p, why in self.unreadable[:3])
            warnings.warn(
                f"{self.root}: skipped {len(self.unreadable)} unreadable image(s): {shown}"
                + (" ..." if len(self.unreadable) > 3 else "")
            )
        if missing:
            if missing_captions == "error":
                raise ValueError(
                    f"{self.root}: {len(missing)} image(s) have no {caption_column!r} caption in {METADATA_NAME} "
                    f"(first: {missing[0].name})"
                )
            action = "left out" if missing_captions == "skip" else "trained with the empty caption"
            warnings.warn(
                f"{self.root}: {len(missing)} of {len(candidates) - len(self.unreadable)} readable image(s) have no "
                f"{caption_column!r} caption in {METADATA_NAME}; {action}"
            )
        if not self.files:
            found = f"{len(candidates)} candidate image file(s), none usable" if candidates else "no image files"
            raise ValueError(
                f"{self.root} holds no usable training image: {found} (extensions {sorted(IMAGE_EXTENSIONS)}, "
                f"captions from {METADATA_NAME} with {image_column!r} and {caption_column!r} columns)"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = np.asarray(load_rgb(self.files[index], self.resolution), dtype=np.float32) / 255.0
        return {"pixel_values": torch.from_numpy(image).permute(2, 0, 1).contiguous(), "caption": self.captions[index]}
