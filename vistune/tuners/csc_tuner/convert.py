"""Read official SCEdit CSC-Tuner checkpoints (scepter ``control_blocks.{k}.{pre_hint,dense_hint,lsc_tuner}_blocks``).

Official keys (scepter ``CSCTuners``), optionally behind ``model.`` / ``control_blocks.{k}.`` (scepter's own
loader also accepts them bare or behind ``0.``):

- ``pre_hint_blocks.{j}.{weight,bias}``, j = 0, 2, ..., 12 (SiLU at odd indices) -> ``condition_encoder.{j}.*``
- ``dense_hint_blocks.{i}.1.{weight,bias}``, i in encoder order (index 0 is SiLU) -> ``feature_convs.{i}.*``
- ``lsc_tuner_blocks.{m}.tuner_op.ln{1,2}.{weight,bias}``, m in decoder order, 0 = deepest -> ``skips.{m}.ln*``
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ...core.errors import CheckpointError, TunerError
from .config import ENCODER_WIDTHS, CSCTunerConfig

_KEY = re.compile(
    r"^(?P<prefix>(?:[A-Za-z_]\w*\.)*?)(?:(?P<block>\d+)\.)?"
    r"(?P<part>pre_hint_blocks|dense_hint_blocks|lsc_tuner_blocks)\.(?P<rest>.+)$"
)
_RESTS = {
    "pre_hint_blocks": (re.compile(r"^(\d+)\.(weight|bias)$"), "condition_encoder.{0}.{1}"),
    "dense_hint_blocks": (re.compile(r"^(\d+)\.1\.(weight|bias)$"), "feature_convs.{0}.{1}"),
    "lsc_tuner_blocks": (re.compile(r"^(\d+)\.(?:[^.]+\.)?tuner_op\.(ln[12]\.(?:weight|bias))$"), "skips.{0}.{1}"),
}


def _blocks(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]] | None:
    """Group the keys by condition block (``prefix + k``), renamed to vistune keys; None if not this layout."""
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _KEY.match(key)
        if match is None:
            return None
        pattern, template = _RESTS[match["part"]]
        rest = pattern.match(match["rest"])
        if rest is None:
            raise CheckpointError(f"official CSC-Tuner checkpoint has an unexpected key {key!r}")
        block = f"{match['prefix']}{match['block'] or ''}".rstrip(".")
        converted = blocks.setdefault(block, {})
        new_key = template.format(int(rest.group(1)), rest.group(2))
        if new_key in converted:
            raise CheckpointError(f"official CSC-Tuner checkpoint holds {new_key} twice (key {key!r})")
        converted[new_key] = value
    return blocks or None


def _require(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"official CSC-Tuner checkpoint is incomplete: no weights for {key}")
    return state[key]


def _infer_config(state: Mapping[str, torch.Tensor]) -> CSCTunerConfig:
    first = _require(state, "condition_encoder.0.weight")
    last = _require(state, "condition_encoder.12.weight")
    dense = _require(state, "feature_convs.0.weight")
    ln1 = _require(state, "skips.0.ln1.weight")
    try:
        config = CSCTunerConfig(
            condition_channels=int(last.shape[0]),
            encoder_width_ratio=first.shape[0] / ENCODER_WIDTHS[0],
            in_channels=int(first.shape[1]),
            dense_kernel_size=int(dense.shape[-1]),
            down_ratio=ln1.shape[0] / ln1.shape[1],
        )
    except TunerError as err:
        raise CheckpointError(f"official CSC-Tuner checkpoint has unsupported sizes: {err}") from err
    widths = [int(_require(state, f"condition_encoder.{2 * j}.weight").shape[0]) for j in range(7)]
    if widths != config.encoder_widths():
        raise CheckpointError(
            f"official CSC-Tuner encoder widths {widths} are not 16/16/32/32/96/96 times one ratio, then the output"
        )
    for key, value in state.items():
        if key.startswith("skips.") and key.endswith("ln1.weight") and config.hidden_width(value.shape[1]) != value.shape[0]:
            raise CheckpointError(f"official CSC-Tuner checkpoint mixes MLP ratios ({key}: {tuple(value.shape)})")
    return config


def official_csc_blocks(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Every condition block of an official CSC checkpoint (e.g. ``model.control_blocks.0``), renamed to vistune keys.

    A scepter model trained with several conditions holds one block per condition; convert each with
    :func:`convert_official_csc_state_dict` (``block=...``) and attach it under its own name.
    """
    blocks = _blocks(state)
    if blocks is None:
        raise CheckpointError("not an official CSC-Tuner checkpoint (no pre_hint/dense_hint/lsc_tuner_blocks keys)")
    return blocks


def convert_official_csc_state_dict(
    state: Mapping[str, torch.Tensor], block: str | None = None
) -> tuple[CSCTunerConfig, dict[str, torch.Tensor]] | None:
    """Map an official CSC-Tuner state dict onto :class:`CSCTuner` keys; ``None`` when not in that layout.

    ``block`` picks one condition of a multi-condition checkpoint (a key prefix such as
    ``"model.control_blocks.1"``); without it the checkpoint must hold exactly one. The VAE factor is not stored
    in the weights; SCEdit's 8 is assumed (change ``config.vae_scale_factor`` before building for other VAEs).
    """
    blocks = _blocks(state)
    if blocks is None:
        return None
    if block is None:
        if len(blocks) > 1:
            raise CheckpointError(
                f"official CSC checkpoint holds {len(blocks)} conditions ({sorted(blocks)}); convert them one by one "
                "with vistune.tuners.csc_tuner.convert_official_csc_state_dict(state, block=...)"
            )
        block = next(iter(blocks))
    block = block.rstrip(".")
    if block not in blocks:
        raise CheckpointError(f"official CSC checkpoint has no condition block {block!r}; it has {sorted(blocks)}")
    converted = blocks[block]
    return _infer_config(converted), converted
