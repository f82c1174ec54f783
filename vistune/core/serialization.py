"""Save and load tuners: ``tuner_config.json`` + ``tuner_model.safetensors`` per tuner, written atomically.

Only safetensors and JSON are written. Foreign checkpoints (official releases) are read from ``.safetensors``
or, for ``.pt/.pth/.bin/.ckpt``, with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects; a registered converter then maps their keys onto a vistune tuner.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import safetensors.torch
import torch
from torch import nn

from .config import TunerConfig
from .errors import BackboneMismatchError, CheckpointError, TunerError
from .model import add_tuner, build_tuner, check_name, detach, select_tuners, unwrap
from .registry import registered_tuners
from .tuner import Tuner

CONFIG_NAME = "tuner_config.json"
WEIGHTS_NAME = "tuner_model.safetensors"
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file over ``path``; on failure ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _version() -> str:
    from .. import __version__

    return __version__


def _save_one(tuner: Tuner, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in tuner.state_dict().items()}
    metadata = {"format": "pt", "tuner_type": tuner.config.tuner_type}
    data = safetensors.torch.save(state, metadata=metadata)
    record = {
        "name": tuner.name,
        "tuner_type": tuner.config.tuner_type,
        "config": tuner.config.to_dict(),
        "layout": tuner.layout,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "vistune_version": _version(),
    }
    # Each file is replaced atomically; the config names the hash of its weights, so a save interrupted
    # between the two renames is detected at load instead of pairing new weights with an old config.
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(data))
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def save_tuners(model: nn.Module, save_directory: str | os.PathLike, name: str | Iterable[str] | None = None) -> Path:
    """Save the named tuners (all when ``name`` is None) and return the directory.

    One tuner is written at the top of ``save_directory``; several go to ``save_directory/<name>/`` each.
    """
    tuners = select_tuners(model, name)
    root = Path(save_directory)
    if len(tuners) == 1:
        _save_one(next(iter(tuners.values())), root)
    else:
        for tuner_name, tuner in tuners.items():
            _save_one(tuner, root / tuner_name)
    return root


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or (weights only, never arbitrary pickles) ``.pt/.pth/.bin/.ckpt``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    if path.suffix in _PICKLE_SUFFIXES:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{path} could not be read as a weights-only torch file (vistune never unpickles arbitrary "
                f"objects; the file may be corrupt or contain code): {err}"
            ) from err
        return _tensors_of(data, path)
    raise CheckpointError(f"{path}: unsupported checkpoint type {path.suffix!r}; use .safetensors (or .pth/.bin)")


def _tensors_of(data: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, Mapping):
        for key in ("state_dict", "model", "module"):  # common wrappers around a state dict
            inner = data.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                data = inner
                break
        tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path} holds no tensors in a state-dict layout")


def _load_weights(tuner: Tuner, state: Mapping[str, torch.Tensor], source: str) -> None:
    own = tuner.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {type(tuner).__name__}: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise BackboneMismatchError(
                f"{source}: {key} has shape {tuple(value.shape)} but this backbone needs {tuple(own[key].shape)}"
            )
    tuner.load_state_dict(state, strict=True)


def _describe_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    parts = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            parts.append(f"{key}: saved for {saved.get(key)!r}, this backbone has {current.get(key)!r}")
    return "; ".join(parts)


def _prepare_from_directory(model: nn.Module, directory: Path) -> tuple[str, Tuner]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}")
    try:
        record = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{config_path} has no 'config' object; was it written by vistune.save_tuners?")
    try:
        config = TunerConfig.from_dict(record["config"])
    except TunerError as err:
        raise CheckpointError(f"{config_path}: {err}") from err
    tuner = build_tuner(model, config)
    saved_layout = record.get("layout", {})
    if saved_layout != json.loads(json.dumps(tuner.layout)):
        raise BackboneMismatchError(
            f"{directory} was saved for another {type(model).__name__} layout: "
            + _describe_difference(saved_layout, tuner.layout)
        )
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    expected = record.get("weights_sha256")
    if expected is not None and hashlib.sha256(weights.read_bytes()).hexdigest() != expected:
        raise CheckpointError(
            f"{weights} does not match the hash recorded in {CONFIG_NAME} (an interrupted save, or files "
            "from two different saves)"
        )
    _load_weights(tuner, read_state_dict(weights), str(weights))
    return str(record.get("name") or "default"), tuner


def _prepare_from_foreign_file(model: nn.Module, path: Path) -> Tuner:
    state = read_state_dict(path)
    for entry in registered_tuners().values():
        for converter in entry.converters:
            converted = converter(state)
            if converted is not None:
                config, tuner_state = converted
                tuner = build_tuner(model, config)
                _load_weights(tuner, tuner_state, str(path))
                return tuner
    sample = sorted(state)[:5]
    raise CheckpointError(f"no registered tuner recognises the keys of {path} (first keys: {sample})")


def _prepare_folder(model: nn.Module, path: Path, name: str | None) -> list[tuple[str, Tuner]]:
    folders = sorted(p for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    if (path / CONFIG_NAME).is_file():
        if folders:
            raise CheckpointError(
                f"{path} holds a tuner at its top and tuners in {[f.name for f in folders]}; load one of them"
            )
        saved_name, tuner = _prepare_from_directory(model, path)
        return [(name or saved_name, tuner)]
    if not folders:
        raise CheckpointError(f"{path} holds no tuner: expected {CONFIG_NAME} and {WEIGHTS_NAME}, or sub-folders that do")
    if name is not None:
        raise TunerError(f"{path} holds {len(folders)} tuners; 'name' can only rename a single tuner")
    return [(folder.name, _prepare_from_directory(model, folder)[1]) for folder in folders]


def load_tuners(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    trainable: bool = False,
) -> list[str]:
    """Load tuners saved by :func:`save_tuners` (or an official checkpoint file) onto ``model``.

    ``path`` is a tuner folder, a folder of named tuner folders, or a weights file in a layout a registered
    converter knows (e.g. official SCEdit ``lsc_identity.*`` keys). ``name`` renames a single loaded tuner.
    Everything is read and checked before anything is attached, so a bad checkpoint leaves ``model`` unchanged.
    Returns the names attached.
    """
    model = unwrap(model)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        prepared = [(name or "default", _prepare_from_foreign_file(model, path))]
    else:
        prepared = _prepare_folder(model, path, name)
    for tuner_name, _ in prepared:
        check_name(model, tuner_name)
    if len({n for n, _ in prepared}) != len(prepared):
        raise TunerError(f"{path} holds several tuners with the same name")
    attached: list[str] = []
    try:
        for tuner_name, tuner in prepared:
            add_tuner(model, tuner, tuner_name, trainable=trainable)
            attached.append(tuner_name)
    except BaseException:
        if attached:
            detach(model, attached)
        raise
    return attached
