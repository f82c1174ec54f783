import pytest
import safetensors.torch
import torch

import vistune
from vistune import CheckpointError
from vistune.testing import tiny_unet
from vistune.tuners.csc_tuner import CSCTunerConfig, convert_official_csc_state_dict, official_csc_blocks, set_control

from .conftest import randomize, run_unet

SMALL = dict(encoder_width_ratio=0.5, condition_channels=32)


@pytest.fixture
def unet():
    return tiny_unet(seed=0, sample_size=8)


def official_layout(tuner, prefix="model.control_blocks.0."):
    """A vistune CSC-Tuner's weights under scepter's CSCTuners keys (the converter's inverse, written out)."""
    state = {}
    for key, value in tuner.state_dict().items():
        part, index, rest = key.split(".", 2)
        if part == "condition_encoder":  # Sequential: conv j at index j, SiLU at odd indices
            new = f"pre_hint_blocks.{index}.{rest}"
        elif part == "feature_convs":  # Sequential(SiLU, zero conv): the conv is module 1
            new = f"dense_hint_blocks.{index}.1.{rest}"
        else:  # skips.{m}.ln1.weight -> lsc_tuner_blocks.{m}.tuner_op.ln1.weight (m in decoder order)
            new = f"lsc_tuner_blocks.{index}.tuner_op.{rest}"
        state[prefix + new] = value.clone()
    return state


def control(batch=2, seed=0):
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_the_official_key_names_are_the_documented_ones(unet):
    state = official_layout(vistune.attach(unet, CSCTunerConfig()))
    keys = set(state)
    assert {f"model.control_blocks.0.pre_hint_blocks.{j}.weight" for j in range(0, 13, 2)} <= keys
    assert "model.control_blocks.0.dense_hint_blocks.5.1.bias" in keys
    assert "model.control_blocks.0.lsc_tuner_blocks.0.tuner_op.ln2.weight" in keys
    assert state["model.control_blocks.0.lsc_tuner_blocks.0.tuner_op.ln1.weight"].shape == (64, 64)  # deepest
    assert state["model.control_blocks.0.dense_hint_blocks.0.1.weight"].shape == (32, 256, 3, 3)  # conv_in skip


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("prefix", ["model.control_blocks.0.", "control_blocks.0.", "0.", ""])
@pytest.mark.parametrize(
    "options",
    [dict(SMALL), dict(SMALL, dense_kernel_size=1), dict(encoder_width_ratio=0.25, condition_channels=16, down_ratio=0.5)],
)
def test_official_csc_checkpoints_load_and_reproduce_outputs(tmp_path, unet, inputs, suffix, prefix, options):
    source = tiny_unet(seed=0, sample_size=8)
    tuner = vistune.attach(source, CSCTunerConfig(**options))
    randomize(tuner, std=0.05)
    image = control()
    set_control(source, image)
    expected = run_unet(source, inputs)
    path = tmp_path / f"csc{suffix}"
    state = official_layout(tuner, prefix)
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    assert vistune.load_tuners(unet, path, name="canny") == ["canny"]
    loaded = vistune.get_tuner(unet, "canny")
    for field, value in options.items():
        assert getattr(loaded.config, field) == value
    set_control(unet, image)
    assert torch.equal(run_unet(unet, inputs), expected)


def test_a_multi_condition_checkpoint_is_converted_block_by_block(tmp_path, unet, inputs):
    source = tiny_unet(seed=0, sample_size=8)
    state, expected = {}, {}
    for k, name in enumerate(["canny", "color"]):
        tuner = vistune.attach(source, CSCTunerConfig(**SMALL), name=name)
        randomize(tuner, seed=k + 3, std=0.05)
        state.update(official_layout(tuner, f"model.control_blocks.{k}."))
    path = tmp_path / "two.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"2 conditions.*model.control_blocks.0.*model.control_blocks.1"):
        vistune.load_tuners(unet, path)
    assert vistune.list_tuners(unet) == {}
    assert sorted(official_csc_blocks(state)) == ["model.control_blocks.0", "model.control_blocks.1"]
    config, weights = convert_official_csc_state_dict(state, block="model.control_blocks.1")
    color = vistune.attach(unet, config, name="color")
    color.load_state_dict(weights)
    for name, param in color.state_dict().items():
        assert torch.equal(param, vistune.get_tuner(source, "color").state_dict()[name])


def test_official_checkpoint_for_another_unet_is_refused(tmp_path):
    source = tiny_unet(seed=0, sample_size=8)
    state = official_layout(vistune.attach(source, CSCTunerConfig(**SMALL)))
    safetensors.torch.save_file(state, str(tmp_path / "csc.safetensors"))
    other = tiny_unet(block_out_channels=(32, 48))
    with pytest.raises(vistune.BackboneMismatchError, match="shape"):
        vistune.load_tuners(other, tmp_path / "csc.safetensors")
    assert vistune.list_tuners(other) == {}


def test_incomplete_or_mixed_checkpoints_are_refused(tmp_path, unet):
    state = official_layout(vistune.attach(tiny_unet(seed=0, sample_size=8), CSCTunerConfig(**SMALL)))
    partial = {k: v for k, v in state.items() if "dense_hint_blocks.3." not in k}
    safetensors.torch.save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys"):
        vistune.load_tuners(unet, tmp_path / "partial.safetensors")
    odd = dict(state, **{"model.control_blocks.0.dense_hint_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected key"):
        convert_official_csc_state_dict(odd)
    mixed = dict(state, **{"model.lsc_identity.0.tuner_op.ln1.weight": torch.zeros(4, 4)})
    assert convert_official_csc_state_dict(mixed) is None  # not (only) a CSC checkpoint: no converter claims it
    no_encoder = {k: v for k, v in state.items() if "pre_hint_blocks.12." not in k}
    with pytest.raises(CheckpointError, match="pre_hint|condition_encoder.12"):
        convert_official_csc_state_dict(no_encoder)
    assert vistune.list_tuners(unet) == {}
