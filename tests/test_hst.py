import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vistune
from vistune.core.config import TunerConfig
from vistune.core.model import build_tuner
from vistune.tuners.hst import HSTConfig, HSTTuner, hst_features

from .conftest import randomize
from .test_vit_site import all_hooks, one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(pretrained=False, img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=5)
SMALL = dict(stage_dims=[8, 8, 16, 16], stage_heads=[2, 2, 4, 4])


def tiny_vit(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, **overrides}).eval()


def images(batch: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def attach_hst(model, seed: int = 0, **kw) -> HSTTuner:
    torch.manual_seed(seed)
    return vistune.attach(model, HSTConfig(**{**SMALL, "num_classes": 4, **kw}))


def reference_logits(model: nn.Module, tuner: HSTTuner, x: torch.Tensor) -> torch.Tensor:
    """The official ViT_HSN.forward written out: meta token cat before each block, LayerNorms with tuned affine
    parameters, interpolate the full-width map then bridge, M_Block, stage norm, mean pool, BN, head."""
    b = x.shape[0]
    tokens = model.patch_embed(x)
    tokens = model._pos_embed(tokens)
    metas, maps = [], []
    for i, blk in enumerate(model.blocks):
        def ln(norm, which, t):
            w = norm.weight + tuner.norm_weight[i, which]
            bias = norm.bias + tuner.norm_bias[i, which]
            return F.layer_norm(t, norm.normalized_shape, w, bias, norm.eps)

        t = torch.cat([tuner.meta_tokens[i].expand(b, -1, -1), tokens], 1)
        t = t + blk.attn(ln(blk.norm1, 0, t))
        t = t + blk.mlp(ln(blk.norm2, 1, t))
        metas.append(t[:, :1])
        maps.append(t[:, 2:].transpose(1, 2).reshape(b, -1, 4, 4))
        tokens = t[:, 1:]
    xm, layer = x, 0
    for s in range(4):
        embed = tuner.embeds[s]
        if s == 0:
            y = embed.conv(xm)
        else:
            y = embed.proj(xm)
        h, w = y.shape[-2:]
        xs = embed.norm(y.flatten(2).transpose(1, 2))
        for blk in tuner.stages[s]:
            vit = F.interpolate(maps[layer], size=(h, w), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
            vit = tuner.bridges[s](vit)
            meta = tuner.meta_norms[layer](tuner.bridges[s](metas[layer]))
            kv = torch.cat([meta, vit.mean(1, keepdim=True)], 1)
            a = blk.attn
            q = a.q(blk.norm1(xs))
            k, v = a.k(kv), a.v(kv)
            heads, c = a.num_heads, xs.shape[-1]
            q = q.reshape(b, -1, heads, c // heads).transpose(1, 2)
            k = k.reshape(b, -1, heads, c // heads).transpose(1, 2)
            v = v.reshape(b, -1, heads, c // heads).transpose(1, 2)
            att = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
            xs = xs + a.proj((att @ v).transpose(1, 2).reshape(b, -1, c))
            xs = xs + vit
            xs = xs + blk.mlp(blk.norm2(xs))
            layer += 1
        xs = tuner.stage_norms[s](xs)
        xm = xs.transpose(1, 2).reshape(b, -1, h, w)
    return tuner.head.fc(tuner.head.fc_norm(xs.mean(1)))


def test_parameter_count_at_vit_b16_with_100_classes():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
        tuner = build_tuner(model, HSTConfig(num_classes=100))
        lean = build_tuner(model, HSTConfig(num_classes=100, backbone_grad=False))
    count = sum(p.numel() for p in tuner.parameters())
    layernorms = 12 * 2 * 2 * 768  # the ViT blocks' norm1/norm2 weight and bias, tuned as deltas
    assert tuner.norm_weight.numel() + tuner.norm_bias.numel() == layernorms
    assert count == 772_140  # paper: 0.78M
    assert abs(count - 780_000) / 780_000 < 0.02
    # backbone_grad=False drops the 12 meta tokens, their 12 LayerNorms and the ViT LayerNorm deltas
    meta_norms = 2 * (3 * 32 + 3 * 48 + 3 * 64 + 3 * 72)
    assert sum(p.numel() for p in lean.parameters()) == count - 12 * 768 - meta_norms - layernorms
    assert [len(stage) for stage in tuner.stages] == [3, 3, 3, 3]


def test_stage_grouping_and_config_errors():
    assert HSTConfig().layers_per_stage(12) == [3, 3, 3, 3]
    assert HSTConfig().layers_per_stage(8) == [2, 2, 2, 2]
    assert HSTConfig().layers_per_stage(6) == [1, 1, 2, 2]
    assert HSTConfig(stage_layers=[1, 1, 1, 3]).layers_per_stage(6) == [1, 1, 1, 3]
    with pytest.raises(vistune.TunerError, match="sum to"):
        HSTConfig(stage_layers=[1, 1, 1, 1]).layers_per_stage(6)
    with pytest.raises(vistune.TunerError, match="divisible"):
        HSTConfig(stage_dims=[33, 48, 64, 72])
    with pytest.raises(vistune.TunerError, match="4 entries"):
        HSTConfig(stage_heads=[2, 4])
    with pytest.raises(vistune.TunerError, match="num_classes"):
        HSTConfig(num_classes=-1)


def test_matches_the_official_forward_and_shapes():
    model = tiny_vit()
    tuner = attach_hst(model)
    randomize(tuner, seed=3, std=0.05)
    with torch.no_grad():
        for norm in tuner.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.weight.add_(1.0)
    model.eval()
    x = images()
    with torch.no_grad():
        got = model(x)
        want = reference_logits(model, tuner, x)
        feats = hst_features(model, x)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [tuple(f.shape) for f in feats] == [(3, 8, 16, 16), (3, 8, 8, 8), (3, 16, 4, 4), (3, 16, 2, 2)]


def test_meta_tokens_are_inserted_before_every_block_and_dropped_after():
    model = tiny_vit()
    attach_hst(model)
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        out = model.forward_features(images())
    for h in handles:
        h.remove()
    assert seen == [1 + 1 + 16] * 4  # meta + cls + 4x4 patches at every block input
    assert out.shape[1] == 17  # the ViT's own output has no meta token


def test_trainable_set_and_backward_reaches_meta_tokens_and_layernorms():
    model = tiny_vit()
    tuner = attach_hst(model)
    backbone = [p for n, p in model.named_parameters() if not n.startswith("vistune_tuners.")]
    assert not any(p.requires_grad for p in backbone)
    assert all(p.requires_grad for p in tuner.parameters())
    model.train()
    model(images()).square().sum().backward()
    assert tuner.meta_tokens[0].grad.abs().sum() > 0
    assert tuner.norm_weight.grad[0].abs().sum() > 0 and tuner.bridges[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone)


def test_backbone_grad_false_never_enters_the_vit():
    model = tiny_vit()
    tuner = attach_hst(model, backbone_grad=False)
    assert not hasattr(tuner, "meta_tokens") and not hasattr(tuner, "norm_weight")
    needs_grad = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: needs_grad.append(out.requires_grad or a[0].requires_grad))
    model.train()
    x = images()
    loss = model(x).square().sum()
    assert needs_grad == [False] * 4  # no autograd graph (hence no saved activations) inside the ViT
    loss.backward()
    assert tuner.bridges[-1].weight.grad.abs().sum() > 0 and tuner.embeds[0].conv[0].weight.grad is not None
    # default mode for contrast: the ViT is in the graph
    other = tiny_vit()
    attach_hst(other)
    flags = []
    other.blocks[2].register_forward_hook(lambda m, a, out: flags.append(out.requires_grad))
    other(x)
    assert flags == [True]


def test_detach_restores_the_backbone_exactly_after_training():
    model = tiny_vit()
    model.patch_embed.proj.bias.requires_grad_(False)  # a user's flag must come back
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    with torch.no_grad():
        before = model(x)
    hooks = all_hooks(model)
    tuner = attach_hst(model)
    optimizer = torch.optim.AdamW(vistune.trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert tuner.norm_weight.abs().sum() > 0  # the LayerNorm deltas trained
    model.eval()
    vistune.set_scale(model, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # scale 0 = exactly the ViT
    vistune.detach(model)
    assert all_hooks(model) == hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)


@pytest.mark.parametrize("backbone_grad", [True, False])
def test_save_load_round_trip(tmp_path, backbone_grad):
    model = tiny_vit()
    tuner = attach_hst(model, backbone_grad=backbone_grad)
    randomize(tuner, seed=5, std=0.05)
    model.train()
    model(images(seed=1))  # move the BatchNorm running statistics
    model.eval()
    x = images()
    with torch.no_grad():
        want = model(x)
    vistune.save_tuners(model, tmp_path / "hst")
    assert sorted(p.name for p in (tmp_path / "hst").iterdir()) == ["tuner_config.json", "tuner_model.safetensors"]
    fresh = tiny_vit()
    vistune.load_tuners(fresh, tmp_path / "hst")
    loaded = vistune.get_tuner(fresh)
    assert isinstance(loaded, HSTTuner) and loaded.config == tuner.config
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    other = tiny_vit(depth=6)
    with pytest.raises(vistune.BackboneMismatchError):
        vistune.load_tuners(other, tmp_path / "hst")


def test_deepcopy_keeps_a_working_independent_tuner():
    model = tiny_vit()
    tuner = attach_hst(model)
    copied = copy.deepcopy(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x))
        vistune.get_tuner(copied).head.fc.bias.add_(1.0)
        assert not torch.allclose(copied(x), model(x))
    vistune.detach(copied)
    with torch.no_grad():
        assert model(x).shape == (3, 4)  # the original's hooks still work
    assert vistune.get_tuner(model) is tuner


def test_bad_inputs():
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    with pytest.raises(vistune.BackboneMismatchError, match="not a timm Vision Transformer"):
        vistune.attach(resnet, HSTConfig())
    model = tiny_vit()
    attach_hst(model)
    with pytest.raises(ValueError, match="differs from the ViT's img_size"):
        model(images(size=48))
    dynamic = tiny_vit(dynamic_img_size=True)
    attach_hst(dynamic)
    with pytest.raises(ValueError, match="not a multiple of the ViT patch size 16x16"):
        dynamic(images(size=56))
    with torch.no_grad():
        assert [f.shape[-1] for f in hst_features(dynamic, images(size=96))] == [24, 12, 6, 3]
    with pytest.raises(vistune.TunerError, match="sum to"):
        vistune.attach(tiny_vit(), HSTConfig(stage_layers=[1, 1, 1, 2]))
    plain = tiny_vit()
    with pytest.raises(vistune.TunerError, match="expected one attached HST"):
        hst_features(plain, images())


def test_vit_b16_preset():
    config = TunerConfig.from_json((ROOT / "tuners" / "vit_b16_hst.json").read_text())
    assert isinstance(config, HSTConfig)
    assert config == HSTConfig(num_classes=100)
    saved = json.loads((ROOT / "tuners" / "vit_b16_hst.json").read_text())
    assert saved == {k: v for k, v in config.to_dict().items() if k in saved}  # omitted fields take their defaults


def test_shipped_tiny_vit_takes_hst():
    from vistune.assets import load_tiny_vit

    model = load_tiny_vit()
    tuner = vistune.attach(model, HSTConfig(num_classes=24))
    assert [len(s) for s in tuner.stages] == [2, 2, 2, 2]
    with torch.no_grad():
        feats = hst_features(model, torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (48, 8, 8), (64, 4, 4), (72, 2, 2)]


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
        ("vit_tiny_patch16_224", dict(reg_tokens=2)),
        ("deit_tiny_distilled_patch16_224", dict()),
        ("vit_tiny_patch16_224", dict(depth=6, embed_dim=48, num_heads=3)),
    ],
)
def test_other_timm_vit_variants(name, overrides):
    torch.manual_seed(0)
    model = timm.create_model(name, **{**TINY, **overrides}).eval()
    tuner = attach_hst(model)
    x = images(2)
    with torch.no_grad():
        logits = model(x)
        feats = hst_features(model, x)
    assert logits.shape == (2, 4) and [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [len(s) for s in tuner.stages] == ([1, 1, 2, 2] if overrides.get("depth") == 6 else [1, 1, 1, 1])
    vistune.detach(model)
    with torch.no_grad():
        assert model(x).shape[-1] == 5  # the ViT's own head again
