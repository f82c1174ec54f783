"""Pickle-free, atomic training checkpoints: models and optimizer tensors as safetensors, the rest as JSON.

A checkpoint is a folder ``checkpoint-<step>/`` written under a temporary name and renamed into place when
complete, so a killed run never leaves a half-written checkpoint that :func:`latest_checkpoint` would pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from torch import nn

from .core.errors import CheckpointError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    models: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and keep at most ``total_limit`` checkpoints."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(state, str(tmp / f"{name}.safetensors"))
    record: dict[str, Any] = {"step": step, "extra": dict(extra or {})}
    if optimizer is not None:
        tensors, meta = _optimizer_payload(optimizer)
        safetensors.torch.save_file(tensors, str(tmp / "optimizer.safetensors"))
        record["optimizer"] = meta
    safetensors.torch.save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(output_dir: str | Path, spec: str | None) -> Path | None:
    """The checkpoint a ``--resume_from_checkpoint`` value names: ``None``/empty for a fresh run, ``"latest"`` for
    the newest one in ``output_dir`` (``None`` if there is none), else a folder, absolute or inside ``output_dir``.

    A path that is not a checkpoint raises ``FileNotFoundError`` before the run writes anything."""
    if not spec:
        return None
    output_dir = Path(output_dir)
    if spec == "latest":
        return latest_checkpoint(output_dir)
    path = Path(spec)
    for candidate in (path, output_dir / path):
        if (candidate / "state.json").is_file():
            return candidate
    existing = [p.name for p in list_checkpoints(output_dir)]
    raise FileNotFoundError(
        f"--resume_from_checkpoint {path}: no checkpoint there (a checkpoint-<step> folder with state.json; "
        f"checkpoints in {output_dir}: {existing or 'none'})"
    )


def _read_state(path: Path) -> dict[str, Any]:
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no state.json)")
    try:
        return json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_file} is corrupt ({err}); resume from another checkpoint") from None


def checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` a checkpoint was saved with (seed, flags, ...), read without loading any weights, so a script
    can set itself up as the interrupted run before building anything."""
    return _read_state(Path(path))["extra"]


def load_checkpoint(
    path: str | Path,
    models: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Restore models, optimizer and torch RNG from a checkpoint folder; returns ``{"step", "extra"}``."""
    path = Path(path)
    record = _read_state(path)
    for name, model in models.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{path} has no weights for {name!r}")
        model.load_state_dict(safetensors.torch.load_file(str(file)), strict=True)
    if optimizer is not None:
        if "optimizer" not in record:
            raise CheckpointError(f"{path} holds no optimizer state")
        tensors = safetensors.torch.load_file(str(path / "optimizer.safetensors"))
        meta = record["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for index, values in meta["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(safetensors.torch.load_file(str(path / "rng.safetensors"))["torch"])
    return {"step": record["step"], "extra": record["extra"]}


def resume_training(
    resume: str | Path | None,
    models: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any = None,
    log: Any = print,
) -> int:
    """Restore a run from ``resume`` (a checkpoint folder, or ``None`` for a fresh run) with :func:`load_checkpoint`,
    plus the learning-rate schedule the training scripts save under ``extra["lr_scheduler"]``; returns the first
    step to run."""
    if resume is None:
        return 0
    state = load_checkpoint(resume, models, optimizer)
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["extra"]["lr_scheduler"])
    log(f"resumed from {resume} at step {state['step']}")
    return state["step"]
