"""CSC-Tuner: a condition image steers a frozen diffusers U-Net through the skips its decoder reads."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...core.errors import BackboneMismatchError, TunerError
from ...core.tuner import Tuner
from ...sites.unet import UNetSkip, find_unet_skips, unet_skip_site
from ..sc_tuner.layer import SCAdapter
from .config import CSCTunerConfig
from .layer import ConditionEncoder, SkipFeatureConvs


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter of ``tensor`` (inference-mode tensors have none: 0)."""
    try:
        return tensor._version
    except RuntimeError:
        return 0


def batch_repeat(image_batch: int, unet_batch: int, name: str) -> int:
    """How many times the control features repeat to match the U-Net batch (1 = as is).

    Accepted: the same batch; an image batch of 1 (broadcast); a U-Net batch twice the image batch
    (classifier-free guidance: diffusers pipelines run ``cat([uncond, cond])``, so the images repeat as a block).
    """
    if image_batch == unet_batch:
        return 1
    if image_batch == 1:
        return unet_batch
    if unet_batch == 2 * image_batch:
        return 2
    accepted = f"{unet_batch} (the same), 1 (broadcast)"
    if unet_batch % 2 == 0 and unet_batch > 2:
        accepted += f" or {unet_batch // 2} (classifier-free guidance doubles the U-Net batch)"
    raise TunerError(
        f"control image of {name!r} has batch {image_batch} but the U-Net is called with batch {unet_batch}; "
        f"accepted control batches: {accepted}"
    )


class _ComputeFeatures:
    """Forward pre-hook on the U-Net: computes this call's condition features once, before any up block runs.

    A small object (not a closure) so a deepcopy of the U-Net carries hooks bound to its own tuner copy.
    """

    def __init__(self, tuner: "CSCTuner"):
        self.tuner = tuner

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs.get("sample")
        self.tuner.prepare(sample)


class _ReleaseFeatures:
    """Forward hook on the U-Net: drops this call's features (autograd keeps what backward needs)."""

    def __init__(self, tuner: "CSCTuner"):
        self.tuner = tuner

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.tuner.features = None


class CSCTuner(Tuner):
    """Condition encoder + per-skip zero convs + per-skip MLPs; skip ``m`` becomes ``x + scale * ctrl``.

    ``ctrl = c + MLP_m(x + c)`` with ``c`` the condition feature of that skip (SCEdit's CSC-Tuner). The control
    image is set with :func:`vistune.tuners.csc_tuner.set_control`; with none set, or scale 0, the tuner adds
    nothing (the U-Net runs exactly as without it), so a pipeline can run uncontrolled.

    The features are computed once per U-Net call by a forward pre-hook on the U-Net. When no gradient is
    needed (sampling) they are cached across calls, keyed on the image and the encoder's weights (their
    storage and in-place versions), so a denoising loop encodes its control image once; when training they are
    recomputed every call, since the weights change.
    """

    config_class = CSCTunerConfig

    def __init__(self, config: CSCTunerConfig, unet: "nn.Module | Sequence[UNetSkip]"):
        super().__init__(config)
        # A tuner may be sized from the skips alone (a pipeline component loaded without its U-Net); the U-Net it
        # is installed on must then have exactly these skips.
        skips = sorted(unet, key=lambda s: s.decoder_index) if not isinstance(unet, nn.Module) else find_unet_skips(unet)
        if not skips or not all(isinstance(s, UNetSkip) for s in skips):
            raise TunerError("CSCTuner needs a diffusers U-Net or a non-empty list of its UNetSkip records")
        self.unet_skips: tuple[UNetSkip, ...] = tuple(skips)
        encoder_order = sorted(skips, key=lambda s: s.encoder_index)
        self.condition_encoder = ConditionEncoder(config)
        self.feature_convs = SkipFeatureConvs(
            config.condition_channels, [(s.channels, s.downsample) for s in encoder_order], config.dense_kernel_size
        )
        self.skips = nn.ModuleDict(
            {str(s.decoder_index): SCAdapter(s.channels, config.hidden_width(s.channels)) for s in skips}
        )
        self.layout = {
            "skip_channels": [s.channels for s in skips],
            "skip_downsample": [s.downsample for s in encoder_order],
        }
        self.control: torch.Tensor | None = None  # B x C x H x W in [0, 1], set by set_control
        self.features: list[torch.Tensor] | None = None  # this call's c_i, encoder order
        self._cache: tuple[tuple, list[torch.Tensor]] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def install(self, unet: nn.Module) -> None:
        actual = tuple(find_unet_skips(unet))
        if actual != self.unet_skips:
            mine = [(s.channels, s.downsample) for s in self.unet_skips]
            theirs = [(s.channels, s.downsample) for s in actual]
            raise BackboneMismatchError(
                f"CSC-Tuner {self.name!r} was built for a U-Net with {len(mine)} skips (channels, downsampled) "
                f"{mine} but this {type(unet).__name__} has {len(theirs)}: {theirs}"
            )
        unet.register_forward_pre_hook(_ComputeFeatures(self), with_kwargs=True)
        unet.register_forward_hook(_ReleaseFeatures(self), always_call=True)
        try:
            unet_skip_site(unet).add_editor(unet, self.name, self._edit)
        except BaseException:
            self._remove_hooks(unet)
            raise

    def uninstall(self, unet: nn.Module) -> None:
        unet_skip_site(unet).remove_editor(unet, self.name)
        self._remove_hooks(unet)
        self.features = None
        self._cache = None

    def _remove_hooks(self, unet: nn.Module) -> None:
        for hooks in (unet._forward_pre_hooks, unet._forward_hooks):
            for hook_id, hook in list(hooks.items()):
                if isinstance(hook, (_ComputeFeatures, _ReleaseFeatures)) and hook.tuner is self:
                    del hooks[hook_id]
                    unet._forward_pre_hooks_with_kwargs.pop(hook_id, None)
                    unet._forward_hooks_always_called.pop(hook_id, None)

    # -- control image -----------------------------------------------------------------------------------------

    def set_control_image(self, image: torch.Tensor | None) -> None:
        """Store an already validated control image (see :func:`set_control`), dropping cached features."""
        self.control = image
        self._cache = None
        self.features = None

    def condition_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The features ``c_i`` (encoder order) of a control image batch, each the shape of encoder skip ``i``."""
        reference = self.condition_encoder[0].weight
        h = self.condition_encoder(image.to(device=reference.device, dtype=reference.dtype))
        return self.feature_convs(h)

    def _features_of(self, image: torch.Tensor) -> list[torch.Tensor]:
        params = [*self.condition_encoder.parameters(), *self.feature_convs.parameters()]
        needs_grad = torch.is_grad_enabled() and (image.requires_grad or any(p.requires_grad for p in params))
        if needs_grad:
            self._cache = None
            return self.condition_features(image)
        key = (id(image), _version(image), tuple((p.device, p.dtype, p.data_ptr(), _version(p)) for p in params))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.condition_features(image))
        return self._cache[1]

    def prepare(self, sample: Any) -> None:
        """Compute the features for a U-Net call on ``sample`` (the noisy latent); nothing when unused."""
        self.features = None
        image = self.control
        if image is None or self.scale == 0:
            return
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
            raise BackboneMismatchError(
                f"CSC-Tuner {self.name!r} expects the U-Net's first input to be a B x C x h x w latent, "
                f"got {type(sample).__name__}{'' if not isinstance(sample, torch.Tensor) else tuple(sample.shape)}"
            )
        factor = self.config.vae_scale_factor
        latent_hw = tuple(sample.shape[-2:])
        expected = (latent_hw[0] * factor, latent_hw[1] * factor)
        if tuple(image.shape[-2:]) != expected:
            raise TunerError(
                f"control image of {self.name!r} is {image.shape[-2]}x{image.shape[-1]} (HxW) but this U-Net call "
                f"has a {latent_hw[0]}x{latent_hw[1]} latent, which needs {expected[0]}x{expected[1]} control images "
                f"(vae_scale_factor {factor})"
            )
        repeat = batch_repeat(image.shape[0], sample.shape[0], self.name)
        features = self._features_of(image)
        if repeat != 1:
            if image.shape[0] == 1:
                features = [f.expand(sample.shape[0], *f.shape[1:]) for f in features]
            else:
                features = [f.repeat(repeat, 1, 1, 1) for f in features]
        self.features = features

    # -- the skip editor ---------------------------------------------------------------------------------------

    def _edit(self, skip: UNetSkip, x: torch.Tensor) -> torch.Tensor | None:
        features = self.features
        scale = self.scale
        if features is None or scale == 0:
            return None
        c = features[skip.encoder_index]
        if c.shape[-2:] != x.shape[-2:]:
            raise BackboneMismatchError(
                f"condition feature {skip.encoder_index} is {tuple(c.shape[-2:])} but skip {skip.decoder_index} is "
                f"{tuple(x.shape[-2:])}; the U-Net's downsampling differs from the layout the tuner was built for"
            )
        ctrl = c + self.skips[str(skip.decoder_index)](x.to(c.dtype) + c)
        ctrl = ctrl.to(x.dtype)
        return ctrl if scale == 1 else ctrl * scale
