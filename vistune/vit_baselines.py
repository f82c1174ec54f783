"""The baselines every ViT tuner is measured against: full fine-tuning, linear probing and peft LoRA.

One function sets a timm ViT up for a baseline so that HST, the adapter family and their benchmarks compare
against the same thing. The task head (or any other module named in ``train_modules``) is always trained.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

VIT_BASELINES = ("full", "linear", "lora")
# peft LoRA on every block's attention and MLP projections (not the patch embedding's conv, also named "proj").
VIT_LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def prepare_vit_baseline(
    model: nn.Module,
    method: str,
    *,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_targets: str | Sequence[str] = VIT_LORA_TARGETS,
    train_modules: Sequence[str] = ("head",),
) -> nn.Module:
    """Set ``model`` up for ``method`` in place and return it (peft injects LoRA layers into the same object).

    ``full``: every parameter trains. ``linear``: only ``train_modules`` train. ``lora``: peft LoRA (``r =
    lora_rank``, alpha = rank unless given, B zero-initialised so the output is unchanged at start) on
    ``lora_targets``, plus ``train_modules``. Names in ``train_modules`` that the model lacks are an error.
    """
    if method not in VIT_BASELINES:
        raise ValueError(f"unknown ViT baseline {method!r}; expected one of {VIT_BASELINES}")
    named = dict(model.named_modules())
    missing = [name for name in train_modules if name not in named]
    if missing:
        raise ValueError(f"{type(model).__name__} has no module(s) {missing} to train")
    if method == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_targets if isinstance(lora_targets, str) else list(lora_targets)
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=targets)
        inject_adapter_in_model(config, model)  # leaves only the new lora_A / lora_B trainable
    for name in train_modules:
        named[name].requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, in module order."""
    return [p for p in model.parameters() if p.requires_grad]
