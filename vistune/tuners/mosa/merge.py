"""Fold a MoSA tuner's experts into one plain adapter attached under the same name."""

from __future__ import annotations

from torch import nn

from ...core.errors import TunerError
from ...core.model import get_tuner, replace_tuner, unwrap
from ..adapter.model import AdapterTuner
from .model import MoSATuner


def merge_mosa(model: nn.Module, name: str = "default", mode: str | None = None) -> AdapterTuner:
    """Replace the MoSA tuner ``name`` by a plain :class:`AdapterTuner` holding its merged experts.

    ``mode`` (``"add"`` or ``"joint"``) defaults to the tuner's ``merge_mode``. The adapter keeps the name,
    run-time scale, train/eval mode and trainability, has exactly a plain adapter's parameters and FLOPs, and
    saves/loads as tuner type ``"adapter"``. With the default mode its outputs equal the MoSA tuner's eval
    outputs. Raises :class:`TunerError` (changing nothing) when ``name`` is not a MoSA tuner.
    """
    model = unwrap(model)
    tuner = get_tuner(model, name)
    if not isinstance(tuner, MoSATuner):
        raise TunerError(
            f"tuner {name!r} is a {type(tuner).__name__}, which has no MoSA experts to merge; "
            "merge_mosa needs a tuner attached with MoSAConfig"
        )
    if mode is not None and mode not in ("add", "joint"):
        raise TunerError(f"merge mode must be 'add' or 'joint', got {mode!r}")
    adapter = AdapterTuner(tuner.config.adapter_config(), model)
    reference = next(tuner.parameters())
    adapter.to(device=reference.device, dtype=reference.dtype)
    adapter.load_state_dict(tuner.merged_adapter_state(mode), strict=True)
    return replace_tuner(model, name, adapter)
