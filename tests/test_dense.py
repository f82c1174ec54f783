import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import vistune
from vistune.data.dense import (
    ClassificationFolder,
    CocoDetection,
    SegmentationFolder,
    ShapesTaskDataset,
    dense_collate,
    write_coco,
)
from vistune.dense import HSTPyramid, ViTSimplePyramid, box_ap50, build_task_model, task_trainable_parameters
from vistune.tuners.hst import HSTConfig, HSTTuner

from .test_vit_site import one_thread  # noqa: F401 (autouse fixture)

TINY = dict(pretrained=False, img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=5)
SMALL_HST = HSTConfig(stage_dims=[8, 8, 16, 16], stage_heads=[2, 2, 4, 4])


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **TINY).eval()


def batch(task: str, n: int = 4, seed: int = 0):
    return dense_collate([ShapesTaskDataset(task, n, seed=seed)[i] for i in range(n)])


def test_shapes_task_datasets():
    image, label = ShapesTaskDataset("classify", 3)[0]
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1 and 0 <= int(label) < 24
    data = ShapesTaskDataset("segment", 3, seed=1)
    image, mask = data[1]
    assert data.num_classes == 5 and mask.shape == (64, 64) and set(mask.unique().tolist()) <= set(range(5))
    image, target = ShapesTaskDataset("detect", 3)[2]
    assert target["boxes"].shape[1] == 4 and target["labels"].min() >= 1
    images, targets = batch("detect", 3)
    assert images.shape == (3, 3, 64, 64) and isinstance(targets, list)
    with pytest.raises(ValueError, match="unknown task"):
        ShapesTaskDataset("depth", 3)


@pytest.mark.parametrize("method", ["hst", "full", "linear", "lora"])
def test_task_models_and_trainable_sets(method):
    for task in ("classify", "segment", "detect"):
        vit = tiny_vit()
        model = build_task_model(vit, task, method, 5 if task != "classify" else 24, hst_config=SMALL_HST,
                                 fpn_channels=32)
        trainable = {id(p) for p in task_trainable_parameters(model)}
        vit_params = {n: p for n, p in vit.named_parameters() if not n.startswith("vistune_tuners.")}
        if method == "full":
            assert all(id(p) in trainable for p in vit_params.values())
        else:  # only the head (classify), LoRA factors or the tuner train inside the ViT
            allowed = ("head.",) if task == "classify" and method != "hst" else ()
            allowed += ("lora_",) if method == "lora" else ()
            assert all((id(p) in trainable) == any(a in n for a in allowed) for n, p in vit_params.items()), task
        images, target = batch(task, 2)
        model.train()
        if task == "classify":
            out = model(images)
            assert out.shape == (2, 24)
        elif task == "segment":
            out = model(images)
            assert out.shape == (2, 5, 64, 64)
        else:
            losses = model(list(images), target)
            assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
            model.eval()
            with torch.no_grad():
                detections = model(list(images))
            assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}


def test_pyramids_have_strides_4_to_32():
    vit = tiny_vit()
    vistune.attach(vit, SMALL_HST)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hst = HSTPyramid(vit)(x)
        plain = ViTSimplePyramid(tiny_vit())(x)
    assert [tuple(f.shape[-2:]) for f in hst.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [tuple(f.shape[-2:]) for f in plain.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [f.shape[1] for f in hst.values()] == [8, 8, 16, 16]


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_hst_dense_training_lowers_the_loss(task):
    vit = tiny_vit()
    model = build_task_model(vit, task, "hst", 5 if task == "segment" else 4, hst_config=SMALL_HST, fpn_channels=32)
    optimizer = torch.optim.AdamW(task_trainable_parameters(model), lr=3e-3)
    images, target = batch(task, 4)
    model.train()
    losses = []
    for _ in range(12):
        if task == "segment":
            loss = F.cross_entropy(model(images), target)
        else:
            loss = sum(model(list(images), target).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert isinstance(vistune.get_tuner(vit), HSTTuner)


def test_box_ap50_reference_values():
    target = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2])}]
    perfect = [{"boxes": target[0]["boxes"], "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]
    assert box_ap50(perfect, target) == 1.0
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    assert box_ap50(none, target) == 0.0
    # class 1: a false positive ranked above the true one -> precision 1/2 at recall 1 -> AP 0.5; class 2 missed
    mixed = [{"boxes": torch.tensor([[50.0, 50, 60, 60], [0, 0, 10, 10]]), "scores": torch.tensor([0.9, 0.5]),
              "labels": torch.tensor([1, 1])}]
    assert box_ap50(mixed, target) == pytest.approx(0.25)
    # a box with IoU 0.25 (< 0.5) does not count
    shifted = [{"boxes": torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30]]), "scores": torch.tensor([0.9, 0.9]),
                "labels": torch.tensor([1, 2])}]
    assert box_ap50(shifted, target) == pytest.approx(0.5)


def test_user_folders_and_bad_input(tmp_path):
    # classification: ImageFolder layout
    for name in ("cat", "dog"):
        (tmp_path / "cls" / name).mkdir(parents=True)
        Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "cls" / name / "a.png")
    data = ClassificationFolder(tmp_path / "cls", 32)
    image, label = data[1]
    assert data.class_names == ("cat", "dog") and image.shape == (3, 32, 32) and int(label) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="ImageFolder"):
        ClassificationFolder(tmp_path / "empty", 32)
    # segmentation: image + mask PNG pairs
    seg = tmp_path / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir()
    Image.new("RGB", (20, 20)).save(seg / "images" / "a.png")
    mask = np.zeros((20, 20), np.uint8)
    mask[5:10, 5:10] = 2
    mask[0, 0] = 255
    Image.fromarray(mask).save(seg / "masks" / "a.png")
    image, got = SegmentationFolder(seg, 40, num_classes=3)[0]
    assert got.shape == (40, 40) and set(got.unique().tolist()) == {0, 2, 255}
    with pytest.raises(ValueError, match=r"class id\(s\) \[2\] outside 0..1"):
        SegmentationFolder(seg, 40, num_classes=2)[0]
    Image.new("RGB", (20, 20)).save(seg / "images" / "b.png")
    with pytest.raises(ValueError, match="have no mask"):
        SegmentationFolder(seg, 40, num_classes=3)
    # detection: COCO json round trip and bad files
    shapes = ShapesTaskDataset("detect", 3)
    path = write_coco(tmp_path / "coco.json", shapes, tmp_path / "coco_images", list(shapes.class_names))
    coco = CocoDetection(tmp_path / "coco_images", path, 128)
    image, target = coco[1]
    assert coco.class_names == shapes.class_names and image.shape == (3, 128, 128)
    torch.testing.assert_close(target["boxes"], shapes[1][1]["boxes"] * 2)
    assert torch.equal(target["labels"], shapes[1][1]["labels"])
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        CocoDetection(tmp_path, tmp_path / "empty.json", 64)
    (tmp_path / "none.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="no images"):
        CocoDetection(tmp_path, tmp_path / "none.json", 64)
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}],
                                                   "annotations": [{"id": 1, "image_id": 1, "category_id": 9,
                                                                    "bbox": [0, 0, 1, 1]}],
                                                   "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match="unknown category id 9"):
        CocoDetection(tmp_path, tmp_path / "bad.json", 64)
