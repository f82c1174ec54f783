"""Tuner configs: dataclasses with a ``tuner_type`` key that round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from numbers import Integral, Real
from typing import Any, ClassVar

from .errors import TunerError


@dataclasses.dataclass
class TunerConfig:
    """Base class of every tuner config.

    Subclasses are dataclasses that set the class variable ``tuner_type`` and register themselves with
    :func:`vistune.core.registry.register_tuner`. ``scale`` is the inference strength every tuner has
    (0 turns the tuner off exactly); it is part of the config so a saved tuner comes back at its strength.
    """

    tuner_type: ClassVar[str] = ""
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.scale = real_field("scale", self.scale)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types, with its ``tuner_type``."""
        return {"tuner_type": self.tuner_type, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TunerConfig":
        """Build the config class named by ``data["tuner_type"]`` (or ``cls`` itself when it is concrete)."""
        from .registry import get_tuner_entry

        data = dict(data)
        tuner_type = data.pop("tuner_type", cls.tuner_type)
        if not tuner_type:
            raise TunerError("config has no 'tuner_type'; cannot tell which tuner it configures")
        config_cls = get_tuner_entry(tuner_type).config_class
        if cls is not TunerConfig and not issubclass(config_cls, cls):
            raise TunerError(f"config is for tuner type {tuner_type!r}, not {cls.tuner_type!r}")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TunerError(
                f"unknown field(s) {unknown} for {config_cls.__name__}; known fields: {sorted(known)}"
            )
        try:
            return config_cls(**data)
        except TypeError as err:  # e.g. a required field missing
            raise TunerError(f"cannot build {config_cls.__name__}: {err}") from err

    @classmethod
    def from_json(cls, text: str) -> "TunerConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TunerError(f"tuner config is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise TunerError("tuner config JSON must be an object")
        return cls.from_dict(data)


def real_field(name: str, value: Any) -> float:
    """``value`` as a finite float, or a :class:`TunerError` naming the field."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TunerError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def index_list_field(name: str, value: Any, allow_negative: bool = False) -> list[int]:
    """``value`` as a sorted list of distinct ints (non-negative unless ``allow_negative``: Python-style indices
    counted from the end), or a :class:`TunerError` naming the field."""
    if not isinstance(value, (list, tuple)) or not value:
        raise TunerError(f"{name} must be a non-empty list of indices, got {value!r}")
    lowest = -math.inf if allow_negative else 0
    if any(isinstance(v, bool) or not isinstance(v, Integral) or v < lowest for v in value) or len(set(value)) != len(value):
        kind = "integers" if allow_negative else "non-negative integers"
        raise TunerError(f"{name} must hold distinct {kind}, got {value!r}")
    return sorted(int(v) for v in value)
