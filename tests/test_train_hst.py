"""scripts/train_hst.py on the shipped tiny ViT: every task trains and its output folder loads back exactly,
resume is exact, and bad user data fails before anything is written."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import vistune
from vistune.data.dense import ShapesTaskDataset, dense_collate
from vistune.dense import load_task_model
from vistune.tuners.hst import HSTTuner

from .conftest import load_script
from .test_vit_site import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def script():
    return load_script("train_hst")


def run(script, out, *extra):
    argv = ["--num_train_images", "16", "--num_eval_images", "4", "--train_batch_size", "4", "--seed", "0",
            "--fpn_channels", "32", "--output_dir", str(out), *extra]
    assert script.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("task, metric", [("classify", "accuracy"), ("segment", "miou"), ("detect", "ap50")])
def test_hst_tasks_train_save_and_load(script, tmp_path, task, metric):
    out = tmp_path / task
    metrics = run(script, out, "--task", task, "--max_train_steps", "2")
    assert 0 <= metrics[metric] <= 1 and metrics["method"] == "hst"
    model, config = load_task_model(out)
    assert config["task"] == task and config["image_size"] == [64, 64]
    saved = safetensors.torch.load_file(str(out / "task_model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    images, _ = dense_collate([ShapesTaskDataset(task, 2, seed=5)[i] for i in range(2)])
    with torch.no_grad():
        out1 = model(images if task != "detect" else list(images))
        out2 = load_task_model(out)[0](images if task != "detect" else list(images))
    if task == "detect":
        out1, out2 = out1[0]["scores"], out2[0]["scores"]
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)
    # the tuner alone loads onto the shipped ViT the standard way
    from vistune.assets import load_tiny_vit

    vit = load_tiny_vit()
    vistune.load_tuners(vit, out / "hst")
    assert isinstance(vistune.get_tuner(vit), HSTTuner)


def test_resume_reproduces_an_uninterrupted_run(script, tmp_path):
    args = ["--task", "segment", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    run(script, tmp_path / "a", *args)
    straight = safetensors.torch.load_file(str(tmp_path / "a" / "task_model.safetensors"))
    (tmp_path / "b").mkdir()
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run(script, tmp_path / "b", *args, "--resume_from_checkpoint", "latest")
    resumed = safetensors.torch.load_file(str(tmp_path / "b" / "task_model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(ValueError, match="--method hst"):
        script.main(["--task", "segment", "--method", "linear", "--output_dir", str(tmp_path / "b"),
                     "--resume_from_checkpoint", "latest"])


def test_gradient_checkpointing_flag_trains_the_same_weights(script, tmp_path):
    args = ["--task", "classify", "--max_train_steps", "2"]
    run(script, tmp_path / "ckpt", *args)
    run(script, tmp_path / "plain", *args, "--hst_gradient_checkpointing", "false")
    ckpt = safetensors.torch.load_file(str(tmp_path / "ckpt" / "task_model.safetensors"))
    plain = safetensors.torch.load_file(str(tmp_path / "plain" / "task_model.safetensors"))
    assert ckpt.keys() == plain.keys()
    for k in ckpt:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)
    saved = json.loads((tmp_path / "plain" / "hst" / "tuner_config.json").read_text())
    assert saved["config"]["gradient_checkpointing"] is False


@pytest.mark.parametrize("method", ["linear", "lora", "full"])
def test_baselines_run_in_the_same_loop(script, tmp_path, method):
    metrics = run(script, tmp_path / method, "--task", "classify", "--method", method, "--max_train_steps", "1")
    assert metrics["method"] == method and 0 <= metrics["accuracy"] <= 1
    model, _ = load_task_model(tmp_path / method)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 24)


def test_bad_user_data_fails_before_writing(script, tmp_path):
    seg = tmp_path / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir()
    Image.new("RGB", (16, 16)).save(seg / "images" / "a.png")
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(seg / "masks" / "a.png")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"class id\(s\) \[7\]"):
        script.main(["--task", "segment", "--train_data_dir", str(seg), "--num_classes", "3", "--output_dir", str(out)])
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        script.main(["--task", "detect", "--train_data_dir", str(seg / "images"), "--coco_json",
                     str(tmp_path / "empty.json"), "--output_dir", str(out)])
    with pytest.raises(SystemExit):
        script.main(["--task", "segment", "--train_data_dir", str(seg), "--output_dir", str(out)])  # no --num_classes
    assert not out.exists()
