import pytest
import torch

import vistune
from vistune import SCTunerConfig, TunerError

from .conftest import randomize, run_unet


def test_detach_restores_outputs_and_flags_bit_for_bit(unet, inputs):
    unet.conv_in.weight.requires_grad_(False)  # a flag the user set must come back as it was
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run_unet(unet, inputs)
    randomize(vistune.attach(unet, SCTunerConfig()))
    assert not torch.equal(run_unet(unet, inputs), base)
    detached = vistune.detach(unet)
    assert list(detached) == ["default"]
    assert not hasattr(unet, "vistune_tuners")
    assert all(len(b._forward_pre_hooks) == 0 for b in unet.up_blocks)
    assert torch.equal(run_unet(unet, inputs), base)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_several_named_tuners_add_their_deltas(unet, inputs):
    base = run_unet(unet, inputs)
    style = vistune.attach(unet, SCTunerConfig(), name="style")
    extra = vistune.attach(unet, SCTunerConfig(down_ratio=0.25), name="extra")
    randomize(style, seed=1)
    randomize(extra, seed=2)
    assert set(vistune.list_tuners(unet)) == {"style", "extra"}
    both = run_unet(unet, inputs)
    vistune.set_scale(unet, 0, name="extra")
    style_only = run_unet(unet, inputs)
    vistune.set_scale(unet, 1, name="extra")
    vistune.set_scale(unet, 0, name="style")
    extra_only = run_unet(unet, inputs)
    assert not torch.allclose(both, style_only) and not torch.allclose(both, extra_only)
    vistune.detach(unet, "extra")
    vistune.set_scale(unet, 1, name="style")
    torch.testing.assert_close(run_unet(unet, inputs), style_only, rtol=0, atol=0)
    assert {id(p) for p in vistune.trainable_parameters(unet)} == {id(p) for p in style.parameters()}
    vistune.detach(unet)
    assert torch.equal(run_unet(unet, inputs), base)


def test_double_attach_is_refused_and_changes_nothing(unet, inputs):
    tuner = vistune.attach(unet, SCTunerConfig(), name="style")
    randomize(tuner)
    before = run_unet(unet, inputs)
    with pytest.raises(TunerError, match="already attached"):
        vistune.attach(unet, SCTunerConfig(down_ratio=0.5), name="style")
    assert vistune.get_tuner(unet, "style") is tuner
    assert torch.equal(run_unet(unet, inputs), before)


def test_attach_to_a_model_without_skips_changes_nothing():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(vistune.BackboneMismatchError, match="no U-Net skip connections"):
        vistune.attach(model, SCTunerConfig())
    assert not hasattr(model, "vistune_tuners") and model.weight.requires_grad


@pytest.mark.parametrize("name", ["", "a.b", "with space", 3])
def test_bad_names_are_refused(unet, name):
    with pytest.raises(TunerError, match="tuner name"):
        vistune.attach(unet, SCTunerConfig(), name=name)


def test_errors_name_what_is_missing(unet):
    with pytest.raises(TunerError, match="no tuners attached"):
        vistune.detach(unet)
    vistune.attach(unet, SCTunerConfig(), name="style")
    with pytest.raises(TunerError, match="no tuner named 'other'.*style"):
        vistune.set_scale(unet, 0.5, name="other")
    with pytest.raises(TunerError, match="expected a TunerConfig"):
        vistune.attach(unet, {"tuner_type": "sc_tuner"}, name="x")


def test_sc_tuner_cannot_be_merged(unet):
    vistune.attach(unet, SCTunerConfig())
    with pytest.raises(TunerError, match="cannot be merged"):
        vistune.merge_and_unload(unet)
    assert "default" in vistune.list_tuners(unet)


def test_summary_and_to_move_tuners_with_the_backbone(unet, capsys):
    tuner = vistune.attach(unet, SCTunerConfig(), name="style", trainable=False)
    assert vistune.trainable_parameters(unet) == []
    vistune.print_trainable_parameters(unet)
    out = capsys.readouterr().out
    count = sum(p.numel() for p in tuner.parameters())
    assert "trainable params: 0 ||" in out and f"style: SCTuner {count:,d} params" in out
    unet.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in tuner.parameters())


def test_attach_matches_backbone_dtype_and_runs_in_half_precision_dtype(inputs):
    from vistune.testing import tiny_unet

    unet = tiny_unet().to(torch.bfloat16)
    tuner = vistune.attach(unet, SCTunerConfig())
    assert all(p.dtype == torch.bfloat16 for p in tuner.parameters())
    tuner.float()  # a training script may keep the tuner in fp32 while the backbone stays in bf16
    randomize(tuner)
    sample, timestep, context = inputs
    out = unet(sample.bfloat16(), timestep, encoder_hidden_states=context.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_disabled_context_turns_tuners_off_and_restores_their_scales(unet, inputs):
    base = run_unet(unet, inputs)
    tuner = vistune.attach(unet, SCTunerConfig(scale=0.6))
    randomize(tuner)
    tuned = run_unet(unet, inputs)
    with vistune.disabled(unet):
        assert torch.equal(run_unet(unet, inputs), base)
    assert tuner.scale == 0.6 and torch.equal(run_unet(unet, inputs), tuned)


class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel, which keeps the model in .module
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_api_sees_through_ddp_style_wrappers(unet, inputs, tmp_path):
    wrapped = Wrapper(unet)
    tuner = vistune.attach(wrapped, SCTunerConfig(), name="style")
    assert vistune.get_tuner(unet, "style") is tuner and vistune.list_tuners(wrapped) == {"style": tuner}
    randomize(tuner)
    vistune.save_tuners(wrapped, tmp_path)
    vistune.detach(wrapped)
    assert vistune.load_tuners(Wrapper(unet), tmp_path) == ["style"]
    assert hasattr(unet, "vistune_tuners")
