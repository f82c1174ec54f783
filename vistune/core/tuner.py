"""The base class every tuner derives from."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Iterable

from torch import nn

from .config import TunerConfig, real_field
from .errors import TunerError


class Tuner(nn.Module):
    """A small trainable module that attaches to a backbone without editing the backbone's code or weights.

    A subclass sizes its parameters from the backbone in ``__init__(config, backbone)`` (raising
    :class:`~vistune.core.errors.BackboneMismatchError` for a backbone it cannot serve), records in
    ``self.layout`` a JSON description of the sites it was sized for (saved beside the weights and compared at
    load time), and adds/removes its hooks in :meth:`install` / :meth:`uninstall`. The attach API in
    :mod:`vistune.core.model` owns the lifecycle; a tuner never changes ``requires_grad`` of the backbone.
    """

    config_class: ClassVar[type[TunerConfig]] = TunerConfig

    def __init__(self, config: TunerConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TunerError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = copy.deepcopy(config)  # each tuner owns its config; the caller's object stays untouched
        self.name = "default"
        self.layout: dict[str, Any] = {}
        self._scale = self.config.scale

    @property
    def scale(self) -> float:
        """Run-time strength: 0 disables the tuner exactly, 1 is the trained strength.

        Starts at ``config.scale``; changing it (``vistune.set_scale``) does not change the saved config.
        """
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = real_field("scale", value)

    def install(self, backbone: nn.Module) -> None:
        """Register the hooks that route the backbone's activations through this tuner."""
        raise NotImplementedError

    def uninstall(self, backbone: nn.Module) -> None:
        """Remove every hook :meth:`install` registered."""
        raise NotImplementedError

    def backbone_parameters_to_train(self, backbone: nn.Module) -> Iterable[nn.Parameter]:
        """Backbone parameters this method trains besides its own (e.g. LayerNorms); none by default."""
        return ()

    def merge(self, backbone: nn.Module) -> None:
        """Fold the tuner into the backbone's weights. Only linear tuners (adapters after merge) can."""
        raise TunerError(
            f"{type(self).__name__} cannot be merged into the backbone: its update is not a linear weight change. "
            "Keep it attached (set_scale(model, 0) turns it off) or detach it."
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, scale={self.scale}"
