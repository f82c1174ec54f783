"""Datasets for ViT classification, semantic segmentation and detection: shapes-world scenes and user folders.

Every dataset returns ``(image, target)`` with ``image`` a float ``(3, size, size)`` tensor in [0, 1]; images are
resized to ``size x size`` (aspect ratio not kept: a timm ViT takes a fixed size), masks with nearest
neighbour, boxes scaled with the image. Targets: ``classify`` an int64 label; ``segment`` an int64
``(size, size)`` mask of class ids (``ignore_index`` pixels are left out of the loss and metric); ``detect`` a
dict with ``boxes`` (float ``(N, 4)`` pixel xyxy) and ``labels`` (int64 ``(N,)``, 1-based; 0 is background),
as torchvision's detectors take them.

User layouts: classification = torchvision ``ImageFolder`` (``root/<class>/<image>``); segmentation =
``root/images/<stem>.<ext>`` with ``root/masks/<stem>.png`` holding class ids as pixel values; detection = a
COCO json (``images``, ``annotations`` with ``bbox`` ``[x, y, w, h]``, ``categories``) and its image folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .shapes import COLORS, SHAPES, sample_scene

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Shapes-world classification labels: one shape per image, class = (shape, colour) in the shipped tiny ViT's
#: ``label_names`` order ("red circle", "orange circle", ..., "purple star").
SHAPE_PAIR_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)
#: Shapes-world segmentation classes (mask ids) and detection labels (1-based).
SEGMENT_NAMES: tuple[str, ...] = ("background",) + SHAPES


def _to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt / foreign files
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    return size


class ShapesTaskDataset(Dataset):
    """Shapes-world scenes for one task; item ``i`` is ``sample_scene(default_rng([seed, i]), size, ...)``.

    ``classify``: one shape per image, label = index in :data:`SHAPE_PAIR_NAMES` (24 classes). ``segment``:
    1-3 shapes, mask ids in :data:`SEGMENT_NAMES` (5 classes). ``detect``: 1-3 shapes, labels 1..4.
    All (shape, colour) pairs are drawn; train and test differ by seed.
    """

    def __init__(self, task: str, num_samples: int, seed: int = 0, size: int = 64, style: str = "plain"):
        if task not in ("classify", "segment", "detect"):
            raise ValueError(f"unknown task {task!r}; expected classify, segment or detect")
        self.task, self.num_samples, self.seed, self.size, self.style = task, num_samples, seed, _check_size(size), style

    @property
    def class_names(self) -> tuple[str, ...]:
        return {"classify": SHAPE_PAIR_NAMES, "segment": SEGMENT_NAMES, "detect": SEGMENT_NAMES[1:]}[self.task]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        shapes = 1 if self.task == "classify" else (1, 3)
        scene = sample_scene(rng, self.size, shapes, self.style, exclude=None)
        image = _to_tensor(scene.image)
        if self.task == "classify":
            spec = scene.specs[0]
            return image, torch.tensor(SHAPE_PAIR_NAMES.index(f"{spec.color} {spec.shape}"))
        if self.task == "segment":
            return image, torch.from_numpy(scene.mask)
        return image, {"boxes": torch.from_numpy(scene.boxes), "labels": torch.from_numpy(scene.labels)}


class ClassificationFolder(Dataset):
    """torchvision ``ImageFolder`` layout (``root/<class name>/<image>``), images resized to ``size``."""

    def __init__(self, root: str | os.PathLike, size: int):
        from torchvision.datasets import ImageFolder

        self.root, self.size = Path(root), _check_size(size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"classification folder {self.root} does not exist or is not a directory")
        try:
            self.folder = ImageFolder(str(self.root))
        except (FileNotFoundError, RuntimeError) as err:  # no class folders / no images
            raise ValueError(f"{self.root} is not an ImageFolder layout (root/<class>/<image>): {err}") from err
        self.class_names = tuple(self.folder.classes)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int):
        path, label = self.folder.samples[index]
        image = _open_rgb(Path(path)).resize((self.size, self.size), Image.Resampling.BICUBIC)
        return _to_tensor(image), torch.tensor(label)


class SegmentationFolder(Dataset):
    """``root/images/<stem>.<ext>`` + ``root/masks/<stem>.png`` (class ids as pixel values, 0 = background).

    Ids must be below ``num_classes`` or equal ``ignore_index``; any other id is an error naming the file.
    """

    def __init__(self, root: str | os.PathLike, size: int, num_classes: int, ignore_index: int = 255):
        self.root, self.size = Path(root), _check_size(size)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        images, masks = self.root / "images", self.root / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise FileNotFoundError(f"{self.root} must hold an images/ and a masks/ folder")
        self.pairs = []
        missing = []
        for path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            mask = masks / f"{path.stem}.png"
            (self.pairs.append((path, mask)) if mask.is_file() else missing.append(path.name))
        if missing:
            raise ValueError(f"{len(missing)} image(s) in {images} have no mask masks/<stem>.png: {missing[:5]}")
        if not self.pairs:
            raise ValueError(f"no images found in {images} (suffixes {IMAGE_SUFFIXES})")
        self.class_names = tuple(str(i) for i in range(num_classes))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        image = _open_rgb(image_path).resize((self.size, self.size), Image.Resampling.BICUBIC)
        with Image.open(mask_path) as mask_image:
            if mask_image.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"mask {mask_path} must be a single-channel PNG of class ids, got mode {mask_image.mode}")
            mask = np.asarray(mask_image.resize((self.size, self.size), Image.Resampling.NEAREST)).astype(np.int64)
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != self.ignore_index)])
        if bad.size:
            raise ValueError(
                f"mask {mask_path} has class id(s) {bad.tolist()[:10]} outside 0..{self.num_classes - 1} "
                f"(ignore id {self.ignore_index}); pass the right num_classes or fix the mask"
            )
        return _to_tensor(image), torch.from_numpy(mask)


class CocoDetection(Dataset):
    """A COCO detection json (``images``, ``annotations`` with ``bbox = [x, y, w, h]``, ``categories``) and its
    image folder. Category ids map to labels 1..K in sorted id order; ``iscrowd`` annotations are skipped."""

    def __init__(self, image_root: str | os.PathLike, annotation_file: str | os.PathLike, size: int):
        self.image_root, self.size = Path(image_root), _check_size(size)
        path = Path(annotation_file)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file {path} not found")
        text = path.read_text()
        if not text.strip():
            raise ValueError(f"COCO annotation file {path} is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"COCO annotation file {path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise ValueError(f"{path} is not a COCO detection file: it needs lists 'images', 'annotations', 'categories'")
        if not data["images"] or not data["categories"]:
            raise ValueError(f"COCO annotation file {path} has no images or no categories")
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        self.label_of = {cid: i + 1 for i, cid in enumerate(cat_ids)}
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        self.class_names = tuple(names[c] for c in cat_ids)
        self.num_classes = len(cat_ids)
        self.images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
        self.boxes: dict[int, list[tuple[list[float], int]]] = {i: [] for i, _ in self.images}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
            if image_id not in self.boxes:
                raise ValueError(f"{path}: annotation {ann.get('id')} refers to unknown image id {image_id}")
            if cat not in self.label_of:
                raise ValueError(f"{path}: annotation {ann.get('id')} has unknown category id {cat}")
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w > 0 and h > 0:
                self.boxes[image_id].append(([x, y, x + w, y + h], self.label_of[cat]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image_id, file_name = self.images[index]
        image = _open_rgb(self.image_root / file_name)
        sx, sy = self.size / image.width, self.size / image.height
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        anns = self.boxes[image_id]
        boxes = torch.tensor([b for b, _ in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        labels = torch.tensor([label for _, label in anns], dtype=torch.int64)
        return _to_tensor(image), {"boxes": boxes, "labels": labels}


def dense_collate(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    """Stack images; stack tensor targets (labels, masks), keep detection target dicts as a list."""
    images = torch.stack([b[0] for b in batch])
    targets = [b[1] for b in batch]
    if isinstance(targets[0], torch.Tensor):
        return images, torch.stack(targets)
    return images, targets


def write_coco(path: str | os.PathLike, dataset: Dataset, image_dir: str | os.PathLike, class_names: list[str]) -> Path:
    """Export a detection dataset (e.g. :class:`ShapesTaskDataset` ``detect``) as PNGs + a COCO json (atomic)."""
    from ..core.serialization import atomic_write

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        name = f"{i:06d}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(image_dir / name)
        images.append({"id": i, "file_name": name, "width": image.shape[-1], "height": image.shape[-2]})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    text = json.dumps(data)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return Path(path)
