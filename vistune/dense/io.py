"""A trained task model as one folder: ``task_config.json`` (how to rebuild it) + ``task_model.safetensors``.

The folder is self-contained (the ViT's weights are in it too), so a pipeline loads it with nothing else.
Both files are written atomically; only JSON and safetensors are used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..core.errors import CheckpointError
from ..core.serialization import atomic_write
from ..tuners.hst import HSTConfig
from .factory import build_task_model

CONFIG_FILE = "task_config.json"
WEIGHTS_FILE = "task_model.safetensors"


def vit_spec(vit: nn.Module) -> dict[str, Any]:
    """What rebuilds ``vit``'s architecture with timm: ``{"architecture", "model_args"}``."""
    args = getattr(vit, "_vistune_model_args", None)
    arch = getattr(vit, "_vistune_architecture", None) or (getattr(vit, "pretrained_cfg", None) or {}).get("architecture")
    if args is None or arch is None:
        raise ValueError("the ViT was not built by vistune.dense.io.create_vit, so its timm arguments are unknown")
    return {"architecture": arch, "model_args": args}


def create_vit(source: str, **overrides: Any) -> nn.Module:
    """A timm ViT from ``source``: a local folder with timm's ``config.json`` + weights (``local-dir`` layout, e.g.
    the shipped ``assets/tiny-vit-shapes``), or ``timm:<architecture>`` for random weights (no download).
    ``overrides`` are timm ``create_model`` arguments (e.g. ``img_size``)."""
    import timm

    if source.startswith("timm:"):
        arch = source[len("timm:"):]
        args = dict(overrides)
        vit = timm.create_model(arch, pretrained=False, **args)
    else:
        folder = Path(source)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} is not a timm model folder (no config.json); or pass timm:<architecture>")
        config = json.loads(config_file.read_text())
        arch = config["architecture"]
        args = {**config.get("model_args", {}), **overrides}
        vit = timm.create_model(f"local-dir:{folder}", pretrained=True, **overrides)
    vit._vistune_architecture = arch
    vit._vistune_model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    return vit


def save_task_model(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    vit: nn.Module,
    task: str,
    method: str,
    num_classes: int,
    class_names: list[str] | tuple[str, ...],
    build_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (built by :func:`build_task_model` on ``vit``) and how to rebuild it to ``folder``."""
    from ..dense.pyramid import vit_normalization

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_kwargs = dict(build_kwargs or {})
    if isinstance(build_kwargs.get("hst_config"), HSTConfig):
        build_kwargs["hst_config"] = build_kwargs["hst_config"].to_dict()
    mean, std = vit_normalization(vit)
    build_kwargs.setdefault("mean", mean)
    build_kwargs.setdefault("std", std)
    config = {
        "task": task, "method": method, "num_classes": num_classes, "class_names": list(class_names),
        "image_size": [int(s) for s in vit.patch_embed.img_size], "vit": vit_spec(vit), "build": build_kwargs,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = safetensors.torch.save(state, metadata={"format": "pt"})
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: Path(tmp).write_bytes(data))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def load_task_model(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a task model saved by :func:`save_task_model`; returns ``(model in eval mode, config)``."""
    import timm

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise CheckpointError(f"{folder} is not a task-model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(config_file.read_text())
        spec = config["vit"]
        build = dict(config["build"])
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{config_file} is not a valid task config: {err}") from err
    vit = timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])
    vit._vistune_architecture, vit._vistune_model_args = spec["architecture"], spec["model_args"]
    if build.get("hst_config") is not None:
        build["hst_config"] = HSTConfig.from_dict(build["hst_config"])
    model = build_task_model(vit, config["task"], config["method"], config["num_classes"], **build)
    try:
        model.load_state_dict(safetensors.torch.load_file(str(weights_file)), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_file} does not fit the model its config describes: {err}") from err
    return model.eval(), config
