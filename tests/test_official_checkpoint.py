import pickle

import pytest
import safetensors.torch
import torch

import vistune
from vistune import CheckpointError, SCTunerConfig
from vistune.testing import tiny_unet

from .conftest import randomize, run_unet


def official_layout(tuner, prefix="model.", middle=""):
    """Write a vistune SC-Tuner's weights with SCEdit's keys: lsc_identity.{m}[.<adapter>].tuner_op.ln{1,2}.*"""
    state = {}
    for m, adapter in tuner.skips.items():
        for key, value in adapter.state_dict().items():
            state[f"{prefix}lsc_identity.{m}.{middle}tuner_op.{key}"] = value.clone()
    return state


@pytest.mark.parametrize("ratio", [1.0, 0.5])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
@pytest.mark.parametrize("prefix, middle", [("model.", ""), ("", ""), ("", "scetuner_default.")])
def test_official_sc_checkpoints_load_and_reproduce_outputs(tmp_path, inputs, ratio, suffix, prefix, middle):
    source = tiny_unet()
    tuner = vistune.attach(source, SCTunerConfig(down_ratio=ratio))
    randomize(tuner)
    expected = run_unet(source, inputs)
    state = official_layout(tuner, prefix, middle)
    path = tmp_path / f"sce{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    fresh = tiny_unet()
    assert vistune.load_tuners(fresh, path, name="official") == ["official"]
    loaded = vistune.get_tuner(fresh, "official")
    assert loaded.config.down_ratio == ratio
    assert torch.equal(run_unet(fresh, inputs), expected)


def test_official_checkpoint_for_another_unet_is_refused(tmp_path):
    source = tiny_unet()
    state = official_layout(vistune.attach(source, SCTunerConfig()))
    safetensors.torch.save_file(state, str(tmp_path / "sce.safetensors"))
    other = tiny_unet(block_out_channels=(32, 48))
    with pytest.raises(vistune.BackboneMismatchError, match="shape"):
        vistune.load_tuners(other, tmp_path / "sce.safetensors")
    assert vistune.list_tuners(other) == {}


class Payload:  # an arbitrary object: a weights-only load must refuse to build it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_objects_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model.lsc_identity.0.tuner_op.ln1.weight": Payload()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="weights-only"):
        vistune.load_tuners(tiny_unet(), path)
    assert "this must never run" not in capsys.readouterr().out


def test_unknown_layouts_and_file_types_are_refused(tmp_path):
    safetensors.torch.save_file({"something.else": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="no registered tuner recognises"):
        vistune.load_tuners(tiny_unet(), tmp_path / "x.safetensors")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        vistune.load_tuners(tiny_unet(), tmp_path / "x.txt")
