"""Which sampling steps a tuner acts on, in the convention of diffusers' ``control_guidance_start`` / ``end``."""

from __future__ import annotations


def in_step_window(i: int, total: int, start: float, end: float) -> bool:
    """Whether step ``i`` of ``total`` (0 = the first, noisiest) lies in the window ``start``-``end``, fractions of
    the steps: as diffusers' ControlNet pipelines decide where control acts."""
    return start <= i / total and (i + 1) / total <= end
