import math

import pytest
import torch
from diffusers import UNet2DConditionModel

import vistune
from vistune import SCTunerConfig
from vistune.sites import find_unet_skips
from vistune.testing import SD15_UNET_CONFIG, SDXL_UNET_CONFIG
from vistune.tuners.sc_tuner import SCAdapter

from .conftest import randomize, run_unet


def reference_mlp(adapter: SCAdapter, x: torch.Tensor) -> torch.Tensor:
    """Linear_up(GELU(Linear_down(x))) over channels, written as 1x1 convolutions with an explicit erf GELU."""
    h = torch.einsum("oc,bchw->bohw", adapter.ln1.weight, x) + adapter.ln1.bias[None, :, None, None]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return torch.einsum("oc,bchw->bohw", adapter.ln2.weight, h) + adapter.ln2.bias[None, :, None, None]


def test_adapter_init_and_formula():
    torch.manual_seed(0)
    adapter = SCAdapter(32, 16)
    assert torch.count_nonzero(adapter.ln2.weight) == 0 and torch.count_nonzero(adapter.ln2.bias) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert adapter.ln1.weight.abs().max() <= bound and adapter.ln1.weight.abs().max() > 0.8 * bound
    x = torch.randn(2, 32, 5, 7)
    assert torch.count_nonzero(adapter(x)) == 0
    randomize(adapter)
    torch.testing.assert_close(adapter(x), reference_mlp(adapter, x), rtol=1e-5, atol=1e-5)


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize(
    "config, ratio, expected",
    [(SD15_UNET_CONFIG, 1.0, 19_680_000), (SD15_UNET_CONFIG, 0.5, 9_844_800), (SDXL_UNET_CONFIG, 1.0, 9_841_920)],
)
def test_parameter_counts_at_real_configs(config, ratio, expected):
    unet = meta_unet(config)
    tuner = vistune.attach(unet, SCTunerConfig(down_ratio=ratio))
    assert sum(p.numel() for p in tuner.parameters()) == expected
    assert sum(p.numel() for p in vistune.trainable_parameters(unet)) == expected


def test_identity_at_init(unet, inputs):
    base = run_unet(unet, inputs)
    vistune.attach(unet, SCTunerConfig())
    assert torch.equal(run_unet(unet, inputs), base)


def test_each_skip_becomes_x_plus_scaled_mlp(unet, inputs):
    """Capture what the up-block resnets read and compare with x + scale * MLP_m(x) from the base run."""
    skips = find_unet_skips(unet)

    def reads_of_run():
        reads = []
        handles = [
            r.register_forward_pre_hook(lambda m, a: reads.append(a[0])) for b in unet.up_blocks for r in b.resnets
        ]
        run_unet(unet, inputs)
        for h in handles:
            h.remove()
        return [read[:, -skip.channels :] for read, skip in zip(reads, skips)]

    base_skips = reads_of_run()
    tuner = vistune.attach(unet, SCTunerConfig(down_ratio=0.5, scale=0.3))
    randomize(tuner)
    tuned_skips = reads_of_run()
    for m, (x, tuned) in enumerate(zip(base_skips, tuned_skips)):
        expected = x + 0.3 * reference_mlp(tuner.skips[str(m)], x)
        torch.testing.assert_close(tuned, expected, rtol=1e-5, atol=1e-5)


def test_target_skips_limit_the_tuned_skips(unet, inputs):
    tuner = vistune.attach(unet, SCTunerConfig(target_skips=[0, 5]))
    assert sorted(tuner.skips.keys()) == ["0", "5"]
    with pytest.raises(vistune.BackboneMismatchError, match="do not exist"):
        vistune.attach(unet, SCTunerConfig(target_skips=[6]), name="other")


def test_negative_target_skips_count_from_the_shallow_end(unet, inputs, tmp_path):
    tuner = vistune.attach(unet, SCTunerConfig(target_skips=[-1, -3]), name="shallow")
    assert sorted(tuner.skips.keys()) == ["3", "5"] and tuner.config.target_skips == [-3, -1]
    randomize(tuner)
    tuned = run_unet(unet, inputs)
    vistune.save_tuners(unet, tmp_path)
    vistune.detach(unet, "shallow")
    assert vistune.load_tuners(unet, tmp_path) == ["shallow"]
    assert torch.equal(run_unet(unet, inputs), tuned)
    for bad, match in (([5, -1], "same skip twice"), ([-7], "do not exist")):
        with pytest.raises(vistune.BackboneMismatchError, match=match):
            vistune.attach(unet, SCTunerConfig(target_skips=bad), name="bad")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backward_stops_at_the_deepest_tuned_skip(unet, inputs):
    """Tuning only the shallowest skips keeps backward out of the up blocks that read none of them."""
    vistune.attach(unet, SCTunerConfig(target_skips=[-1]))
    fired = set()
    for i, block in enumerate(unet.up_blocks):
        block.register_full_backward_hook(lambda *_, i=i: fired.add(i))
    sample, timestep, context = inputs
    unet(sample, timestep, encoder_hidden_states=context).sample.square().mean().backward()
    assert fired == {len(unet.up_blocks) - 1}


def test_scale_zero_is_exactly_the_base_and_scale_is_linear(unet, inputs):
    base = run_unet(unet, inputs)
    tuner = vistune.attach(unet, SCTunerConfig())
    randomize(tuner)
    full = run_unet(unet, inputs)
    assert not torch.allclose(full, base)
    vistune.set_scale(unet, 0.0)
    assert torch.equal(run_unet(unet, inputs), base)
    vistune.set_scale(unet, 1.0)
    assert torch.equal(run_unet(unet, inputs), full)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_only_tuner_parameters_require_grad_and_backward_skips_the_encoder(unet, inputs):
    tuner = vistune.attach(unet, SCTunerConfig())
    tuner_params = {id(p) for p in tuner.parameters()}
    assert {id(p) for p in vistune.trainable_parameters(unet)} == tuner_params
    fired = {}

    def mark(label):
        def hook(module, grad_input, grad_output):
            fired[label] = True

        return hook

    for i, block in enumerate(unet.down_blocks):
        block.register_full_backward_hook(mark(f"down{i}"))
    unet.mid_block.register_full_backward_hook(mark("mid"))
    unet.up_blocks[0].register_full_backward_hook(mark("up0"))  # fires once gradients reach its outputs
    sample, timestep, context = inputs
    unet(sample, timestep, encoder_hidden_states=context).sample.square().mean().backward()
    assert fired == {"up0": True}
    for name, param in unet.named_parameters():
        if id(param) not in tuner_params:
            assert param.grad is None, name
    for adapter in tuner.skips.values():  # at init only the zero-initialised up projection gets gradient
        assert adapter.ln2.weight.grad.abs().sum() > 0


def test_sc_tuner_learns_to_imitate_a_teacher_tuner(unet, inputs):
    """A randomly set teacher SC-Tuner defines reachable targets; training a fresh one must close the gap."""
    sample, timestep, context = inputs
    teacher = vistune.attach(unet, SCTunerConfig(), name="teacher")
    randomize(teacher, seed=3, std=0.05)
    target = run_unet(unet, inputs)
    vistune.detach(unet, "teacher")
    vistune.attach(unet, SCTunerConfig(), name="student")
    optimizer = torch.optim.AdamW(vistune.trainable_parameters(unet), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(unet(sample, timestep, encoder_hidden_states=context).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
