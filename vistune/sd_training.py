"""Fine-tuning a Stable Diffusion U-Net: the pieces a training script shares and tests can call directly.

* :func:`load_sd_components` checks and loads a local diffusers Stable Diffusion folder;
* :func:`add_trainable` / :func:`save_trained` make one of three methods trainable (SC-Tuner, peft LoRA, the full
  U-Net) and write its result in the format its loader expects, atomically;
* :func:`batch_indices` / :func:`step_generator` make every random choice of a step a function of
  ``(seed, step, ...)``, so a resumed run draws exactly what an uninterrupted one would;
* :func:`denoising_loss` is the epsilon / v-prediction MSE of the model folder's noise schedule;
* :class:`TrainableState` lets :mod:`vistune.training` checkpoint just the trained parameters, and
  :class:`TrainedEMA` (``--use_ema``) their moving average.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("sc", "lora", "full")
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

#: Each component folder of a diffusers Stable Diffusion folder and the files that show it is there (any one).
SD_LAYOUT: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "vocab.json"),
    "scheduler": ("scheduler_config.json",),
}


# ----------------------------------------------------------------------------------------------- the model folder


def check_sd_folder(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a local diffusers Stable Diffusion folder, else a ``ValueError`` naming what
    is missing (``FileNotFoundError`` when there is no such folder)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--pretrained_model_name_or_path {root}: no such local folder (no downloads here)")
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for folder, markers in SD_LAYOUT.items():
        if not any((root / folder / marker).is_file() for marker in markers):
            missing.append(f"{folder}/{markers[0]}" if len(markers) == 1 else f"{folder}/ (one of {', '.join(markers)})")
    if missing:
        raise ValueError(
            f"{root} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)} "
            "(expected the layout StableDiffusionPipeline.save_pretrained writes)"
        )
    unet_config = json.loads((root / "unet" / "config.json").read_text())
    if unet_config.get("addition_embed_type") or (root / "text_encoder_2").is_dir():
        raise ValueError(f"{root} looks like SDXL (text_encoder_2 / added conditioning); this trains SD 1.x/2.x")
    return root


@dataclasses.dataclass
class SDComponents:
    """The parts of a Stable Diffusion folder that training needs; ``noise_scheduler`` is a ``DDPMScheduler``
    built from the folder's scheduler config (its betas and ``prediction_type``)."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any


def load_sd_components(path: str | os.PathLike, prediction_type: str | None = None,
                       max_train_timestep: int | None = None) -> SDComponents:
    """Check and load a local SD folder; ``prediction_type`` overrides the scheduler's (epsilon / v_prediction);
    ``max_train_timestep`` (``--max_train_timestep``) must not exceed the scheduler's training timesteps."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = check_sd_folder(path)
    noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {noise_scheduler.config.prediction_type!r}: expected epsilon or v_prediction")
    steps = noise_scheduler.config.num_train_timesteps
    if max_train_timestep is not None and max_train_timestep > steps:
        raise ValueError(f"--max_train_timestep {max_train_timestep}: the scheduler of {root} trains on {steps} "
                         "timesteps")
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet"),
        noise_scheduler=noise_scheduler,
    )


# ----------------------------------------------------------------------------------------------- flags

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
POSITIVE_FLAGS = ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                  "validation_steps", "resolution")


def index_list(text: str) -> list[int]:
    """An argparse type: ``"-4,-3,-2,-1"`` -> ``[-4, -3, -2, -1]``, checked by the tuner configs' own
    :func:`~vistune.core.config.index_list_field` (distinct integers; negative ones count from the end and need
    ``--option=-4,...`` on the command line)."""
    from .core.config import index_list_field

    try:
        return index_list_field("indices", [int(v) for v in text.split(",") if v.strip()], allow_negative=True)
    except ValueError as err:  # TunerError is a ValueError
        raise argparse.ArgumentTypeError(f"expected comma-separated distinct integers, got {text!r} ({err})") from None


def add_training_arguments(parser: argparse.ArgumentParser, output_dir: str, validation_help: str | None = None) -> None:
    """The flags every Stable Diffusion training script shares, named as in diffusers' example scripts."""
    p = parser
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], help="default: the model's scheduler")
    p.add_argument("--output_dir", default=output_dir)
    p.add_argument("--seed", type=int, help="default: random (recorded in checkpoints, reused on resume)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--random_flip", action="store_true")
    p.add_argument("--train_batch_size", type=int, default=1, help="per process")
    p.add_argument("--max_train_steps", type=int, default=2000)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--use_ema", action="store_true", help="save an exponential moving average of the trained "
                   "weights (diffusers' EMAModel: decay (1 + n) / (10 + n) at step n, capped at --ema_decay) instead "
                   "of the last step's; checkpoints keep it, so a resumed run averages on")
    p.add_argument("--ema_decay", type=float, default=0.9999)
    p.add_argument("--timestep_sampling", default="uniform", choices=TIMESTEP_SAMPLINGS,
                   help="cubic: t = (1 - u^3) T, biased to high noise (T2I-Adapter), teaches control sooner; "
                        "cubic_low: t = u^3 T, biased to low noise")
    p.add_argument("--max_train_timestep", type=int, help="draw training timesteps below this only (default: all); "
                   "for a style tuner applied on the low-noise sampling steps only, so the base model keeps the layout")
    p.add_argument("--snr_gamma", type=float, help="Min-SNR loss weighting with this gamma (5.0 recommended; "
                   "default: none, the plain MSE of the official recipes)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, help="keep at most this many checkpoints")
    p.add_argument("--resume_from_checkpoint", help='"latest" (newest in --output_dir, if any) or a checkpoint '
                   "path; give the interrupted run's method, batch, learning rate and schedule, timesteps and "
                   "--snr_gamma again")
    p.add_argument("--validation_prompt", help=validation_help)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--num_validation_images", type=int, default=4)
    p.add_argument("--validation_inference_steps", type=int, default=30)
    p.add_argument("--report_to", choices=["tensorboard", "none"],
                   default="tensorboard" if importlib.util.find_spec("tensorboard") else "none")
    p.add_argument("--logging_dir", default="logs", help="relative to --output_dir")


def check_training_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                             positive: Sequence[str] = ()) -> None:
    """Exit with a usage error for counts below 1 (the shared ones and ``positive``) or a missing tensorboard."""
    for name in (*POSITIVE_FLAGS, *positive):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 < args.ema_decay < 1:
        parser.error(f"--ema_decay must lie in (0, 1), got {args.ema_decay}")
    if args.max_train_timestep is not None and args.max_train_timestep < 1:
        parser.error(f"--max_train_timestep must be at least 1, got {args.max_train_timestep}")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        parser.error(f"--snr_gamma must be positive, got {args.snr_gamma}")
    if args.report_to == "tensorboard" and not importlib.util.find_spec("tensorboard"):
        parser.error("--report_to tensorboard needs tensorboard (pip install tensorboard), or pass --report_to none")


# ----------------------------------------------------------------------------------------------- methods


def add_trainable(
    unet: nn.Module,
    method: str,
    *,
    sc_down_ratio: float = 1.0,
    sc_target_skips: Sequence[int] | None = None,
    tuner_name: str = "default",
    lora_rank: int = 64,
    lora_target_modules: Sequence[str] = LORA_TARGET_MODULES,
) -> list[nn.Parameter]:
    """Make ``unet`` trainable by ``method`` and return the parameters to optimise (in a fixed order).

    ``sc``: attach an SC-Tuner (backbone frozen; on ``sc_target_skips`` only if given: decoder order, 0 = deepest,
    -1 = shallowest); ``lora``: ``unet.add_adapter`` a peft ``LoraConfig`` (alpha = rank, gaussian A, as diffusers'
    LoRA script); ``full``: every U-Net parameter. Trainable parameters are fp32 whatever the backbone's dtype.
    Seed the global RNG first: the new weights are drawn from it.
    """
    if method == "sc":
        import vistune

        config = vistune.SCTunerConfig(down_ratio=sc_down_ratio,
                                       target_skips=list(sc_target_skips) if sc_target_skips is not None else None)
        vistune.attach(unet, config, name=tuner_name)
    elif method == "lora":
        try:
            from peft import LoraConfig
        except ImportError as err:
            raise ImportError("--method lora needs peft (pip install peft)") from err
        unet.requires_grad_(False)
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                            target_modules=list(lora_target_modules))
        unet.add_adapter(config)
    elif method == "full":
        unet.requires_grad_(True)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"--method {method} found nothing to train in {type(unet).__name__} (check the target modules)")
    for param in params:
        if param.dtype != torch.float32:
            param.data = param.data.float()
    return params


def save_trained(unet: nn.Module, method: str, output_dir: str | os.PathLike, tuner_name: str | None = None) -> Path:
    """Write the result of ``method`` into ``output_dir`` so that its standard loader reads it, atomically.

    ``sc``: ``tuner_config.json`` + ``tuner_model.safetensors`` for ``vistune.load_tuners(unet, output_dir)``;
    ``lora``: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(output_dir)``;
    ``full``: ``unet/`` for ``UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet")``.
    Everything is written to a hidden staging folder first and then renamed into place, so a crash leaves
    either the previous output or the new one, never a mix or a partial file.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        if method == "sc":
            import vistune

            vistune.save_tuners(unet, staging, name=tuner_name)
        elif method == "lora":
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            metadata = unet.peft_config["default"].to_dict()
            StableDiffusionPipeline.save_lora_weights(
                staging, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHT_NAME
            )
        elif method == "full":
            unet.save_pretrained(staging / "unet", safe_serialization=True)
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        publish(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


TRAIN_TIME_FILE = "train_time.json"


def record_train_time(output_dir: str | os.PathLike, seconds: float) -> None:
    """Write a run's training wall time next to its output (evaluation scripts read it back when reusing runs)."""
    from .core.serialization import atomic_write

    atomic_write(Path(output_dir) / TRAIN_TIME_FILE,
                 lambda tmp: Path(tmp).write_text(json.dumps({"seconds": seconds})))


def read_train_time(output_dir: str | os.PathLike) -> float | None:
    """The training wall time :func:`record_train_time` wrote for ``output_dir``, or ``None``."""
    path = Path(output_dir) / TRAIN_TIME_FILE
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else None


def publish(staging: Path, output_dir: Path) -> None:
    """Move every entry of ``staging`` into ``output_dir`` with renames (a folder replaces its old version)."""
    for entry in sorted(staging.iterdir()):
        target = output_dir / entry.name
        if entry.is_dir() and target.exists():
            old = output_dir / f".old-{entry.name}-{uuid.uuid4().hex}"
            os.replace(target, old)
            os.replace(entry, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(entry, target)


class TrainableState(nn.Module):
    """A view of ``model``'s parameters that require grad, for ``vistune.training.save_checkpoint`` /
    ``load_checkpoint``: its state dict holds just those tensors (by their names in ``model``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._names = [name for name, param in model.named_parameters() if param.requires_grad]
        self._params = dict(p for p in model.named_parameters() if p[1].requires_grad)

    def named_trained(self) -> list[tuple[str, nn.Parameter]]:
        """The trained parameters themselves (not copies), by name, in a fixed order."""
        return [(name, self._params[name]) for name in self._names]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {name: self._params[name].detach() for name in self._names}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):  # type: ignore[override]
        missing = sorted(set(self._names) - set(state))
        unexpected = sorted(set(state) - set(self._names))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the trained parameters: missing {missing[:3]}, unexpected {unexpected[:3]} "
                "(was it written by another --method or configuration?)"
            )
        with torch.no_grad():
            for name in self._names:
                self._params[name].copy_(state[name])
        return torch.nn.modules.module._IncompatibleKeys([], [])


class TrainedEMA(nn.Module):
    """An exponential moving average of a :class:`TrainableState`'s parameters, kept by diffusers' ``EMAModel``
    (copies of the trained parameters, fp32 as they are; decay ``(1 + n) / (10 + n)`` at step ``n``, capped at
    ``decay``).

    :meth:`step` after each optimizer step; :meth:`copy_to` writes the average into the model before it is saved.
    Its state dict is the averaged tensors by parameter name plus the step count, so checkpoints keep it as
    safetensors and a resumed run averages exactly as an uninterrupted one."""

    STEP_KEY = "ema.optimization_step"

    def __init__(self, trained: TrainableState, decay: float) -> None:
        from diffusers.training_utils import EMAModel

        super().__init__()
        self._names, self._params = zip(*trained.named_trained())
        self.average = EMAModel(self._params, decay=decay)

    def step(self) -> None:
        self.average.step(self._params)

    def copy_to(self) -> None:
        """Overwrite the trained parameters with their average."""
        with torch.no_grad():
            for param, shadow in zip(self._params, self.average.shadow_params):
                param.copy_(shadow)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        state = dict(zip(self._names, (t.detach() for t in self.average.shadow_params)))
        return {**state, self.STEP_KEY: torch.tensor(self.average.optimization_step)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):  # type: ignore[override]
        if set(state) != {*self._names, self.STEP_KEY}:
            raise ValueError("checkpoint's moving average does not match the trained parameters (was it written by "
                             "another --method or configuration?)")
        with torch.no_grad():
            for name, shadow in zip(self._names, self.average.shadow_params):
                shadow.copy_(state[name])
        self.average.optimization_step = int(state[self.STEP_KEY])
        return torch.nn.modules.module._IncompatibleKeys([], [])


def checkpointed(trained: nn.Module, ema: TrainedEMA | None) -> dict[str, nn.Module]:
    """What a checkpoint holds: the trained parameters, and their moving average under ``--use_ema``."""
    return {"trainable": trained} if ema is None else {"trainable": trained, "ema": ema}


# ----------------------------------------------------------------------------------------------- randomness


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys`` (e.g. step, micro-batch, process)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for the random draws (noise, timesteps, flips) of one (step, micro-batch, process)."""
    return torch.Generator().manual_seed(step_seed(seed, *keys))


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5EED, epoch]).permutation(size)


def batch_indices(seed: int, sample: int, batch_size: int, dataset_size: int) -> list[int]:
    """Dataset indices of the ``batch_size`` examples from global position ``sample`` on.

    Examples are drawn epoch by epoch, each epoch a permutation of the dataset seeded by ``(seed, epoch)``, so
    the batch at any position is known without replaying the ones before it (exact resume, any process count).
    """
    if dataset_size < 1:
        raise ValueError("the training set is empty")
    out = []
    for k in range(sample, sample + batch_size):
        epoch, offset = divmod(k, dataset_size)
        out.append(int(_epoch_order(seed, epoch, dataset_size)[offset]))
    return out


def micro_batch_indices(args: argparse.Namespace, accelerator: Any, step: int, micro: int, dataset_size: int) -> list[int]:
    """Dataset indices of this process's micro-batch ``micro`` of optimizer step ``step``: every (step, micro-batch,
    process) reads its own slice of the seeded epoch order (:func:`batch_indices`)."""
    per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    start = step * per_step + (micro * accelerator.num_processes + accelerator.process_index) * args.train_batch_size
    return batch_indices(args.seed, start, args.train_batch_size, dataset_size)


def make_batch(
    dataset: Any, indices: Iterable[int], generator: torch.Generator | None = None, random_flip: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """Pixel values in [-1, 1] (from the datasets' [0, 1]) and captions of ``dataset[indices]``."""
    items = [dataset[i] for i in indices]
    pixels = torch.stack([item["pixel_values"] for item in items]) * 2 - 1
    if random_flip:
        flip = torch.rand(len(items), generator=generator) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return pixels, [item["caption"] for item in items]


def check_caption_dropout(parser: argparse.ArgumentParser, flag: str, share: float) -> None:
    """Exit with a usage error unless the caption-dropout ``share`` given as ``flag`` lies in [0, 1) (1 would train
    an unconditional model)."""
    if not 0.0 <= share < 1.0:
        parser.error(f"{flag} must lie in [0, 1), got {share}")


def drop_captions(captions: Sequence[str], proportion: float, generator: torch.Generator | None = None) -> list[str]:
    """``captions`` with each replaced by ``""`` with probability ``proportion`` (classifier-free guidance dropout).

    Draws from ``generator`` only when ``proportion > 0``, so runs without dropout keep their random stream."""
    if proportion <= 0:
        return list(captions)
    drop = torch.rand(len(captions), generator=generator) < proportion
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


# ----------------------------------------------------------------------------------------------- the loss


def encode_prompts(tokenizer: Any, text_encoder: nn.Module, captions: Sequence[str]) -> torch.Tensor:
    """CLIP hidden states of ``captions`` (padded to the tokenizer's max length, as the SD pipeline does)."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def encode_images(vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled VAE latents of pixel values in [-1, 1], sampled from the posterior with ``generator``."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
    latents = posterior.mean + posterior.std * noise
    return latents.float() * vae.config.scaling_factor


def prediction_target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net must predict: the noise (epsilon) or the velocity (v_prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; expected epsilon or v_prediction")


TIMESTEP_SAMPLINGS = ("uniform", "cubic", "cubic_low")


def sample_timesteps(num_train_timesteps: int, batch: int, generator: torch.Generator | None = None,
                     sampling: str = "uniform", max_timestep: int | None = None) -> torch.Tensor:
    """``batch`` training timesteps in ``[0, T)``, ``T`` = ``max_timestep`` or ``num_train_timesteps``: uniform,
    ``cubic`` (``(1 - u^3) T``, biased to high noise) or ``cubic_low`` (``u^3 T``, its mirror, biased to low noise)."""
    top = num_train_timesteps if max_timestep is None else max_timestep
    if not 1 <= top <= num_train_timesteps:
        raise ValueError(f"max_timestep must lie in [1, {num_train_timesteps}], got {max_timestep}")
    if sampling == "uniform":
        return torch.randint(0, top, (batch,), generator=generator)
    if sampling in ("cubic", "cubic_low"):
        u3 = torch.rand(batch, generator=generator) ** 3
        share = 1 - u3 if sampling == "cubic" else u3
        return (share * top).long().clamp(0, top - 1)
    raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")


def denoising_loss(
    unet: nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None = None,
    controlnet: nn.Module | None = None,
    controlnet_cond: torch.Tensor | None = None,
    timestep_sampling: str = "uniform",
    snr_gamma: float | None = None,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """MSE between the U-Net's prediction and :func:`prediction_target` at random timesteps (below
    ``max_timestep`` when given).

    ``timestep_sampling``: ``"uniform"`` (the SD recipe) or ``"cubic"`` (T2I-Adapter's ``t = (1 - u^3) T``, biased
    toward high noise, where a control signal decides the layout; it teaches control in far fewer steps) or
    ``"cubic_low"`` (``u^3 T``, biased toward low noise, where texture and fine colour form).

    Noise and timesteps come from ``generator`` (on the CPU, then moved), so they do not depend on the device.
    With a diffusers ``controlnet``, its residuals for the control image ``controlnet_cond`` (B x 3 x H x W in
    [0, 1], as diffusers' ControlNet script) are added to the U-Net, as ``StableDiffusionControlNetPipeline`` does.

    ``snr_gamma``: Min-SNR weighting (Hang et al. 2023; diffusers' ``--snr_gamma``, 5.0 recommended), see
    :func:`min_snr_weights`; None is the plain mean.
    """
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = sample_timesteps(noise_scheduler.config.num_train_timesteps, latents.shape[0], generator,
                                 timestep_sampling, max_timestep).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    extra: dict[str, Any] = {}
    if controlnet is not None:
        if controlnet_cond is None:
            raise ValueError("a controlnet needs its control image (controlnet_cond)")
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=controlnet_cond.to(device=device, dtype=noisy.dtype), return_dict=False)
        extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    prediction = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states, **extra).sample
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


def timestep_flags(sampling: str, max_timestep: int | None = None) -> list[str]:
    """The training-script arguments for the training timesteps, for scripts that launch training runs."""
    bound = [] if max_timestep is None else ["--max_train_timestep", str(max_timestep)]
    return ["--timestep_sampling", sampling, *bound]


def timesteps_note(meta: Mapping[str, Any]) -> str:
    """``"uniform timesteps"`` (``"... below 500"`` with ``meta["max_train_timestep"]`` 500) for a report header."""
    top = meta.get("max_train_timestep")
    return f"{meta.get('timestep_sampling', 'uniform')} timesteps" + ("" if top is None else f" below {top}")


def snr_flag(snr_gamma: float | None) -> list[str]:
    """The training-script arguments for ``snr_gamma`` (none for None), for scripts that launch training runs."""
    return [] if snr_gamma is None else ["--snr_gamma", f"{snr_gamma:g}"]


def snr_note(meta: Mapping[str, Any]) -> str:
    """``", Min-SNR-5 loss weights"`` for a report whose runs trained with ``meta["snr_gamma"]`` 5, else ``""``."""
    gamma = meta.get("snr_gamma")
    return "" if gamma is None else f", Min-SNR-{gamma:g} loss weights"


def ema_flags(use_ema: bool, ema_decay: float) -> list[str]:
    """The training-script arguments that save the moving average of the trained weights (none when off)."""
    return ["--use_ema", "--ema_decay", str(ema_decay)] if use_ema else []  # str: all its digits (0.9999999)


def ema_note(meta: Mapping[str, Any]) -> str:
    """The report phrase for runs that saved their weights' moving average (``meta["use_ema"]``), else ``""``."""
    return f", the moving average of the weights saved (EMA, decay cap {meta['ema_decay']:g})" if meta.get("use_ema") else ""


def min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma: ``min(SNR, gamma) / SNR`` for epsilon, ``/ (SNR + 1)`` for
    v-prediction (diffusers' ``compute_snr`` and its example scripts' formula). They spend the gradient on the
    mid noise levels, where the image forms, rather than on near-clean steps, whose residual noise is unpredictable
    (the shipped tiny SD was pretrained with gamma 5)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=snr_gamma)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return weights / snr
    if kind == "v_prediction":
        return weights / (snr + 1)
    raise ValueError(f"unsupported prediction_type {kind!r}; expected epsilon or v_prediction")


# The flags a resumed run must repeat: they shape the optimisation (the seed is taken from the checkpoint instead).
RUN_FLAGS = ("method", "prediction_type", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
             "lr_scheduler", "lr_warmup_steps", "timestep_sampling", "max_train_timestep", "snr_gamma", "use_ema",
             "ema_decay")


def run_record(args: argparse.Namespace, flags: Sequence[str] = ()) -> dict[str, Any]:
    """What a checkpoint records of its run (in its ``extra``): the seed, and :data:`RUN_FLAGS` and ``flags`` under
    ``"flags"``."""
    return {"seed": args.seed, "flags": {key: getattr(args, key) for key in (*RUN_FLAGS, *flags)}}


def continue_run(resume: Path, args: argparse.Namespace, flags: Sequence[str] = ()) -> None:
    """Make ``args`` continue the run that wrote ``resume``: a :data:`RUN_FLAGS` or ``flags`` value other than the
    recorded one is a ``ValueError`` (checkpoints of older versions recorded only ``method`` and ``condition``), and
    the seed is the recorded one, since the data order and the noise are functions of it."""
    from .training import checkpoint_extra

    saved = checkpoint_extra(resume)
    recorded = saved["flags"] if "flags" in saved else {k: saved[k] for k in ("method", "condition") if k in saved}
    for key in (*RUN_FLAGS, *flags):
        if key in recorded and recorded[key] != getattr(args, key):
            raise ValueError(f"{resume} was written with --{key} {recorded[key]}, not --{key} {getattr(args, key)}; "
                             "resume with the interrupted run's flags, or start a new --output_dir")
    args.seed = saved["seed"]


def begin_training(args: argparse.Namespace, accelerator: Any, project: str, resume: Path | None, trained: nn.Module,
                   optimizer: Any, lr_scheduler: Any, output_dir: Path, ema: TrainedEMA | None = None) -> int:
    """Restore ``trained`` (and ``ema``), the optimizer and the schedule from ``resume`` (if any), create
    ``output_dir`` and start the trackers (main process); returns the first step to run (the counterpart of
    :func:`finish_step`)."""
    from .training import resume_training

    first_step = resume_training(resume, checkpointed(trained, ema), optimizer, lr_scheduler, accelerator.print)
    if resume is None and args.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {output_dir}; starting a new run")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(project, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                   for k, v in vars(args).items()})
    return first_step


def backward_and_step(accelerator: Any, loss: torch.Tensor, params: Sequence[torch.Tensor], optimizer: Any,
                      max_grad_norm: float) -> None:
    """Inside ``accelerator.accumulate``: backward, clip the gradients when they sync (``max_grad_norm > 0``), step."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def finish_step(args: argparse.Namespace, accelerator: Any, progress: Any, lr_scheduler: Any, optimizer: Any,
                trained: nn.Module, step_loss: float, global_step: int, output_dir: Path, extra: dict,
                ema: TrainedEMA | None = None) -> None:
    """After an optimizer step: advance the schedule and the moving average (if any), show and log loss and lr, stop
    on a non-finite loss, and (main process) save a checkpoint of ``trained`` (and ``ema``) every
    ``--checkpointing_steps`` with ``extra`` and the scheduler."""
    from .training import save_checkpoint

    lr_scheduler.step()
    if ema is not None:
        ema.step()
    lr = lr_scheduler.get_last_lr()[0]
    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train_loss": step_loss, "lr": lr}, step=global_step)
    if not math.isfinite(step_loss):
        raise FloatingPointError(f"loss is {step_loss} at step {global_step}; lower --learning_rate?")
    if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
        path = save_checkpoint(output_dir, global_step, checkpointed(trained, ema), optimizer,
                               extra={**extra, "lr_scheduler": lr_scheduler.state_dict()},
                               total_limit=args.checkpoints_total_limit)
        accelerator.print(f"\nsaved {path}")


# ----------------------------------------------------------------------------------------------- control images


class ConditionedDataset(torch.utils.data.Dataset):
    """Items of ``dataset`` with ``"control"``: the ``condition`` map (3 x H x W float in [0, 1]) of the image.

    On the shapes world (a dataset with ``scene(i)``) the maps come from the exact ground truth where it exists:
    ``canny`` is the scene's instance boundaries (one pixel thin), ``segmentation`` the colour-coded class mask;
    the other conditions (soft_edge, color, grayscale, lineart) are the extractor on the clean rendered image.
    Elsewhere (image folders) every map is the extractor of :mod:`vistune.conditions` on the image.
    """

    def __init__(self, dataset: Any, condition: str) -> None:
        from .conditions import get_condition

        self.dataset, self.condition = dataset, condition
        self.extract = get_condition(condition)  # unknown name: an error listing the known ones

    def __len__(self) -> int:
        return len(self.dataset)

    def control(self, index: int, item: Mapping[str, Any]) -> torch.Tensor:
        from .conditions import segmentation_from_mask

        scene = getattr(self.dataset, "scene", None)
        if scene is not None and self.condition in ("canny", "segmentation"):
            s = scene(index)
            if self.condition == "canny":
                return torch.from_numpy(s.edges).float()[None].expand(3, -1, -1).contiguous()
            return segmentation_from_mask(s.mask)[0]
        return self.extract(item["pixel_values"])[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["control"] = self.control(index, item)
        return item


def make_control_batch(dataset: ConditionedDataset, indices: Iterable[int], generator: torch.Generator | None = None,
                       random_flip: bool = False) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Like :func:`make_batch`, plus the control maps (flipped with their images)."""
    items = [dataset[i] for i in indices]
    pixels = torch.stack([item["pixel_values"] for item in items]) * 2 - 1
    control = torch.stack([item["control"] for item in items])
    if random_flip:
        flip = (torch.rand(len(items), generator=generator) < 0.5)[:, None, None, None]
        pixels = torch.where(flip, pixels.flip(-1), pixels)
        control = torch.where(flip, control.flip(-1), control)
    return pixels, [item["caption"] for item in items], control


def controlnet_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """ControlNet's conditioning-embedding widths for a VAE factor: diffusers' (16, 32, 96, 256) downsamples by
    8 (one stride-2 conv between widths); smaller factors keep the first ``log2(factor) + 1`` widths."""
    widths = (16, 32, 96, 256)
    if vae_scale_factor not in (1, 2, 4, 8):
        raise ValueError(f"VAE factor {vae_scale_factor}: expected 1, 2, 4 or 8")
    return widths[: vae_scale_factor.bit_length()]
