"""One factory for every (task, method) pair, so HST and the baselines train in the same loop."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.model import attach
from ..tuners.hst import HSTConfig
from ..vit_baselines import VIT_BASELINES, prepare_vit_baseline
from .heads import build_detector
from .models import Classifier, Segmenter
from .pyramid import FPNBackbone, HSTPyramid, ViTSimplePyramid, vit_normalization

TASKS = ("classify", "segment", "detect")
METHODS = ("hst",) + VIT_BASELINES


def build_task_model(
    vit: nn.Module,
    task: str,
    method: str,
    num_classes: int,
    *,
    hst_config: HSTConfig | None = None,
    detector: str = "fcos",
    fpn_channels: int = 64,
    lora_rank: int = 8,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    **detector_kwargs: Any,
) -> nn.Module:
    """A model for ``task`` on ``vit`` (changed in place: tuner attached or baseline set up) taking [0, 1] images.

    ``num_classes``: classes of the task: ``classify`` K labels; ``segment`` K mask ids including background 0;
    ``detect`` K object classes with labels 1..K (the detector gets K + 1 outputs, torchvision's convention).
    ``method``: ``hst`` attaches :class:`HSTConfig` (``hst_config`` overrides; its head is sized for
    ``classify``); ``full``/``linear``/``lora`` use :func:`vistune.vit_baselines.prepare_vit_baseline`, with the
    ViT's own head for ``classify`` and a simple pyramid of its last map for dense tasks. FPN and task heads are
    new modules and always train. ``mean``/``std``: input normalisation (default: the ViT's pretrained_cfg).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    default_mean, default_std = vit_normalization(vit)
    mean, std = list(mean or default_mean), list(std or default_std)
    if method == "hst":
        config = hst_config or HSTConfig()
        config = HSTConfig.from_dict({**config.to_dict(), "num_classes": num_classes if task == "classify" else 0})
        attach(vit, config)
    elif task == "classify":
        vit.reset_classifier(num_classes)
        prepare_vit_baseline(vit, method, lora_rank=lora_rank, train_modules=("head",))
    else:
        prepare_vit_baseline(vit, method, lora_rank=lora_rank, train_modules=())
    if task == "classify":
        return Classifier(vit, mean, std)
    pyramid = HSTPyramid(vit) if method == "hst" else ViTSimplePyramid(vit)
    backbone = FPNBackbone(pyramid, fpn_channels)
    if task == "segment":
        return Segmenter(backbone, num_classes, mean, std, hidden=fpn_channels)
    size = tuple(int(s) for s in vit.patch_embed.img_size)
    return build_detector(backbone, num_classes + 1, size, mean, std, arch=detector, **detector_kwargs)


def task_trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a task model that train (tuner or baseline set, FPN and heads)."""
    return [p for p in model.parameters() if p.requires_grad]
