import json
import os

import pytest
import safetensors.torch
import torch

import vistune
from vistune import CONFIG_NAME, WEIGHTS_NAME, BackboneMismatchError, CheckpointError, SCTunerConfig, TunerError
from vistune.testing import tiny_unet

from .conftest import randomize, run_unet


@pytest.fixture
def tuned(unet):
    tuner = vistune.attach(unet, SCTunerConfig(down_ratio=0.5, scale=0.8), name="style")
    randomize(tuner)
    return unet


def test_save_then_load_into_a_fresh_unet_reproduces_outputs(tuned, inputs, tmp_path):
    expected = run_unet(tuned, inputs)
    path = vistune.save_tuners(tuned, tmp_path / "style")
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]
    record = json.loads((path / CONFIG_NAME).read_text())
    assert record["name"] == "style" and record["config"]["down_ratio"] == 0.5
    fresh = tiny_unet(seed=0)
    assert vistune.load_tuners(fresh, path) == ["style"]
    assert vistune.get_tuner(fresh, "style").scale == 0.8
    assert torch.equal(run_unet(fresh, inputs), expected)
    assert vistune.trainable_parameters(fresh) == []  # loaded for inference unless asked
    vistune.detach(fresh)
    assert vistune.load_tuners(fresh, path, name="renamed", trainable=True) == ["renamed"]
    assert len(vistune.trainable_parameters(fresh)) == len(list(vistune.get_tuner(fresh, "renamed").parameters()))


def test_several_tuners_save_to_named_subfolders(tuned, inputs, tmp_path):
    randomize(vistune.attach(tuned, SCTunerConfig(), name="extra"), seed=5)
    expected = run_unet(tuned, inputs)
    vistune.save_tuners(tuned, tmp_path)
    assert (tmp_path / "style" / CONFIG_NAME).is_file() and (tmp_path / "extra" / WEIGHTS_NAME).is_file()
    fresh = tiny_unet(seed=0)
    assert sorted(vistune.load_tuners(fresh, tmp_path)) == ["extra", "style"]
    torch.testing.assert_close(run_unet(fresh, inputs), expected, rtol=0, atol=0)
    with pytest.raises(TunerError, match="only rename a single tuner"):
        vistune.load_tuners(tiny_unet(), tmp_path, name="x")


def test_loading_into_another_layout_is_refused_and_changes_nothing(tuned, tmp_path):
    vistune.save_tuners(tuned, tmp_path)
    other = tiny_unet(block_out_channels=(32, 48))
    with pytest.raises(BackboneMismatchError, match="skip_channels"):
        vistune.load_tuners(other, tmp_path)
    assert vistune.list_tuners(other) == {} and not hasattr(other, "vistune_tuners")
    assert all(p.requires_grad for p in other.parameters())


def test_loading_a_name_already_attached_is_refused(tuned, inputs, tmp_path):
    vistune.save_tuners(tuned, tmp_path)
    before = run_unet(tuned, inputs)
    with pytest.raises(TunerError, match="already attached"):
        vistune.load_tuners(tuned, tmp_path)
    assert list(vistune.list_tuners(tuned)) == ["style"] and torch.equal(run_unet(tuned, inputs), before)


def test_truncated_and_corrupt_weights_give_clear_errors(tuned, tmp_path):
    path = vistune.save_tuners(tuned, tmp_path)
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    fresh = tiny_unet()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        vistune.load_tuners(fresh, path)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        vistune.load_tuners(fresh, path)
    assert vistune.list_tuners(fresh) == {}


def test_missing_or_broken_config_gives_clear_errors(tuned, tmp_path):
    path = vistune.save_tuners(tuned, tmp_path)
    (path / CONFIG_NAME).rename(path / "moved.json")
    with pytest.raises(CheckpointError, match="holds no tuner"):
        vistune.load_tuners(tiny_unet(), path)
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        vistune.load_tuners(tiny_unet(), path)
    (path / CONFIG_NAME).write_text(json.dumps({"config": {"tuner_type": "unknown"}}))
    with pytest.raises(CheckpointError, match="unknown tuner type"):
        vistune.load_tuners(tiny_unet(), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        vistune.load_tuners(tiny_unet(), tmp_path / "nowhere")


def test_weights_with_wrong_keys_are_refused(tuned, tmp_path):
    path = vistune.save_tuners(tuned, tmp_path)
    state = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    state.pop(sorted(state)[0])
    safetensors.torch.save_file(state, str(path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="missing keys"):
        vistune.load_tuners(tiny_unet(), path)


def test_a_failed_save_leaves_the_previous_files_intact(tuned, tmp_path, monkeypatch):
    path = vistune.save_tuners(tuned, tmp_path)
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}
    randomize(vistune.get_tuner(tuned, "style"), seed=9)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        vistune.save_tuners(tuned, path)
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before  # no temp file left either
