"""Controllable Stable Diffusion with CSC-Tuners (SCEdit): a pipeline component and a pipeline.

``CSCControlModel`` is the CSC-Tuner as a diffusers pipeline component (``ModelMixin, ConfigMixin`` with
``from_unet``, like ``ControlNetModel``): it holds one CSC-Tuner per condition, sized for a U-Net's skips, and
saves / loads with the rest of a pipeline folder. ``StableDiffusionCSCControlPipeline`` is a
``StableDiffusionPipeline`` that takes control images, follows the call conventions of diffusers'
``StableDiffusionControlNetPipeline`` and, for the duration of a call only, attaches the condition tuners to its
U-Net (so the U-Net itself stays stock and saves as one).

Resize rule for control images (any size, mode, PIL / numpy / tensor): scaled, keeping the aspect ratio, to cover
the output ``height x width``, then center-cropped to it (:func:`vistune.conditions.fit`); the condition is
extracted after resizing. Without ``height``/``width`` the output takes the first control image's size (rounded
down to a multiple of 8, as diffusers does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from diffusers import ModelMixin, StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ..conditions import CONDITIONS, get_condition, to_image_tensor, to_rgb_arrays
from ..core.errors import TunerError
from ..core.model import add_tuner, detach, set_scale
from ..core.serialization import load_tuners, save_tuners
from ..sites.unet import UNetSkip, find_unet_skips
from ..tuners.csc_tuner import CSCTuner, CSCTunerConfig, set_control
from .steps import in_step_window

ControlImage = Any  # PIL image, numpy array, tensor, or a list of them (a batch)


class ControlInputError(TunerError):
    """A control image, condition name or weight the pipeline cannot use."""


def _skip_records(skips: Sequence[UNetSkip]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in skips]


class CSCControlModel(ModelMixin, ConfigMixin):
    """One CSC-Tuner per condition, sized for a U-Net: the pipeline component of the CSC pipeline.

    Args:
        conditions: one ``{"name": ..., "config": CSCTunerConfig.to_dict()}`` per condition, in the order control
            images are given; ``name`` is the tuner's name on the U-Net (by default the condition's name).
        skips: the U-Net's skip records (``vistune.sites.find_unet_skips``), so the component loads without its
            U-Net; the U-Net it is used with must have exactly these skips (checked, clear error otherwise).

    Build it with :meth:`from_unet` (fresh, for training) or :meth:`from_tuners` (conditions trained and saved on
    their own with ``vistune.save_tuners``); ``save_pretrained`` / ``from_pretrained`` round-trip it alone or as
    part of a pipeline folder; :meth:`save_condition` writes one condition as a vistune tuner folder.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, conditions: Sequence[Mapping[str, Any]] = (), skips: Sequence[Mapping[str, Any]] = ()):
        super().__init__()
        if not conditions:
            raise TunerError("CSCControlModel needs at least one condition tuner")
        try:
            unet_skips = [UNetSkip(**dict(s)) for s in skips]
        except TypeError as err:
            raise TunerError(f"CSCControlModel: malformed skip records: {err}") from None
        self.tuners = nn.ModuleDict()
        for entry in conditions:
            name = entry.get("name")
            if not isinstance(name, str) or not name or name in self.tuners:
                raise TunerError(f"CSCControlModel: condition names must be unique non-empty strings, got {name!r}")
            config = CSCTunerConfig.from_dict(dict(entry["config"]))
            tuner = CSCTuner(config, unet_skips)
            tuner.name = name
            self.tuners[name] = tuner

    # -- constructors ---------------------------------------------------------------------------------------------

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        conditions: Union[str, Sequence[str], Mapping[str, CSCTunerConfig]] = "canny",
        config: CSCTunerConfig | None = None,
        **config_kwargs: Any,
    ) -> "CSCControlModel":
        """Fresh condition tuners for ``unet`` (identity at init): one per name in ``conditions``.

        ``conditions`` is a condition name, a list of names, or ``{name: CSCTunerConfig}``. Names in
        :data:`vistune.conditions.CONDITIONS` set ``config.condition`` (the pipeline's auto-preprocessing);
        ``config`` (or ``config_kwargs``, e.g. ``vae_scale_factor=8, dense_kernel_size=1``) is shared otherwise.
        """
        if config is not None and config_kwargs:
            raise TunerError("pass either config or config keyword arguments, not both")
        base = config if config is not None else CSCTunerConfig(**config_kwargs)
        if isinstance(conditions, str):
            conditions = [conditions]
        if isinstance(conditions, Mapping):
            configs = dict(conditions)
        else:
            configs = {}
            for name in conditions:
                if not isinstance(name, str):
                    raise TunerError(f"condition names must be strings, got {name!r}")
                condition = name if name in CONDITIONS else base.condition
                configs[name] = dataclasses.replace(base, condition=condition)
        if not configs:
            raise TunerError("from_unet needs at least one condition")
        for name, cfg in configs.items():
            if not isinstance(cfg, CSCTunerConfig):
                raise TunerError(f"condition {name!r}: expected a CSCTunerConfig, got {type(cfg).__name__}")
        model = cls(
            conditions=[{"name": n, "config": c.to_dict()} for n, c in configs.items()],
            skips=_skip_records(find_unet_skips(unet)),
        )
        reference = next(unet.parameters(), None)
        if reference is not None and reference.device.type != "meta":
            model.to(reference.device)
        return model

    @classmethod
    def from_tuners(
        cls, unet: nn.Module, paths: Union[Mapping[str, Union[str, os.PathLike]], Sequence[Union[str, os.PathLike]]]
    ) -> "CSCControlModel":
        """Combine condition tuners saved on their own (``vistune.save_tuners`` folders or official SCEdit files).

        ``paths`` maps a name to a path, or is a list of paths (each named as saved, e.g. ``"canny"``). Each is
        loaded with :func:`vistune.load_tuners` onto ``unet`` (checking the U-Net layout), then taken off again.
        """
        items = list(paths.items()) if isinstance(paths, Mapping) else [(None, p) for p in paths]
        if not items:
            raise TunerError("from_tuners needs at least one tuner path")
        loaded: dict[str, CSCTuner] = {}
        for name, path in items:
            names = load_tuners(unet, path, name=name)
            tuners = detach(unet, names)
            for tuner_name, tuner in tuners.items():
                if not isinstance(tuner, CSCTuner):
                    raise TunerError(f"{path} holds a {type(tuner).__name__} ({tuner_name!r}), not a CSC-Tuner")
                if tuner_name in loaded:
                    raise TunerError(f"two tuners named {tuner_name!r}; pass {{name: path}} to rename them")
                loaded[tuner_name] = tuner
        model = cls(
            conditions=[{"name": n, "config": t.config.to_dict()} for n, t in loaded.items()],
            skips=_skip_records(find_unet_skips(unet)),
        )
        for name, tuner in loaded.items():
            model.tuners[name].load_state_dict(tuner.state_dict())
            model.tuners[name].scale = tuner.scale
        return model.to(next(iter(loaded.values())).condition_encoder[0].weight.device)

    # -- access -------------------------------------------------------------------------------------------------

    @property
    def condition_names(self) -> list[str]:
        """The names of the condition tuners, in the order control images are matched to them."""
        return list(self.tuners.keys())

    @property
    def unet_skips(self) -> list[UNetSkip]:
        return [UNetSkip(**dict(s)) for s in self.config.skips]

    def save_condition(self, name: str, save_directory: Union[str, os.PathLike], unet: nn.Module) -> Path:
        """Save one condition as a vistune tuner folder (loads with ``vistune.load_tuners(unet, path)``)."""
        tuner = self._tuner(name)
        with self.attached(unet, [name], trainable=False):
            return save_tuners(unet, save_directory, name=tuner.name)

    def _tuner(self, name: str) -> CSCTuner:
        if name not in self.tuners:
            raise ControlInputError(f"no condition tuner named {name!r}; loaded conditions: {self.condition_names}")
        return self.tuners[name]

    @contextlib.contextmanager
    def attached(
        self, unet: nn.Module, names: Sequence[str] | None = None, *, trainable: bool = False
    ) -> Iterator[dict[str, CSCTuner]]:
        """Attach the named condition tuners (all by default) to ``unet`` inside a ``with`` block.

        Raises :class:`~vistune.BackboneMismatchError` when ``unet`` is not the layout the tuners were built for,
        and a clear error when a tuner of the same name is already attached. The U-Net is restored on exit.
        """
        names = self.condition_names if names is None else list(names)
        tuners = {n: self._tuner(n) for n in names}
        scales = {n: t.scale for n, t in tuners.items()}
        attached: list[str] = []
        try:
            for name, tuner in tuners.items():
                add_tuner(unet, tuner, name, trainable=trainable)
                attached.append(name)
            yield tuners
        finally:
            for name in attached:
                set_control(unet, None, name=name)
            if attached:
                detach(unet, attached)
            for name, scale in scales.items():
                tuners[name].scale = scale


def _images_of(control_image: Any, count: int) -> list[Any]:
    """One entry per condition: a single condition takes the whole input (a list is a batch), several take a list."""
    if control_image is None:
        return []
    if count > 1 and isinstance(control_image, (list, tuple)):
        return list(control_image)
    return [control_image]


def _first_size(image: Any) -> tuple[int, int]:
    if isinstance(image, (list, tuple)) and image:
        return _first_size(image[0])
    if isinstance(image, torch.Tensor) and image.ndim >= 2:
        return int(image.shape[-2]), int(image.shape[-1])
    return tuple(to_rgb_arrays(image)[0].shape[:2])  # type: ignore[return-value]


class StableDiffusionCSCControlPipeline(StableDiffusionPipeline):
    """Text-to-image with control images steering the U-Net through CSC-Tuners (SCEdit).

    Components: those of ``StableDiffusionPipeline`` plus ``controlnet``, a :class:`CSCControlModel` (one tuner per
    condition). Call conventions follow diffusers' ``StableDiffusionControlNetPipeline``: ``control_image`` (alias
    ``image``) is one image / batch, or with several conditions a list with one entry per condition;
    ``controlnet_conditioning_scale`` is the weight of each condition (a float or one per image; it multiplies
    the tuner's own ``scale``, 1 unless changed),
    ``control_guidance_start`` / ``control_guidance_end`` the fraction of steps where control acts. ``condition``
    names the tuner for each image (default: the loaded conditions in order); each image is resized to the output
    (see the module doc) and, with ``preprocess`` (default), turned into that tuner's condition map
    (``config.condition``, e.g. canny edges). ``control_scale`` multiplies every weight (SCEdit's global scale).
    Other tuners attached to the U-Net (e.g. an SC-Tuner style) stay active: style and control compose.
    """

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        controlnet: CSCControlModel,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = True,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        if not isinstance(controlnet, CSCControlModel):
            raise TypeError(f"controlnet must be a CSCControlModel, got {type(controlnet).__name__}")
        self.register_modules(controlnet=controlnet)

    # -- inputs -------------------------------------------------------------------------------------------------

    def prepare_control(
        self,
        control_image: Any,
        condition: Union[str, Sequence[str], None],
        weights: Union[float, Sequence[float]],
        height: int,
        width: int,
        batch_size: int,
        num_images_per_prompt: int,
        preprocess: bool = True,
    ) -> list[tuple[str, torch.Tensor, float]]:
        """``(tuner name, B x 3 x height x width control map in [0, 1], weight)`` per control image, checked."""
        loaded = self.controlnet.condition_names
        images = _images_of(control_image, len(loaded))
        if len(images) > len(loaded):
            raise ControlInputError(
                f"{len(images)} control images were given but only {len(loaded)} condition tuner(s) are loaded "
                f"({loaded}); load one tuner per condition (CSCControlModel.from_tuners)"
            )
        if condition is None:
            names = loaded[: len(images)]
        else:
            names = [condition] if isinstance(condition, str) else list(condition)
            if len(names) != len(images):
                raise ControlInputError(f"{len(images)} control image(s) but {len(names)} condition name(s): {names}")
            for name in names:
                if name not in loaded:
                    known = "" if name in CONDITIONS else f"; known condition extractors: {sorted(CONDITIONS)}"
                    raise ControlInputError(
                        f"condition {name!r} does not exist in this pipeline; loaded conditions: {loaded}{known}"
                    )
            if len(set(names)) != len(names):
                raise ControlInputError(f"each condition may take one control image, got {names}")
        if isinstance(weights, (int, float)) and not isinstance(weights, bool):
            weights = [float(weights)] * len(images)
        else:
            weights = [float(w) for w in weights]
            if len(weights) != len(images):
                raise ControlInputError(
                    f"controlnet_conditioning_scale has {len(weights)} weight(s) for {len(images)} control image(s)"
                )
        factor = self.vae_scale_factor
        prepared = []
        for image, name, weight in zip(images, names, weights):
            tuner = self.controlnet.tuners[name]
            if tuner.config.vae_scale_factor != factor:
                raise ControlInputError(
                    f"condition {name!r} was built for a VAE factor of {tuner.config.vae_scale_factor} but this "
                    f"pipeline's VAE has {factor}"
                )
            extractor = tuner.config.condition if preprocess else None
            if extractor is not None:
                tensor = get_condition(extractor)(image, size=(height, width))
            elif isinstance(image, torch.Tensor) and image.is_floating_point() and tuple(image.shape[-2:]) == (height, width):
                tensor = image if image.ndim == 4 else image.unsqueeze(0)
                if tensor.shape[1] == 1:
                    tensor = tensor.expand(-1, 3, -1, -1)
                elif tensor.shape[1] == 4:
                    tensor = tensor[:, :3]
            else:
                tensor = to_image_tensor(image, size=(height, width))
            n = tensor.shape[0]
            if n == batch_size and n != 1:
                tensor = tensor.repeat_interleave(num_images_per_prompt, dim=0)
            elif n != 1:
                raise ControlInputError(
                    f"control image for {name!r} has batch {n}; it must be 1 or the prompt batch {batch_size}"
                )
            prepared.append((name, tensor, weight))
        return prepared

    # -- call ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], None] = None,
        control_image: ControlImage = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: Union[str, list[str], None] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: Union[float, list[float]] = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        condition: Union[str, list[str], None] = None,
        control_scale: float = 1.0,
        preprocess: bool = True,
        image: ControlImage = None,
        **kwargs: Any,
    ):
        """Generate images; see the class doc for the control arguments, ``StableDiffusionPipeline`` for the rest.

        Without a control image the pipeline runs the U-Net uncontrolled (exactly ``StableDiffusionPipeline``).
        """
        if image is not None:
            if control_image is not None:
                raise ControlInputError("pass the control image as control_image or image, not both")
            control_image = image
        if not 0.0 <= control_guidance_start < control_guidance_end <= 1.0:
            raise ControlInputError(
                f"need 0 <= control_guidance_start < control_guidance_end <= 1, got {control_guidance_start}, "
                f"{control_guidance_end}"
            )
        if control_image is not None and (height is None or width is None):
            h, w = _first_size(control_image)
            height = height or max(8, h - h % 8)
            width = width or max(8, w - w % 8)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        elif prompt_embeds is not None:
            batch_size = prompt_embeds.shape[0]
        else:
            batch_size = 1
        controls = self.prepare_control(
            control_image, condition, controlnet_conditioning_scale, height, width, batch_size,
            num_images_per_prompt, preprocess,
        )
        steps = len(timesteps) if timesteps is not None else len(sigmas) if sigmas is not None else num_inference_steps
        names = [name for name, _, _ in controls]
        own_scales = {name: self.controlnet.tuners[name].scale for name in names}

        def set_scales(i: int, total: int) -> None:
            keep = float(in_step_window(i, total, control_guidance_start, control_guidance_end))
            for name, _, weight in controls:
                set_scale(self.unet, own_scales[name] * weight * control_scale * keep, name=name)

        user_callback = callback_on_step_end
        if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = user_callback.tensor_inputs

        def step_end(pipe, i, t, callback_kwargs):
            total = getattr(pipe, "_num_timesteps", None) or steps
            if i + 1 < total:
                set_scales(i + 1, total)
            return user_callback(pipe, i, t, callback_kwargs) if user_callback is not None else {}

        with self.controlnet.attached(self.unet, names):
            for name, tensor, _ in controls:
                set_control(self.unet, tensor.to(self._execution_device), name=name)
            set_scales(0, steps)
            return super().__call__(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                eta=eta,
                generator=generator,
                latents=latents,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                ip_adapter_image=ip_adapter_image,
                ip_adapter_image_embeds=ip_adapter_image_embeds,
                output_type=output_type,
                return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs,
                clip_skip=clip_skip,
                callback_on_step_end=step_end if (controls or user_callback is not None) else None,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                **kwargs,
            )


__all__ = ["CSCControlModel", "ControlInputError", "StableDiffusionCSCControlPipeline"]
