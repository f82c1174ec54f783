"""A VTAB-1k-style classification suite drawn from the shapes world, and user image folders in the same protocol.

VTAB-1k gives every task 800 training and 200 validation images and a held-out test set, and groups tasks into
*natural*, *specialised* and *structured* kinds. Here each task is a pure function of ``(task, seed)``: the same
seed always yields the same images and labels, split by split, and the three splits never share a scene.

=============  ============  =======  ======================================================================
task           kind          classes  what decides the label
=============  ============  =======  ======================================================================
shape          natural       4        the shape of one object (any colour, background, plain/striped/noise)
color          natural       6        the colour of one object (any shape, background, style but pastel)
style          specialised   5        the rendering style of the scene (plain, striped, outline, pastel, noise)
small_shape    specialised   4        the shape of one small object in the noise style
count          structured    4        how many objects (1-4, all of the same size range)
position       structured    4        the image quadrant of one small object's centre
size           structured    3        the circumradius band of one object (small / medium / large)
orientation    structured    4        a triangle's rotation modulo its 120-degree symmetry, in 30-degree bins
=============  ============  =======  ======================================================================

Images are float ``(N, 3, S, S)`` tensors in ``[0, 1]``; labels are int64. :func:`load_imagefolder_task` reads
a user's ``root/<class>/*.png`` folder (or ``root/train``, ``root/val``, ``root/test`` of such folders) into the
same :class:`ClassificationTask`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .shapes import BACKGROUNDS, COLORS, SHAPES, STYLES, ShapeSpec, render_scene, sample_scene

KINDS = ("natural", "specialised", "structured")
SPLITS = ("train", "val", "test")
TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 800, 200, 500


@dataclasses.dataclass
class ClassificationTask:
    """One task: images in ``[0, 1]`` and int64 labels per split, class names and the task's kind."""

    name: str
    kind: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``"train"``, ``"val"``, ``"test"`` or ``"trainval"`` (train + val, VTAB's
        final-run training set)."""
        if name == "trainval":
            return torch.cat([self.train_x, self.val_x]), torch.cat([self.train_y, self.val_y])
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS + ('trainval',)}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


# --------------------------------------------------------------------------- scene makers, one per task
# maker(rng, label, size) -> HxWx3 uint8 image whose ground truth is ``label``


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _one_shape(
    rng: np.random.Generator,
    size: int,
    *,
    shape: str | None = None,
    color: str | None = None,
    radius: tuple[float, float] = (0.22, 0.33),
    center_box: tuple[float, float, float, float] | None = None,
    rotation: float | None = None,
    style: str = "plain",
) -> np.ndarray:
    """One fully visible shape; ``center_box`` = (x0, y0, x1, y1) fractions the centre is drawn from."""
    r = float(rng.uniform(*radius)) * size
    shape = shape or _pick(rng, SHAPES)
    color = color or _pick(rng, COLORS)
    x0, y0, x1, y1 = center_box or (0.0, 0.0, 1.0, 1.0)
    lo, hi = r, size - 1 - r  # keep the whole circumdisk inside the image
    cx = float(rng.uniform(max(lo, x0 * size), min(hi, x1 * size)))
    cy = float(rng.uniform(max(lo, y0 * size), min(hi, y1 * size)))
    rot = float(rng.uniform(0, 360)) if rotation is None else rotation
    spec = ShapeSpec(shape, color, (cx, cy), r, rot)
    return render_scene([spec], _pick(rng, BACKGROUNDS), size, style, int(rng.integers(2**31))).image


def _shape(rng, label, size):
    return _one_shape(rng, size, shape=SHAPES[label], style=_pick(rng, ("plain", "striped", "noise")))


def _color(rng, label, size):
    return _one_shape(rng, size, color=list(COLORS)[label], style=_pick(rng, ("plain", "striped", "outline", "noise")))


def _style(rng, label, size):
    return sample_scene(rng, size, (1, 3), STYLES[label], exclude=None).image


def _small_shape(rng, label, size):
    return _one_shape(rng, size, shape=SHAPES[label], radius=(0.1, 0.14), style="noise")


def _count(rng, label, size):
    return sample_scene(rng, size, label + 1, _pick(rng, ("plain", "striped")), exclude=None,
                        radius_range=(0.11, 0.15), max_occlusion=0.0).image


_QUADRANTS = ((0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0))


def _position(rng, label, size):
    x0, y0, x1, y1 = _QUADRANTS[label]
    margin = 0.04  # keep centres clear of the quadrant borders so the label is unambiguous
    return _one_shape(rng, size, radius=(0.1, 0.14), center_box=(x0 + margin, y0 + margin, x1 - margin, y1 - margin))


_SIZE_BANDS = ((0.10, 0.14), (0.18, 0.22), (0.27, 0.32))


def _size(rng, label, size):
    return _one_shape(rng, size, radius=_SIZE_BANDS[label])


def _orientation(rng, label, size):
    rotation = 30.0 * label + float(rng.uniform(-10, 10))  # 4 bins of 30 degrees, 10-degree gaps between them
    return _one_shape(rng, size, shape="triangle", radius=(0.25, 0.33), rotation=rotation)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How one shapes-world task is made: its kind, class names and scene maker."""

    kind: str
    classes: tuple[str, ...]
    maker: Callable[[np.random.Generator, int, int], np.ndarray]


TASKS: dict[str, TaskSpec] = {
    "shape": TaskSpec("natural", SHAPES, _shape),
    "color": TaskSpec("natural", tuple(COLORS), _color),
    "style": TaskSpec("specialised", STYLES, _style),
    "small_shape": TaskSpec("specialised", SHAPES, _small_shape),
    "count": TaskSpec("structured", ("1", "2", "3", "4"), _count),
    "position": TaskSpec("structured", ("top-left", "top-right", "bottom-left", "bottom-right"), _position),
    "size": TaskSpec("structured", ("small", "medium", "large"), _size),
    "orientation": TaskSpec("structured", ("0", "30", "60", "90"), _orientation),
}


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _render_split(task: str, spec: TaskSpec, seed: int, split: int, count: int, size: int):
    labels = np.random.default_rng([seed, _task_id(task), split, 0]).permutation(
        np.arange(count) % len(spec.classes)
    )  # balanced classes, shuffled
    images = np.empty((count, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        images[i] = spec.maker(np.random.default_rng([seed, _task_id(task), split, i + 1]), int(label), size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def _task_id(task: str) -> int:
    return list(TASKS).index(task)


def make_shapes_task(
    name: str,
    seed: int = 0,
    *,
    train_size: int = TRAIN_SIZE,
    val_size: int = VAL_SIZE,
    test_size: int = TEST_SIZE,
    image_size: int = 64,
) -> ClassificationTask:
    """Build shapes-world task ``name`` (see the module table); deterministic in ``(name, seed)``.

    Each split has balanced classes in shuffled order; scenes come from independent seeded generators, so
    ``train_size`` changes neither the validation nor the test images.
    """
    if name not in TASKS:
        raise ValueError(f"unknown shapes task {name!r}; expected one of {list(TASKS)}")
    _check_count("seed", seed, 0)
    _check_count("image_size", image_size, 16)
    spec = TASKS[name]
    parts = {}
    for split_id, (split, count) in enumerate(zip(SPLITS, (train_size, val_size, test_size))):
        _check_count(f"{split}_size", count)
        parts[f"{split}_x"], parts[f"{split}_y"] = _render_split(name, spec, seed, split_id, count, image_size)
    return ClassificationTask(name=name, kind=spec.kind, classes=list(spec.classes), **parts)


# --------------------------------------------------------------------------- user image folders


def _folder_images(root: Path, image_size: int, classes: list[str] | None = None):
    from torchvision.datasets import ImageFolder

    from .imagefolder import load_rgb

    try:
        folder = ImageFolder(str(root), loader=lambda path: load_rgb(path, image_size))
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"{root} is not an image-folder task (root/<class>/<image>): {err}") from None
    if classes is not None and folder.classes != classes:
        raise ValueError(f"{root} has classes {folder.classes}, but the training split has {classes}")
    if len(folder.classes) < 2:
        raise ValueError(f"{root} has {len(folder.classes)} class folder(s); a classification task needs >= 2")
    images, labels = [], []
    for path, label in folder.samples:
        try:
            image = folder.loader(path)
        except Exception as err:  # PIL raises many types for corrupt files
            raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
        images.append(torch.from_numpy(np.asarray(image, np.uint8).copy()).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(images).float().div_(255.0), torch.tensor(labels, dtype=torch.int64), folder.classes


def load_imagefolder_task(
    root: str | Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    train_size: int = TRAIN_SIZE,
    val_size: int = VAL_SIZE,
    name: str | None = None,
    kind: str = "natural",
) -> ClassificationTask:
    """A user's task in the same protocol, from a torchvision ``ImageFolder`` layout.

    ``root/train/<class>/*``, ``root/val/<class>/*`` (optional) and ``root/test/<class>/*`` are used as given;
    a plain ``root/<class>/*`` folder is shuffled with ``seed`` and split into ``train_size`` + ``val_size``
    images and a test set of the rest. Images are RGB, shorter side resized to ``image_size`` and
    centre-cropped. Missing folders, fewer than two classes, unreadable images or too few images for the
    split raise :class:`ValueError`.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image-folder task {root} does not exist or is not a folder")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _check_count("image_size", image_size, 8)
    name = name or root.name
    if (root / "train").is_dir():
        if not (root / "test").is_dir():
            raise ValueError(f"{root} has a train/ folder but no test/ folder")
        train_x, train_y, classes = _folder_images(root / "train", image_size)
        test_x, test_y, _ = _folder_images(root / "test", image_size, classes)
        if (root / "val").is_dir():
            val_x, val_y, _ = _folder_images(root / "val", image_size, classes)
        else:
            val_x, val_y = train_x[:0], train_y[:0]
        return ClassificationTask(name, kind, classes, train_x, train_y, val_x, val_y, test_x, test_y)
    _check_count("train_size", train_size)
    _check_count("val_size", val_size, 0)
    x, y, classes = _folder_images(root, image_size)
    if len(y) <= train_size + val_size:
        raise ValueError(
            f"{root} has {len(y)} images; a split of {train_size} train + {val_size} val needs more so that a "
            "test set remains (lower train_size/val_size, or give train/ and test/ folders)"
        )
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    cut = train_size + val_size
    return ClassificationTask(
        name, kind, classes, x[:train_size], y[:train_size], x[train_size:cut], y[train_size:cut], x[cut:], y[cut:]
    )


def task_summary(task: ClassificationTask) -> dict:
    """Name, kind, classes and split sizes (for benchmark metadata)."""
    return {
        "name": task.name,
        "kind": task.kind,
        "num_classes": task.num_classes,
        **{f"{s}_size": int(task.split(s)[1].numel()) for s in SPLITS},
    }


__all__ = [
    "KINDS",
    "TASKS",
    "ClassificationTask",
    "TaskSpec",
    "load_imagefolder_task",
    "make_shapes_task",
    "task_summary",
]
