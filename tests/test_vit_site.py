import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock
from torch import nn

import vistune
from vistune.sites.vit import ViTBlock, find_vit_blocks, vit_block_site, vit_patch_maps
from vistune.tuners.adapter import AdapterConfig

from .conftest import randomize

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine's other jobs for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def tiny_vit(seed: int = 0, name: str = "vit_tiny_patch16_224", **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **overrides}).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_find_blocks_of_a_tiny_vit():
    blocks = find_vit_blocks(tiny_vit())
    assert blocks == [ViTBlock(index=i, dim=32, num_heads=2, num_prefix_tokens=1, grid_size=(4, 4)) for i in range(4)]
    assert blocks[2].path == "blocks.2"


@pytest.mark.parametrize(
    "name, overrides, prefix",
    [
        ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg"), 0),
        ("vit_tiny_patch16_224", dict(reg_tokens=2), 3),
        ("deit_tiny_distilled_patch16_224", dict(), 2),
        ("vit_tiny_patch16_224", dict(depth=3, embed_dim=48, num_heads=3, img_size=48), 1),
    ],
)
def test_deit_no_cls_register_tokens_and_other_sizes(name, overrides, prefix):
    model = tiny_vit(name=name, **overrides)
    blocks = find_vit_blocks(model)
    assert len(blocks) == len(model.blocks)
    assert {b.num_prefix_tokens for b in blocks} == {prefix}
    assert {b.dim for b in blocks} == {model.embed_dim}
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    base = model(x)
    tuner = vistune.attach(model, AdapterConfig(bottleneck=4))
    assert torch.equal(model(x), base)  # identity at init on every layout
    randomize(tuner)
    assert model(x).shape == base.shape and not torch.allclose(model(x), base)
    vistune.detach(model)
    assert torch.equal(model(x), base)


def test_real_architectures_on_meta():
    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224", pretrained=False)
        large = timm.create_model("vit_large_patch16_224", pretrained=False)
    b, l = find_vit_blocks(base), find_vit_blocks(large)
    assert (len(b), b[0].dim, b[0].num_heads, b[0].grid_size) == (12, 768, 12, (14, 14))
    assert (len(l), l[0].dim, l[0].num_heads) == (24, 1024, 16)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), "no 'blocks'"),
        (lambda: nn.Linear(4, 4), "no 'blocks'"),
        (lambda: tiny_vit(block_fn=ResPostBlock), "ResPostBlock"),
    ],
)
def test_non_vit_backbones_are_refused_and_left_unchanged(make, why):
    model = make()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(vistune.BackboneMismatchError, match=why):
        find_vit_blocks(model)
    with pytest.raises(vistune.BackboneMismatchError, match="not a timm Vision Transformer"):
        vistune.attach(model, AdapterConfig())
    assert not hasattr(model, "vistune_tuners") and all_hooks(model) == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("overrides", [dict(), dict(class_token=False, global_pool="avg"), dict(reg_tokens=1)])
def test_patch_maps_match_timm_intermediates(overrides):
    model = tiny_vit(**overrides)
    x = images()
    tokens = []
    handles = [b.register_forward_hook(lambda m, a, out: tokens.append(out)) for b in model.blocks]
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")
    for h in handles:
        h.remove()
    for t, e in zip(tokens, expected):
        assert torch.equal(vit_patch_maps(t, model), e)
    square = vit_patch_maps(torch.randn(2, 1 + 36, 8), num_prefix_tokens=1)  # grid inferred as 6x6
    assert square.shape == (2, 8, 6, 6)
    with pytest.raises(ValueError, match="square grid"):
        vit_patch_maps(torch.randn(2, 1 + 7, 8), num_prefix_tokens=1)


def reference_block(block: nn.Module, x: torch.Tensor, attn=None, mlp=None, parallel=None) -> torch.Tensor:
    """timm Block.forward written out, with optional edits at the three delta points."""
    a = block.ls1(block.attn(block.norm1(x)))
    if attn is not None:
        a = a + attn(a)
    h = x + a
    m = block.ls2(block.mlp(block.norm2(h)))
    if mlp is not None:
        m = m + mlp(m)
    out = h + m
    return out if parallel is None else out + parallel(h)


def test_each_delta_point_sees_the_exact_tensor():
    model = tiny_vit()
    block = model.blocks[1]
    x = torch.randn(2, 17, 32)
    stock = {"attn": lambda a: 0.3 * a.square(), "mlp": lambda m: torch.sin(m), "parallel": lambda h: 0.5 * h}
    site = vit_block_site(model)
    site.add_editor(model, "attn_branch", "t", lambda b, a: stock["attn"](a) if b.index == 1 else None)
    site.add_editor(model, "mlp_branch", "t", lambda b, m: stock["mlp"](m) if b.index == 1 else None)
    site.add_editor(model, "parallel_mlp", "t", lambda b, h: stock["parallel"](h) if b.index == 1 else None)
    with torch.no_grad():
        tuned = block(x)
        for point in ("attn_branch", "mlp_branch", "parallel_mlp"):
            site.remove_editor(model, point, "t")
        assert all_hooks(model) == 0 and not hasattr(model, "_vistune_vit_block_site")
        expected = reference_block(block, x, **stock)
        assert not torch.allclose(expected, block(x))
    torch.testing.assert_close(tuned, expected, rtol=1e-6, atol=1e-6)


def test_token_insertion_and_transform_order():
    model = tiny_vit()
    x = images()
    token = torch.randn(1, 1, 32)
    site = vit_block_site(model)

    def insert(block, t):
        return torch.cat([token.expand(t.shape[0], -1, -1), t], dim=1)

    def drop(block, t):
        return t[:, 1:]

    # registered "b" before "a": keys order the chain, so "a_insert"-style names run first
    site.add_editor(model, "block_output", "b_scale", lambda block, t: t * 2.0)
    site.add_editor(model, "block_output", "a_drop", drop)
    site.add_editor(model, "block_input", "a_insert", insert)
    with torch.no_grad():
        tuned = model.forward_features(x)
    site.remove_editor(model, "block_input", "a_insert")
    site.remove_editor(model, "block_output", "a_drop")
    site.remove_editor(model, "block_output", "b_scale")
    assert all_hooks(model) == 0
    with torch.no_grad():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks:
            t = block(insert(None, t))[:, 1:] * 2.0
        expected = model.norm(t)
    torch.testing.assert_close(tuned, expected, rtol=1e-6, atol=1e-6)


def test_unknown_point_and_duplicate_key():
    model = tiny_vit()
    site = vit_block_site(model)
    with pytest.raises(ValueError, match="unknown ViT block point"):
        site.add_editor(model, "nowhere", "k", lambda b, t: None)
    site.add_editor(model, "mlp_branch", "k", lambda b, t: None)
    with pytest.raises(KeyError, match="already registered"):
        site.add_editor(model, "mlp_branch", "k", lambda b, t: None)
    site.remove_editor(model, "mlp_branch", "k")
    assert all_hooks(model) == 0


def test_deepcopy_carries_its_own_site_and_hooks():
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        base = model(x)
    randomize(vistune.attach(model, AdapterConfig(style="houlsby", bottleneck=4)))
    with torch.no_grad():
        tuned = model(x)
    clone = copy.deepcopy(model)
    assert clone._vistune_vit_block_site is not model._vistune_vit_block_site
    with torch.no_grad():
        assert torch.equal(clone(x), tuned)
        vistune.detach(clone)
        assert torch.equal(clone(x), base) and all_hooks(clone) == 0
        assert torch.equal(model(x), tuned)  # the original keeps its tuner
