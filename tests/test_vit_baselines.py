import pytest
import timm
import torch

from vistune.vit_baselines import prepare_vit_baseline, trainable_parameters


def tiny_vit(num_classes=5):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=num_classes)


def test_full_trains_everything():
    model = prepare_vit_baseline(tiny_vit(), "full")
    assert all(p.requires_grad for p in model.parameters())


def test_linear_trains_only_the_head():
    model = prepare_vit_baseline(tiny_vit(), "linear")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["head.weight", "head.bias"]


def test_lora_targets_block_projections_only_and_starts_at_identity():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    before = model(x)
    prepare_vit_baseline(model, "lora", lora_rank=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in names if "lora_" in n]
    # 2 blocks x (qkv, proj, fc1, fc2) x (A, B); the patch embedding's conv "proj" is not a target
    assert len(lora) == 16 and not any(n.startswith("patch_embed") for n in lora)
    assert set(names) - set(lora) == {"head.weight", "head.bias"}
    a = model.blocks[0].attn.qkv.lora_A["default"].weight
    assert a.shape == (4, 32)
    assert torch.equal(model(x), before)  # B = 0 at init
    assert sum(p.numel() for p in trainable_parameters(model)) == 2 * (4 * (32 + 96) + 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32)) + 5 * 32 + 5


def test_bad_method_and_missing_head():
    with pytest.raises(ValueError, match="expected one of"):
        prepare_vit_baseline(tiny_vit(), "prompt")
    with pytest.raises(ValueError, match="no module"):
        prepare_vit_baseline(tiny_vit(), "linear", train_modules=("classifier",))
