"""The HST dense pipeline: built from a scripts/train_hst.py folder, saved and loaded as a diffusers folder (also
through custom_pipeline=pipelines/hst_dense), predictions equal the task model's, visualisations come back."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from vistune.data.dense import ShapesTaskDataset
from vistune.dense import load_task_model
from vistune.pipelines.hst_dense import HSTDenseModel, HSTDenseOutput, HSTDensePipeline

from .conftest import load_script
from .test_vit_site import one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    script = load_script("train_hst")
    folders = {}
    for task in ("classify", "segment", "detect"):
        out = tmp_path_factory.mktemp(task)
        script.main(["--task", task, "--max_train_steps", "1", "--num_train_images", "8", "--num_eval_images", "0",
                     "--train_batch_size", "2", "--seed", "0", "--fpn_channels", "32", "--output_dir", str(out)])
        folders[task] = out
    return folders


def shapes_images(task, n=2):
    data = ShapesTaskDataset(task, n, seed=9)
    return [Image.fromarray((data[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in range(n)]


def test_segmentation_pipeline_round_trip(trained, tmp_path):
    pipe = HSTDensePipeline(model=HSTDenseModel.from_task_folder(trained["segment"]))
    images = shapes_images("segment")
    result = pipe(images)
    assert isinstance(result, HSTDenseOutput) and len(result.masks) == 2 and result.masks[0].shape == (64, 64)
    assert all(isinstance(v, Image.Image) and v.size == (64, 64) for v in result.visualizations)
    model, _ = load_task_model(trained["segment"])
    batch = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 for im in images])
    with torch.no_grad():
        want = model(batch).argmax(1).numpy()
    assert np.array_equal(np.stack(result.masks), want)
    pipe.save_pretrained(tmp_path / "pipe")
    assert not list((tmp_path / "pipe").rglob("*.bin")) and list((tmp_path / "pipe").rglob("*.safetensors"))
    loaded = HSTDensePipeline.from_pretrained(tmp_path / "pipe")
    assert all(np.array_equal(a, b) for a, b in zip(loaded(images).masks, result.masks))
    custom = DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline=str(ROOT / "pipelines" / "hst_dense"),
                                               trust_remote_code=True)
    assert type(custom).__name__ == "HSTDensePipeline"
    assert all(np.array_equal(a, b) for a, b in zip(custom(images).masks, result.masks))
    # another image size: resized for the model, mask returned at the image's own size
    big = images[0].resize((96, 80))
    assert pipe(big).masks[0].shape == (80, 96)


def test_classification_and_detection_pipelines(trained):
    pipe = HSTDensePipeline(model=HSTDenseModel.from_task_folder(trained["classify"]))
    result = pipe(torch.rand(3, 3, 64, 64))
    assert len(result.labels) == 3 and all(name in pipe.model.config.class_names for name in result.labels)
    assert all(0 < s <= 1 for s in result.scores)
    pipe = HSTDensePipeline(model=HSTDenseModel.from_task_folder(trained["detect"]))
    result = pipe(shapes_images("detect"), score_threshold=0.0)
    assert len(result.boxes) == 2 and result.boxes[0].shape[1] == 4 and len(result.labels[0]) == len(result.boxes[0])
    assert len(result.visualizations) == 2
    with pytest.raises(ValueError, match="unsupported image"):
        pipe(["not an image"])
    with pytest.raises(FileNotFoundError):
        HSTDenseModel.from_task_folder(trained["detect"] / "nowhere")
