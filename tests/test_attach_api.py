import copy
import io
import json

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


@pytest.mark.parametrize("name", ["", "a.b", "with space", 3, "train", "to", "forward"])
def test_bad_names_are_refused(unet, name):
    with pytest.raises(TunerError, match="tuner name"):
        vistune.attach(unet, SCTunerConfig(), name=name)
    assert not hasattr(unet, "vistune_tuners")


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
    tuner = vistune.attach(unet, SCTunerConfig(), name="style")
    vistune.print_trainable_parameters(unet)
    out = capsys.readouterr().out
    count = sum(p.numel() for p in tuner.parameters())
    total = sum(p.numel() for p in unet.parameters())
    assert f"trainable params: {count:,d} || all params: {total:,d} ||" in out
    assert f"style: SCTuner {count:,d} params" in out
    unet.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in tuner.parameters())
    unet.to("meta")
    assert all(p.device.type == "meta" for p in tuner.parameters())


def test_inference_tuners_leave_the_backbone_trainable(unet):
    """Loading a tuner for inference into a model being fine-tuned must not freeze that model."""
    tuner = vistune.attach(unet, SCTunerConfig(), name="look", trainable=False)
    assert not any(p.requires_grad for p in tuner.parameters())
    assert all(p.requires_grad for n, p in unet.named_parameters() if not n.startswith("vistune_tuners."))
    trained = vistune.attach(unet, SCTunerConfig(), name="trainer")
    assert {id(p) for p in vistune.trainable_parameters(unet)} == {id(p) for p in trained.parameters()}
    vistune.detach(unet, "trainer")
    assert all(p.requires_grad for n, p in unet.named_parameters() if not n.startswith("vistune_tuners."))


def test_each_tuner_owns_its_config_and_run_time_scale(unet, tmp_path):
    config = SCTunerConfig(scale=0.5)
    a = vistune.attach(unet, config, name="a")
    b = vistune.attach(unet, config, name="b")
    vistune.set_scale(unet, 0.0, name="a")
    assert (a.scale, b.scale, config.scale) == (0.0, 0.5, 0.5)
    vistune.save_tuners(unet, tmp_path, name="a")  # the saved strength is the config's, not the run-time knob
    assert json.loads((tmp_path / "tuner_config.json").read_text())["config"]["scale"] == 0.5
    for bad in (float("nan"), float("inf"), "1", None):
        with pytest.raises(TunerError, match="finite number"):
            vistune.set_scale(unet, bad)


def test_deepcopy_of_a_tuned_unet_is_independent_and_detaches_cleanly(unet, inputs):
    base = run_unet(unet, inputs)
    randomize(vistune.attach(unet, SCTunerConfig()))
    tuned = run_unet(unet, inputs)
    twin = copy.deepcopy(unet)
    assert torch.equal(run_unet(twin, inputs), tuned)
    vistune.detach(twin)
    assert torch.equal(run_unet(twin, inputs), base)
    assert all(len(b._forward_pre_hooks) == 0 for b in twin.up_blocks)
    assert torch.equal(run_unet(unet, inputs), tuned)  # the original keeps its tuner and hooks
    buffer = io.BytesIO()
    torch.save(unet, buffer)  # a tuned module still pickles (our own object, in memory)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert torch.equal(run_unet(restored, inputs), tuned)


def test_placement_follows_the_backbone_but_trains_in_fp32(unet):
    unet.half()
    assert all(p.dtype == torch.float32 for p in vistune.attach(unet, SCTunerConfig(), name="t").parameters())
    frozen = vistune.attach(unet, SCTunerConfig(), name="f", trainable=False)
    assert all(p.dtype == torch.float16 for p in frozen.parameters())


def test_fp32_tuner_on_a_bf16_backbone_matches_the_fp32_reference(unet, inputs):
    tuner = vistune.attach(unet, SCTunerConfig())
    randomize(tuner, std=0.05)
    reference = run_unet(unet, inputs)
    unet.to(torch.bfloat16)
    tuner.float()  # training keeps the tuner in fp32 while the frozen backbone runs in bf16
    sample, timestep, context = inputs
    with torch.no_grad():
        out = unet(sample.bfloat16(), timestep, encoder_hidden_states=context.bfloat16()).sample
        with vistune.disabled(unet):
            base = unet(sample.bfloat16(), timestep, encoder_hidden_states=context.bfloat16()).sample
    assert out.dtype == torch.bfloat16
    error = (out.float() - reference).abs().max()
    effect = (base.float() - reference).abs().max()
    assert error < 0.05 and effect > 5 * error  # close to the fp32 result, and the tuner visibly acts


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
