"""The tuner registry: maps a ``tuner_type`` name to its config class, tuner class and checkpoint converters."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from .errors import TunerError

if TYPE_CHECKING:
    from .config import TunerConfig
    from .tuner import Tuner

#: Reads a foreign state dict (e.g. an official release) and returns ``(config, vistune state dict)``,
#: or ``None`` when the keys are not in its layout.
Converter = Callable[[Mapping[str, torch.Tensor]], "tuple[TunerConfig, dict[str, torch.Tensor]] | None"]


@dataclasses.dataclass(frozen=True)
class TunerEntry:
    tuner_type: str
    config_class: type["TunerConfig"]
    tuner_class: type["Tuner"]
    converters: tuple[Converter, ...] = ()


_REGISTRY: dict[str, TunerEntry] = {}


def register_tuner(
    config_class: type["TunerConfig"],
    tuner_class: type["Tuner"],
    converters: tuple[Converter, ...] = (),
) -> None:
    """Make a tuner available to :func:`vistune.attach` and :func:`vistune.load_tuners` by its type name."""
    tuner_type = config_class.tuner_type
    if not tuner_type:
        raise TunerError(f"{config_class.__name__} must set the class variable 'tuner_type'")
    existing = _REGISTRY.get(tuner_type)
    if existing is not None and (existing.config_class, existing.tuner_class) != (config_class, tuner_class):
        raise TunerError(f"tuner type {tuner_type!r} is already registered by {existing.config_class.__name__}")
    _REGISTRY[tuner_type] = TunerEntry(tuner_type, config_class, tuner_class, tuple(converters))


def get_tuner_entry(tuner_type: str) -> TunerEntry:
    try:
        return _REGISTRY[tuner_type]
    except KeyError:
        raise TunerError(f"unknown tuner type {tuner_type!r}; registered types: {sorted(_REGISTRY)}") from None


def registered_tuners() -> dict[str, TunerEntry]:
    """All registered tuners by type name."""
    return dict(_REGISTRY)
