import json
import os

import pytest
import safetensors.torch
import torch

import vistune
from vistune import CONFIG_NAME, WEIGHTS_NAME, BackboneMismatchError, CheckpointError, SCTunerConfig, TunerError
from vistune.testing import tiny_unet

from .conftest import randomize, run_unet


def forget_hash(path):
    """Drop the recorded weights hash, as a hand-edited folder would, so the deeper checks are exercised."""
    record = json.loads((path / CONFIG_NAME).read_text())
    record.pop("weights_sha256")
    (path / CONFIG_NAME).write_text(json.dumps(record))


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
    assert not any(p.requires_grad for p in vistune.get_tuner(fresh, "style").parameters())  # inference by default
    vistune.detach(fresh)
    assert vistune.load_tuners(fresh, path, name="renamed", trainable=True) == ["renamed"]
    renamed = vistune.get_tuner(fresh, "renamed")
    assert {id(p) for p in vistune.trainable_parameters(fresh)} == {id(p) for p in renamed.parameters()}


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
    with pytest.raises(CheckpointError, match="does not match the hash"):
        vistune.load_tuners(fresh, path)
    forget_hash(path)
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
    forget_hash(path)
    with pytest.raises(CheckpointError, match="missing keys"):
        vistune.load_tuners(tiny_unet(), path)


def test_a_failed_save_leaves_the_previous_files_intact(tuned, tmp_path, monkeypatch):
    path = vistune.save_tuners(tuned, tmp_path)
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}
    randomize(vistune.get_tuner(tuned, "style"), seed=9)

    real_fsync = os.fsync

    def crash(fd):  # the temp file is written, then the disk fails before it can replace the old one
        real_fsync(fd)
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        vistune.save_tuners(tuned, path)
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before  # no temp file left either


def test_weights_from_another_save_are_detected(tuned, tmp_path):
    first = vistune.save_tuners(tuned, tmp_path / "a")
    randomize(vistune.get_tuner(tuned, "style"), seed=7)
    second = vistune.save_tuners(tuned, tmp_path / "b")
    (first / WEIGHTS_NAME).write_bytes((second / WEIGHTS_NAME).read_bytes())  # as if a save died between renames
    with pytest.raises(CheckpointError, match="does not match the hash"):
        vistune.load_tuners(tiny_unet(), first)


def test_a_folder_with_a_top_tuner_and_named_tuners_is_ambiguous(tuned, tmp_path):
    vistune.save_tuners(tuned, tmp_path)
    vistune.save_tuners(tuned, tmp_path / "other")
    with pytest.raises(CheckpointError, match="holds a tuner at its top and tuners in"):
        vistune.load_tuners(tiny_unet(), tmp_path)


@pytest.mark.parametrize(
    "field, value", [("down_ratio", "abc"), ("scale", None), ("target_skips", 3), ("down_ratio", 1e400),
                     ("target_skips", [0.7, 1.2]), ("down_ratio", True)]
)
def test_bad_config_values_in_a_file_give_checkpoint_errors(tuned, tmp_path, field, value):
    path = vistune.save_tuners(tuned, tmp_path)
    record = json.loads((path / CONFIG_NAME).read_text())
    record["config"][field] = value
    (path / CONFIG_NAME).write_text(json.dumps(record))
    fresh = tiny_unet()
    with pytest.raises(CheckpointError, match=field):
        vistune.load_tuners(fresh, path)
    assert vistune.list_tuners(fresh) == {}
