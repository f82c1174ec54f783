"""Set the condition image each CSC-Tuner reads in the following U-Net calls."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.errors import TunerError
from ...core.model import list_tuners, unwrap
from .model import CSCTuner


def csc_tuners(unet: nn.Module) -> dict[str, CSCTuner]:
    """The CSC-Tuners attached to ``unet``, by name."""
    return {name: tuner for name, tuner in list_tuners(unwrap(unet)).items() if isinstance(tuner, CSCTuner)}


def _select(unet: nn.Module, name: str | None) -> CSCTuner:
    tuners = list_tuners(unwrap(unet))
    controls = {n: t for n, t in tuners.items() if isinstance(t, CSCTuner)}
    if name is None:
        if len(controls) == 1:
            return next(iter(controls.values()))
        if not controls:
            raise TunerError(f"{type(unet).__name__} has no CSC-Tuner attached (attached: {sorted(tuners) or 'none'})")
        raise TunerError(f"several CSC-Tuners are attached ({sorted(controls)}); pass name= to choose one")
    if name not in tuners:
        raise TunerError(f"no tuner named {name!r} is attached; CSC-Tuners attached: {sorted(controls) or 'none'}")
    if name not in controls:
        raise TunerError(f"tuner {name!r} is a {type(tuners[name]).__name__}, not a CSC-Tuner; it takes no control image")
    return controls[name]


def control_tensor(image: Any, in_channels: int = 3) -> torch.Tensor:
    """``image`` as a B x C x H x W floating tensor in [0, 1] with ``in_channels`` channels, or a clear error.

    Tensors (CHW or BCHW; float in [0, 1] or uint8) are used as they are (no copy when already right);
    PIL images, numpy arrays and lists go through :func:`vistune.conditions.to_image_tensor`. With 3 channels
    expected, a one-channel map is repeated and an alpha channel dropped.
    """
    if not isinstance(image, torch.Tensor):
        from ...conditions import to_image_tensor  # opencv/PIL only when needed

        image = to_image_tensor(image)
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or min(image.shape) < 1:
        raise TunerError(f"control image must be C x H x W or B x C x H x W, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    elif not image.is_floating_point():
        raise TunerError(f"control image must be a float tensor in [0, 1] (or uint8), got dtype {image.dtype}")
    channels = image.shape[1]
    if channels != in_channels:
        if in_channels == 3 and channels == 1:
            image = image.expand(-1, 3, -1, -1)
        elif in_channels == 3 and channels == 4:
            image = image[:, :3]
        else:
            raise TunerError(f"control image has {channels} channels; this CSC-Tuner expects {in_channels}")
    low, high = torch.aminmax(image.detach().float())
    if not (torch.isfinite(low) and torch.isfinite(high)) or low < 0 or high > 1:
        raise TunerError(
            f"control image values must lie in [0, 1], got min {low.item():.4g} and max {high.item():.4g} "
            "(condition maps from vistune.conditions already are; divide uint8 images by 255)"
        )
    return image


def set_control(unet: nn.Module, image: Any, name: str | None = None) -> None:
    """Set the control image of the CSC-Tuner ``name`` for the following U-Net calls (``None`` clears it).

    ``image``: B x 3 x H x W float tensor in [0, 1] (or CHW, uint8, a PIL image, a numpy array), with H x W =
    ``vae_scale_factor`` (8 for SD) times the latent size of the calls it is used in; this is checked at each
    call, with an error naming both sizes. The U-Net batch may equal the image batch, or the image batch may be
    1 (broadcast), or the U-Net batch may be twice the image batch (classifier-free guidance: the images repeat).
    Without a control image a CSC-Tuner adds nothing, so pipelines can run uncontrolled.

    ``name`` may be omitted when exactly one CSC-Tuner is attached; ``set_control(unet, None)`` without a name
    clears every CSC-Tuner. Invalid input raises before anything changes.
    """
    if image is None and name is None:
        for tuner in csc_tuners(unet).values():
            tuner.set_control_image(None)
        return
    tuner = _select(unet, name)
    if image is None:
        tuner.set_control_image(None)
        return
    image = control_tensor(image, tuner.config.in_channels)
    factor = tuner.config.vae_scale_factor
    if image.shape[-2] % factor or image.shape[-1] % factor:
        raise TunerError(
            f"control image of {tuner.name!r} is {image.shape[-2]}x{image.shape[-1]}, not a multiple of the VAE "
            f"factor {factor}; it must be {factor} x the latent size"
        )
    tuner.set_control_image(image)


def get_control(unet: nn.Module, name: str | None = None) -> torch.Tensor | None:
    """The control image the CSC-Tuner ``name`` reads (``None`` when none is set)."""
    return _select(unet, name).control
