"""Read official SCEdit SC-Tuner checkpoints (scepter ``lsc_identity.{m}.tuner_op.*``, swift variants)."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ...core.errors import CheckpointError
from .config import SCTunerConfig

# scepter: [model.]lsc_identity.{m}.tuner_op.ln1.weight; swift adds one segment: lsc_identity.{m}.scetuner_x.tuner_op...
_OFFICIAL_KEY = re.compile(r"^(?:.+\.)?lsc_identity\.(\d+)\.(?:[^.]+\.)?tuner_op\.(ln[12]\.(?:weight|bias))$")


def convert_official_sc_state_dict(
    state: Mapping[str, torch.Tensor],
) -> tuple[SCTunerConfig, dict[str, torch.Tensor]] | None:
    """Map an official SC-Tuner state dict onto :class:`SCTuner` keys (``skips.{m}.ln1.weight``).

    Returns ``None`` when the keys are not in the official layout. ``m`` is SCEdit's decoder index
    (0 = deepest skip), the same index vistune uses, so no reordering is needed.
    """
    matches = {key: _OFFICIAL_KEY.match(key) for key in state}
    if not matches or not all(matches.values()):
        return None
    converted: dict[str, torch.Tensor] = {}
    for key, match in matches.items():
        new_key = f"skips.{int(match.group(1))}.{match.group(2)}"
        if new_key in converted:
            raise CheckpointError(f"official SC-Tuner checkpoint holds {new_key} twice (several adapters?)")
        converted[new_key] = state[key]
    indices = sorted({int(m.group(1)) for m in matches.values()})
    widths = {m: tuple(converted[f"skips.{m}.ln1.weight"].shape) for m in indices if f"skips.{m}.ln1.weight" in converted}
    if len(widths) != len(indices):
        raise CheckpointError("official SC-Tuner checkpoint is incomplete: some skip lacks ln1.weight")
    hidden, channels = widths[indices[0]]
    config = SCTunerConfig(down_ratio=hidden / channels, target_skips=indices)
    for m, (h, c) in widths.items():
        if config.hidden_width(c) != h:
            raise CheckpointError(
                f"official SC-Tuner checkpoint mixes hidden ratios (skip {m}: {h}/{c}); vistune needs one down_ratio"
            )
    return config, converted
