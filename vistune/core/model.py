"""Attach, detach and steer tuners on a backbone.

The tuners attached to a backbone live in one submodule, ``model.vistune_tuners`` (a :class:`TunerContainer`);
their hooks (and the site objects that own them) are the only other additions. Because the tuners are
submodules, ``model.to()``, ``pipe.to("cuda")``, model CPU offload and ``accelerator.prepare`` move them with the
backbone. :func:`detach` removes everything and restores every ``requires_grad`` flag, leaving the backbone
exactly as it was.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterable, Iterator

import torch
from torch import nn

from .config import TunerConfig
from .errors import TunerError
from .registry import get_tuner_entry
from .tuner import Tuner

CONTAINER_NAME = "vistune_tuners"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


class TunerContainer(nn.ModuleDict):
    """The tuners attached to one backbone, by name, and the backbone's ``requires_grad`` flags before attach."""

    def __init__(self) -> None:
        super().__init__()
        self.saved_requires_grad: dict[str, bool] = {}


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone inside a DDP/FSDP wrapper (``.module``) or a ``torch.compile`` result (``._orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def _container(model: nn.Module) -> TunerContainer | None:
    container = getattr(unwrap(model), CONTAINER_NAME, None)
    return container if isinstance(container, TunerContainer) else None


def list_tuners(model: nn.Module) -> dict[str, Tuner]:
    """The tuners attached to ``model``, by name (empty when none)."""
    container = _container(model)
    return dict(container.items()) if container is not None else {}


def get_tuner(model: nn.Module, name: str = "default") -> Tuner:
    tuners = list_tuners(model)
    if name not in tuners:
        raise TunerError(f"no tuner named {name!r} is attached; attached: {sorted(tuners) or 'none'}")
    return tuners[name]


def select_tuners(model: nn.Module, name: str | Iterable[str] | None) -> dict[str, Tuner]:
    tuners = list_tuners(model)
    if name is None:
        if not tuners:
            raise TunerError(f"{type(model).__name__} has no tuners attached")
        return tuners
    names = [name] if isinstance(name, str) else list(name)
    return {n: get_tuner(model, n) for n in names}


def _backbone_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    prefix = CONTAINER_NAME + "."
    return {n: p for n, p in model.named_parameters() if not n.startswith(prefix)}


_PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _placement(model: nn.Module, trainable: bool) -> tuple[torch.device, torch.dtype]:
    """Where a new tuner goes: the backbone's device; its dtype, but fp32 for trainable tuners on a half-precision
    backbone (as diffusers' ``cast_training_params`` and peft do) and for storage dtypes such as float8."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    real = [p for p in params if p.device.type != "meta"]
    if params and not real and any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise TunerError(
            f"{type(model).__name__} is offloaded (its weights sit on the meta device behind accelerate hooks); "
            "attach tuners before enable_sequential_cpu_offload()"
        )
    reference = (real or params or [None])[0]
    if reference is None:
        return torch.device("cpu"), torch.float32
    dtype = reference.dtype if reference.dtype in _PLAIN_FLOATS else torch.float32
    if trainable and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return reference.device, dtype


def check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise TunerError(f"tuner name {name!r} must be a non-empty string of letters, digits, '_' or '-'")
    if hasattr(TunerContainer, name):
        raise TunerError(f"tuner name {name!r} is reserved (a torch.nn.Module attribute); choose another name")
    existing = list_tuners(model).get(name)
    if existing is not None:
        raise TunerError(
            f"a tuner named {name!r} ({type(existing).__name__}) is already attached to "
            f"{type(model).__name__}; detach it first or choose another name"
        )


def build_tuner(model: nn.Module, config: TunerConfig) -> Tuner:
    """Size a tuner for ``model`` without attaching it (raises for a backbone it cannot serve)."""
    if not isinstance(config, TunerConfig):
        raise TunerError(f"expected a TunerConfig (e.g. vistune.SCTunerConfig()), got {type(config).__name__}")
    return get_tuner_entry(config.tuner_type).tuner_class(config, model)


def attach(model: nn.Module, config: TunerConfig, name: str = "default", *, trainable: bool = True) -> Tuner:
    """Attach a new tuner built from ``config`` to ``model`` under ``name`` and return it.

    With ``trainable`` (the default) the tuner's parameters require grad and the backbone's are frozen; otherwise
    the tuner is for inference and the backbone keeps its flags. On any error the model is left as it was.
    """
    model = unwrap(model)
    check_name(model, name)
    tuner = build_tuner(model, config)
    return add_tuner(model, tuner, name, trainable=trainable)


def add_tuner(model: nn.Module, tuner: Tuner, name: str, *, trainable: bool = True) -> Tuner:
    """Attach an already built tuner (used by :func:`attach` and the checkpoint loader)."""
    model = unwrap(model)
    check_name(model, name)
    device, dtype = _placement(model, trainable)
    tuner.to(device=device, dtype=dtype)
    container = _container(model)
    created = container is None
    if created:
        container = TunerContainer()
        container.saved_requires_grad = {n: p.requires_grad for n, p in _backbone_parameters(model).items()}
        setattr(model, CONTAINER_NAME, container)
    tuner.name = name
    container[name] = tuner
    try:
        tuner.install(model)
    except BaseException:
        del container[name]
        if created:
            delattr(model, CONTAINER_NAME)
        raise
    tuner.requires_grad_(trainable)
    _refresh_backbone_grad(model)
    return tuner


def replace_tuner(model: nn.Module, name: str, new: Tuner) -> Tuner:
    """Swap the tuner attached as ``name`` for ``new`` (e.g. experts merged into one adapter), keeping its
    run-time scale, trainability and train/eval mode, and every backbone ``requires_grad`` flag as it was (a task
    head trained alongside keeps training). If attaching ``new`` fails, the old tuner comes back."""
    model = unwrap(model)
    old = get_tuner(model, name)
    new.scale = old.scale
    trainable = any(p.requires_grad for p in old.parameters())
    training = old.training
    flags = {n: p.requires_grad for n, p in _backbone_parameters(model).items()}
    detach(model, name)
    try:
        add_tuner(model, new, name, trainable=trainable)
    except BaseException:
        add_tuner(model, old, name, trainable=trainable)
        raise
    finally:
        _restore_backbone_grad(model, flags)
    new.train(training)
    return new


def _refresh_backbone_grad(model: nn.Module) -> None:
    """While some tuner trains, freeze the backbone except the parameters such tuners ask to train; with only
    inference tuners attached, the backbone keeps the flags it had before the first attach."""
    trainable = [t for t in list_tuners(model).values() if any(p.requires_grad for p in t.parameters())]
    if not trainable:
        _restore_backbone_grad(model, _container(model).saved_requires_grad)
        return
    wanted = {id(p) for tuner in trainable for p in tuner.backbone_parameters_to_train(model)}
    for param in _backbone_parameters(model).values():
        param.requires_grad_(id(param) in wanted)


def _restore_backbone_grad(model: nn.Module, saved: dict[str, bool]) -> None:
    for param_name, param in _backbone_parameters(model).items():
        param.requires_grad_(saved.get(param_name, param.requires_grad))


def detach(model: nn.Module, name: str | Iterable[str] | None = None) -> dict[str, Tuner]:
    """Remove the named tuners (all when ``name`` is None) and return them.

    When the last tuner goes, the container is deleted and every backbone ``requires_grad`` flag is restored,
    so the backbone computes exactly what it computed before :func:`attach`.
    """
    model = unwrap(model)
    selected = select_tuners(model, name)
    container = _container(model)
    for tuner_name, tuner in selected.items():
        tuner.uninstall(model)
        del container[tuner_name]
    if len(container) == 0:
        delattr(model, CONTAINER_NAME)
        _restore_backbone_grad(model, container.saved_requires_grad)
    else:
        _refresh_backbone_grad(model)
    return selected


def set_scale(model: nn.Module, scale: float, name: str | Iterable[str] | None = None) -> None:
    """Set the inference strength of the named tuners (all when ``name`` is None); 0 turns them off exactly."""
    for tuner in select_tuners(model, name).values():
        tuner.scale = scale


@contextlib.contextmanager
def disabled(model: nn.Module, name: str | Iterable[str] | None = None) -> Iterator[None]:
    """Run the backbone without the named tuners (all when None) inside a ``with`` block; scales come back after."""
    tuners = select_tuners(model, name)
    saved = {tuner_name: tuner.scale for tuner_name, tuner in tuners.items()}
    try:
        for tuner in tuners.values():
            tuner.scale = 0.0
        yield
    finally:
        for tuner_name, tuner in tuners.items():
            tuner.scale = saved[tuner_name]


def merge_and_unload(model: nn.Module, name: str | Iterable[str] | None = None) -> nn.Module:
    """Fold mergeable tuners into the backbone's weights and detach them; a clear error for the others."""
    model = unwrap(model)
    selected = select_tuners(model, name)
    for tuner in selected.values():
        tuner.merge(model)
    detach(model, list(selected))
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that requires grad (after attach: the tuners' and what they train)."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_summary(model: nn.Module) -> str:
    """A peft-style line of trainable vs all parameters, followed by one line per attached tuner."""
    all_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    percent = 100.0 * trainable / all_params if all_params else 0.0
    lines = [f"trainable params: {trainable:,d} || all params: {all_params:,d} || trainable%: {percent:.4f}"]
    for tuner_name, tuner in list_tuners(model).items():
        count = sum(p.numel() for p in tuner.parameters())
        lines.append(f"  {tuner_name}: {type(tuner).__name__} {count:,d} params, scale {tuner.scale:g}")
    return "\n".join(lines)


def print_trainable_parameters(model: nn.Module) -> None:
    print(parameter_summary(model))
