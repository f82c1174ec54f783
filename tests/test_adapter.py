import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vistune
from vistune.tuners.adapter import AdapterConfig, AdapterTuner, BottleneckAdapter

from .conftest import randomize
from .test_vit_site import all_hooks, images, one_thread, reference_block, tiny_vit  # noqa: F401 (autouse fixture)

STYLES = ["adaptformer", "pfeiffer", "houlsby"]


def reference_adapter(adapter: BottleneckAdapter, x: torch.Tensor, activation: str) -> torch.Tensor:
    """LayerNorm (if any) -> Down -> activation -> Up, written out by hand."""
    if isinstance(adapter.norm, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + adapter.norm.eps) * adapter.norm.weight + adapter.norm.bias
    h = x @ adapter.down.weight.T + adapter.down.bias
    if activation == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    elif activation == "relu":
        h = h.clamp(min=0)
    else:
        h = h * torch.sigmoid(h)
    return h @ adapter.up.weight.T + adapter.up.bias


def block_io(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block in one forward, as the next block sees them."""
    ios = []
    handles = [b.register_forward_hook(lambda m, a, out: ios.append((a[0], out))) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return ios


def test_adapter_module_init():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(32, 8, layernorm=True, activation="gelu")
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert torch.count_nonzero(adapter.down.bias) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) with fan_in 32
    assert 0.8 * bound < adapter.down.weight.abs().max() <= bound
    assert torch.count_nonzero(adapter(torch.randn(3, 32))) == 0


@pytest.mark.parametrize("style", STYLES)
def test_identity_at_init_and_exact_restore_after_detach(style):
    model = tiny_vit()
    model.patch_embed.proj.weight.requires_grad_(False)  # a user's flag must come back
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    with torch.no_grad():
        base = model(x)
        tuner = vistune.attach(model, AdapterConfig(style=style, bottleneck=4))
        assert torch.equal(model(x), base)
        randomize(tuner)
        assert not torch.allclose(model(x), base)
        vistune.detach(model)
        assert torch.equal(model(x), base)
    assert all_hooks(model) == 0 and not hasattr(model, "vistune_tuners")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("style", STYLES)
def test_each_block_follows_the_style_formula(style):
    """Every tuned block output equals the hand-written block + adapter formula on that block's input."""
    model = tiny_vit()
    config = AdapterConfig(style=style, bottleneck=6, adapter_layernorm=True, target_blocks=[0, 2], scale=0.5)
    tuner = vistune.attach(model, config)
    randomize(tuner, std=0.2)
    s = 0.5 * config.adapter_scale
    ios = block_io(model, images())
    with vistune.disabled(model):  # the stock block pieces, without the tuner's hooks
        for i, (x, out) in enumerate(ios):
            edits = {}
            if i in (0, 2):

                def ref(kind, i=i):
                    return lambda t: s * reference_adapter(getattr(tuner, kind)[str(i)], t, config.activation)

                if style == "adaptformer":
                    edits = {"parallel": ref("mlp")}
                elif style == "pfeiffer":
                    edits = {"mlp": ref("mlp")}
                else:
                    edits = {"attn": ref("attn"), "mlp": ref("mlp")}
            with torch.no_grad():
                expected = reference_block(model.blocks[i], x, **edits)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_style_defaults():
    af, pf, ho = (AdapterConfig(style=s) for s in STYLES)
    assert (af.adapter_scale, af.adapter_layernorm, af.activation) == (0.1, True, "gelu")
    assert (pf.adapter_scale, pf.adapter_layernorm, pf.activation) == (1.0, False, "relu")
    assert (ho.adapter_scale, ho.adapter_layernorm, ho.activation, ho.kinds) == (1.0, False, "silu", ("attn", "mlp"))
    assert vistune.TunerConfig.from_json(af.to_json()) == af


@pytest.mark.parametrize(
    "config, expected",
    [
        (AdapterConfig(bottleneck=8, adapter_layernorm=False), 156_768),  # 12*(8*768*2+8+768), NOAH's "0.16M"
        (AdapterConfig(bottleneck=8), 156_768 + 12 * 2 * 768),
        (AdapterConfig(style="houlsby", bottleneck=8), 2 * 156_768),
        (AdapterConfig(bottleneck=8, adapter_layernorm=False, target_blocks=[0, 11]), 2 * 13_064),
    ],
)
def test_parameter_counts_on_vit_b16(config, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    tuner = vistune.attach(model, config)
    assert sum(p.numel() for p in tuner.parameters()) == expected
    assert sum(p.numel() for p in vistune.trainable_parameters(model)) == expected


def test_only_adapters_train_and_scale_steers():
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        base = model.forward_features(x)
    tuner = vistune.attach(model, AdapterConfig(bottleneck=4))
    assert {id(p) for p in vistune.trainable_parameters(model)} == {id(p) for p in tuner.parameters()}
    randomize(tuner)
    with torch.no_grad():
        full = model.forward_features(x)
        vistune.set_scale(model, 0.0)
        assert torch.equal(model.forward_features(x), base)
        vistune.set_scale(model, 1.0)
        assert torch.equal(model.forward_features(x), full)
        with vistune.disabled(model):
            assert torch.equal(model.forward_features(x), base)
    assert not torch.allclose(full, base)


def test_bad_configs_and_targets():
    with pytest.raises(vistune.TunerError, match="style"):
        AdapterConfig(style="lora")
    with pytest.raises(vistune.TunerError, match="bottleneck"):
        AdapterConfig(bottleneck=0)
    with pytest.raises(vistune.TunerError, match="activation"):
        AdapterConfig(activation="tanh")
    with pytest.raises(vistune.TunerError, match="dropout"):
        AdapterConfig(dropout=1.0)
    model = tiny_vit()
    with pytest.raises(vistune.BackboneMismatchError, match=r"target_blocks \[4\] do not exist.*4 blocks"):
        vistune.attach(model, AdapterConfig(target_blocks=[1, 4]))
    assert not hasattr(model, "vistune_tuners") and all_hooks(model) == 0


def test_double_attach_and_merge_are_refused_and_change_nothing():
    model = tiny_vit()
    x = images()
    tuner = vistune.attach(model, AdapterConfig(bottleneck=4), name="a")
    randomize(tuner)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(vistune.TunerError, match="already attached"):
        vistune.attach(model, AdapterConfig(bottleneck=8), name="a")
    with pytest.raises(vistune.TunerError, match="cannot be merged"):
        vistune.merge_and_unload(model)
    assert vistune.get_tuner(model, "a") is tuner
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_two_adapters_add_up():
    model = tiny_vit()
    x = images()
    one = vistune.attach(model, AdapterConfig(bottleneck=4), name="one")
    two = vistune.attach(model, AdapterConfig(style="houlsby", bottleneck=4), name="two")
    randomize(one, seed=1)
    randomize(two, seed=2)
    with torch.no_grad():
        both = model(x)
        vistune.detach(model, "two")
        only_one = model(x)
    assert not torch.allclose(both, only_one)
    vistune.detach(model)
    assert all_hooks(model) == 0


def test_save_load_round_trip_and_depth_mismatch(tmp_path):
    model = tiny_vit()
    x = images()
    randomize(vistune.attach(model, AdapterConfig(style="houlsby", bottleneck=4, target_blocks=[1, 3])))
    with torch.no_grad():
        tuned = model(x)
    vistune.save_tuners(model, tmp_path / "ad")
    fresh = tiny_vit()
    assert vistune.load_tuners(fresh, tmp_path / "ad") == ["default"]
    assert isinstance(vistune.get_tuner(fresh), AdapterTuner)
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
    deeper = tiny_vit(depth=6)
    with pytest.raises(vistune.BackboneMismatchError, match="depth: saved for 4, this backbone has 6"):
        vistune.load_tuners(deeper, tmp_path / "ad")
    assert not hasattr(deeper, "vistune_tuners") and all_hooks(deeper) == 0


def teacher_targets(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Outputs of ``model`` with a randomly set 8-wide adapter (detached again): targets a fresh tuner can reach."""
    teacher = vistune.attach(model, AdapterConfig(bottleneck=8), name="teacher")
    randomize(teacher, seed=3, std=0.3)
    with torch.no_grad():
        target = model(x)
    vistune.detach(model, "teacher")
    return target


def imitate(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int) -> list[float]:
    """Train what requires grad in ``model`` toward ``target`` (MSE, AdamW 1e-2); the loss of every step."""
    optimizer = torch.optim.AdamW(vistune.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_adapters_imitates_a_teacher():
    """A randomly set teacher adapter defines reachable targets; training a fresh adapter closes the gap."""
    model = tiny_vit()
    x = images(batch=8)
    target = teacher_targets(model, x)
    vistune.attach(model, AdapterConfig(bottleneck=8), name="student")
    losses = imitate(model, x, target, steps=40)
    assert losses[-1] < 0.3 * losses[0], losses
