import numpy as np
import pytest
import torch
from PIL import Image

from vistune.data.shapes import BACKGROUNDS
from vistune.data.vtab_shapes import KINDS, TASKS, load_imagefolder_task, make_shapes_task, task_summary

SMALL = dict(train_size=24, val_size=8, test_size=12)


def foreground(images: torch.Tensor) -> torch.Tensor:
    """Pixels that differ from the (uniform, achromatic) background, read at the top-left corner."""
    background = images[:, :, :1, :1]
    return (images - background).abs().amax(1) > 0.05


def test_suite_covers_the_three_kinds_with_at_least_six_tasks():
    assert len(TASKS) >= 6
    assert {spec.kind for spec in TASKS.values()} == set(KINDS)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_is_deterministic_balanced_and_well_formed(name):
    task = make_shapes_task(name, seed=3, **SMALL)
    again = make_shapes_task(name, seed=3, **SMALL)
    other = make_shapes_task(name, seed=4, **SMALL)
    assert task.kind == TASKS[name].kind and task.num_classes == len(TASKS[name].classes)
    for split, size in (("train", 24), ("val", 8), ("test", 12)):
        x, y = task.split(split)
        assert x.shape == (size, 3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0 <= float(x.min()) and float(x.max()) <= 1
        assert torch.equal(x, again.split(split)[0]) and torch.equal(y, again.split(split)[1])
        assert not torch.equal(x, other.split(split)[0])
        counts = torch.bincount(y, minlength=task.num_classes)
        assert int(counts.max() - counts.min()) <= 1  # balanced
    # splits never share an image
    flat = {s: task.split(s)[0].flatten(1) for s in ("train", "val", "test")}
    assert not (torch.cdist(flat["train"], flat["test"]).min() == 0)
    assert not (torch.cdist(flat["train"], flat["val"]).min() == 0)
    assert task.split("trainval")[0].shape[0] == 32
    assert task_summary(task) == {"name": name, "kind": task.kind, "num_classes": task.num_classes,
                                  "train_size": 24, "val_size": 8, "test_size": 12}


def test_more_training_images_do_not_change_the_test_set():
    a = make_shapes_task("count", train_size=8, val_size=4, test_size=6)
    b = make_shapes_task("count", train_size=16, val_size=4, test_size=6)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.val_x, b.val_x)


def test_position_labels_are_the_quadrant_of_the_object():
    task = make_shapes_task("position", train_size=40, val_size=1, test_size=1)
    mask = foreground(task.train_x)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    cx = (mask * xs).sum((1, 2)) / mask.sum((1, 2))
    cy = (mask * ys).sum((1, 2)) / mask.sum((1, 2))
    quadrant = (cx > 31.5).long() + 2 * (cy > 31.5).long()
    assert torch.equal(quadrant, task.train_y)


def test_size_labels_order_the_object_area_and_count_labels_the_number_of_blobs():
    import cv2

    task = make_shapes_task("size", train_size=30, val_size=1, test_size=1)
    area = foreground(task.train_x).sum((1, 2)).float()
    means = [float(area[task.train_y == k].mean()) for k in range(3)]
    assert means[0] < means[1] < means[2]
    assert float(area[task.train_y == 0].max()) < float(area[task.train_y == 2].min())
    task = make_shapes_task("count", train_size=24, val_size=1, test_size=1)
    mask = foreground(task.train_x).numpy().astype(np.uint8)
    blobs = torch.tensor([cv2.connectedComponents(m, connectivity=8)[0] - 1 for m in mask])
    # shapes of different colours may touch, so a blob count can only be lower than the label's count
    assert bool((blobs <= task.train_y + 1).all()) and float((blobs == task.train_y + 1).float().mean()) > 0.6


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown shapes task"):
        make_shapes_task("texture")
    with pytest.raises(ValueError, match="train_size"):
        make_shapes_task("shape", train_size=0)
    with pytest.raises(ValueError, match="unknown split"):
        make_shapes_task("shape", **SMALL).split("dev")


def write_folder(root, counts: dict[str, int], size: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    for k, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.full((size, size + 8, 3), 40 * k, np.uint8) + rng.integers(0, 20, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_imagefolder_task_is_split_deterministically(tmp_path):
    write_folder(tmp_path / "task", {"cats": 9, "dogs": 7})
    task = load_imagefolder_task(tmp_path / "task", seed=1, image_size=32, train_size=8, val_size=4)
    assert task.classes == ["cats", "dogs"] and task.name == "task" and task.kind == "natural"
    assert task.train_x.shape == (8, 3, 32, 32) and len(task.val_y) == 4 and len(task.test_y) == 4
    again = load_imagefolder_task(tmp_path / "task", seed=1, image_size=32, train_size=8, val_size=4)
    assert torch.equal(task.train_x, again.train_x) and torch.equal(task.test_y, again.test_y)
    other = load_imagefolder_task(tmp_path / "task", seed=2, image_size=32, train_size=8, val_size=4)
    assert not torch.equal(task.train_x, other.train_x)
    # labels follow the folder: class 1 images are brighter
    x, y = task.split("trainval")
    assert float(x[y == 1].mean()) > float(x[y == 0].mean()) + 0.1


def test_imagefolder_with_train_and_test_folders(tmp_path):
    write_folder(tmp_path / "t" / "train", {"a": 3, "b": 3})
    write_folder(tmp_path / "t" / "test", {"a": 2, "b": 1})
    task = load_imagefolder_task(tmp_path / "t", image_size=16, kind="specialised")
    assert (len(task.train_y), len(task.val_y), len(task.test_y)) == (6, 0, 3) and task.kind == "specialised"
    write_folder(tmp_path / "u" / "train", {"a": 2, "b": 2})
    write_folder(tmp_path / "u" / "test", {"a": 1, "c": 1})
    with pytest.raises(ValueError, match="classes"):
        load_imagefolder_task(tmp_path / "u", image_size=16)


def test_imagefolder_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_imagefolder_task(tmp_path / "missing")
    write_folder(tmp_path / "one", {"only": 5})
    with pytest.raises(ValueError, match=">= 2"):
        load_imagefolder_task(tmp_path / "one", train_size=2, val_size=1)
    write_folder(tmp_path / "few", {"a": 3, "b": 3})
    with pytest.raises(ValueError, match="needs more"):
        load_imagefolder_task(tmp_path / "few", train_size=5, val_size=1)
    write_folder(tmp_path / "bad", {"a": 3, "b": 3})
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_imagefolder_task(tmp_path / "bad", train_size=2, val_size=1)
    (tmp_path / "nothing" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="not an image-folder task"):
        load_imagefolder_task(tmp_path / "nothing")
    with pytest.raises(ValueError, match="kind"):
        load_imagefolder_task(tmp_path / "few", kind="medical")


def test_backgrounds_are_uniform_corners():
    """The foreground helper used above relies on uniform backgrounds: every corner pixel is a named background."""
    task = make_shapes_task("position", train_size=8, val_size=1, test_size=1)
    corners = (task.train_x[:, :, 0, 0] * 255).round()
    named = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)
    assert bool((torch.cdist(corners, named).min(1).values < 1).all())
