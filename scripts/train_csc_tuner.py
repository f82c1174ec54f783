#!/usr/bin/env python
"""Train a CSC-Tuner (SCEdit controllable generation) on a frozen Stable Diffusion U-Net, or diffusers'
ControlNet (``ControlNetModel.from_unet``) with the same loop for comparison.

Runs under ``accelerate launch`` (any number of processes) or plain ``python``; nothing is downloaded.

    python scripts/train_csc_tuner.py --pretrained_model_name_or_path assets/tiny-sd --shapes_domain plain \
        --condition canny --resolution 32 --output_dir out/csc-canny

Conventions are those of ``scripts/train_sc_tuner.py`` (diffusers' training-example flags, ``checkpoint-N``
folders holding only the trained weights + optimizer, pruned to ``--checkpoints_total_limit``, exact
``--resume_from_checkpoint``, tqdm with loss / lr, validation images, ``--use_ema`` to save the moving average of
the trained weights). ``--condition`` picks the control map
(:data:`vistune.conditions.CONDITIONS`): on the shapes world (``--shapes_domain``) canny and segmentation come from
the exact ground truth, the others from the extractor on the clean image; on an image folder (``--train_data_dir``)
from the extractor. The VAE factor is read from the VAE.

Output: ``--method csc`` writes a vistune tuner folder (``vistune.load_tuners(unet, out)`` /
``CSCControlModel.from_tuners(unet, [out])``); ``--method controlnet`` writes ``controlnet/``
(``ControlNetModel.from_pretrained(out, subfolder="controlnet")``). Validation images (with the control map
beside them) go to ``output_dir/validation`` and the tracker.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

import vistune
from vistune.conditions import CONDITIONS, vae_scale_factor
from vistune.data import STYLES, ShapesDataset
from vistune.data.imagefolder import CaptionedImageFolder
from vistune.sd_training import (
    add_training_arguments,
    check_caption_dropout,
    check_training_arguments,
    ConditionedDataset,
    TrainableState,
    TrainedEMA,
    backward_and_step,
    begin_training,
    check_sd_folder,
    continue_run,
    controlnet_embedding_channels,
    denoising_loss,
    drop_captions,
    encode_images,
    encode_prompts,
    load_sd_components,
    make_control_batch,
    publish,
    finish_step,
    micro_batch_indices,
    run_record,
    step_generator,
)
from vistune.training import resolve_checkpoint

METHODS = ("csc", "controlnet")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True, help="a local diffusers Stable Diffusion folder")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--train_data_dir", help="images + metadata.jsonl (file_name, text), the imagefolder layout")
    data.add_argument("--shapes_domain", choices=STYLES, help="train on shapes-world scenes rendered in this style")
    p.add_argument("--num_train_images", type=int, default=1000, help="scenes for --shapes_domain")
    p.add_argument("--image_column", default="file_name")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--missing_captions", default="empty", choices=["empty", "skip", "error"])
    p.add_argument("--condition", default="canny", choices=sorted(CONDITIONS), help="the control map to learn")
    p.add_argument("--method", default="csc", choices=METHODS)
    p.add_argument("--csc_config", help="a CSC-Tuner preset JSON (e.g. tuners/sd15_csc_canny.json); flags below override")
    p.add_argument("--condition_channels", type=int, help="CSC encoder output width (official 256)")
    p.add_argument("--encoder_width_ratio", type=float, help="CSC encoder width ratio (official 1.0)")
    p.add_argument("--dense_kernel_size", type=int, choices=[1, 3], help="CSC per-skip conv kernel (official 3)")
    p.add_argument("--down_ratio", type=float, help="CSC skip-MLP width ratio (official 1.0)")
    p.add_argument("--tuner_name", help="name saved with the CSC-Tuner (default: the condition)")
    p.add_argument("--conditioning_dropout", type=float, default=0.0,
                   help="probability of training an example with the empty caption (helps control from the image)")
    add_training_arguments(p, "csc-tuner-output",
                           validation_help="generate with this prompt and the first training image's control map")
    args = p.parse_args(argv)
    check_training_arguments(p, args, positive=("num_train_images",))
    check_caption_dropout(p, "--conditioning_dropout", args.conditioning_dropout)
    if args.method == "controlnet" and any(getattr(args, n) is not None for n in
                                           ("csc_config", "condition_channels", "encoder_width_ratio",
                                            "dense_kernel_size", "down_ratio")):
        p.error("CSC-Tuner options (--csc_config, --condition_channels, ...) need --method csc")
    args.tuner_name = args.tuner_name or args.condition
    return args


def csc_config(args, factor: int) -> vistune.CSCTunerConfig:
    """The CSC-Tuner config: the preset (or the official defaults), the flags, this condition and VAE factor."""
    data = {}
    if args.csc_config:
        path = Path(args.csc_config)
        if not path.is_file():
            raise FileNotFoundError(f"--csc_config {path}: no such file")
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"--csc_config {path} must hold a JSON object")
    for name in ("condition_channels", "encoder_width_ratio", "dense_kernel_size", "down_ratio"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    data.update(tuner_type="csc_tuner", condition=args.condition, vae_scale_factor=factor)
    return vistune.CSCTunerConfig.from_dict(data)


def build_dataset(args) -> ConditionedDataset:
    if args.shapes_domain:
        base = ShapesDataset(args.num_train_images, seed=args.seed, size=args.resolution, style=args.shapes_domain)
    else:
        base = CaptionedImageFolder(args.train_data_dir, args.resolution, image_column=args.image_column,
                                    caption_column=args.caption_column, missing_captions=args.missing_captions)
    return ConditionedDataset(base, args.condition)


def add_control(args, unet, factor: int):
    """The trained module and its parameters: a CSC-Tuner attached to ``unet``, or a ControlNet copy of it."""
    if args.method == "csc":
        vistune.attach(unet, csc_config(args, factor), name=args.tuner_name)
        return None, vistune.trainable_parameters(unet)
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=controlnet_embedding_channels(factor)
    ).float()
    controlnet.requires_grad_(True)
    return controlnet, list(controlnet.parameters())


def save_control(args, unet, controlnet, output_dir: Path) -> None:
    """Write the result atomically: a staging folder, then renames into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        if controlnet is None:
            vistune.save_tuners(unet, staging, name=args.tuner_name)
        else:
            controlnet.save_pretrained(staging / "controlnet", safe_serialization=True)
        publish(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def log_validation(args, components, unet, controlnet, control, accelerator, step: int, tag: str) -> None:
    """Generate ``--num_validation_images`` with the prompt and ``control``; save them beside the control map."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    common = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    was_training = unet.training
    unet.eval()
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    call = dict(height=args.resolution, width=args.resolution, num_inference_steps=args.validation_inference_steps,
                generator=generator, output_type="np")
    prompts = [args.validation_prompt] * args.num_validation_images
    with torch.no_grad(), accelerator.autocast():
        if controlnet is None:
            pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, unet=unet, **common)
            pipe.set_progress_bar_config(disable=True)
            vistune.set_control(unet, control, name=args.tuner_name)
            try:
                images = pipe(prompts, **call).images
            finally:
                vistune.set_control(unet, None, name=args.tuner_name)
        else:
            was = controlnet.training
            controlnet.eval()
            pipe = StableDiffusionControlNetPipeline.from_pretrained(
                args.pretrained_model_name_or_path, unet=unet, controlnet=controlnet, **common)
            pipe.set_progress_bar_config(disable=True)
            images = pipe(prompts, image=control, **call).images
            controlnet.train(was)
    unet.train(was_training)
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    control_np = control[0].permute(1, 2, 0).cpu().numpy()
    for i, image in enumerate(images):
        row = np.concatenate([control_np, image], axis=1)
        Image.fromarray((np.clip(row, 0, 1) * 255).round().astype(np.uint8)).save(folder / f"{tag}-{i}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), step, dataformats="NHWC")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Every input is checked before anything is written.
    check_sd_folder(args.pretrained_model_name_or_path)
    resume = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        continue_run(resume, args, ("condition", "conditioning_dropout"))
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    dataset = build_dataset(args)
    if len(dataset) < 1:
        raise ValueError("the training set is empty")
    if args.method == "csc":
        csc_config(args, 8)  # a bad preset fails here, before any write

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    components = load_sd_components(args.pretrained_model_name_or_path, args.prediction_type, args.max_train_timestep)
    tokenizer, noise_scheduler = components.tokenizer, components.noise_scheduler
    factor = vae_scale_factor(components.vae)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE factor {factor}")
    text_encoder = components.text_encoder.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    vae = components.vae.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    unet = components.unet.requires_grad_(False).to(dtype=weight_dtype)  # frozen backbone in the compute dtype
    set_seed(args.seed)  # the new weights are drawn from the global RNG
    controlnet, params = add_control(args, unet, factor)
    trained_module = unet if controlnet is None else controlnet
    if args.gradient_checkpointing:
        trained_module.enable_gradient_checkpointing()
    unet.to(accelerator.device).train()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    if controlnet is None:
        unet, optimizer = accelerator.prepare(unet, optimizer)
        trained = TrainableState(accelerator.unwrap_model(unet))
    else:
        controlnet, optimizer = accelerator.prepare(controlnet.to(accelerator.device).train(), optimizer)
        trained = TrainableState(accelerator.unwrap_model(controlnet))
        trained_module = controlnet
    ema = TrainedEMA(trained, args.ema_decay) if args.use_ema else None

    first_step = begin_training(args, accelerator, "train_csc_tuner", resume, trained, optimizer, lr_scheduler, output_dir,
                                ema)
    accelerator.print(f"{len(dataset)} training images, condition {args.condition}; "
                      f"{sum(p.numel() for p in params):,d} trainable parameters ({args.method}); "
                      f"{args.max_train_steps} steps of {args.train_batch_size} x {accelerator.num_processes} "
                      f"processes x {args.gradient_accumulation_steps} accumulation")
    validation_control = dataset[0]["control"][None].to(accelerator.device)

    progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                    desc="Steps", disable=not accelerator.is_local_main_process)
    for step in progress:
        step_loss = 0.0
        for micro in range(args.gradient_accumulation_steps):
            generator = step_generator(args.seed, step, micro, accelerator.process_index)
            pixels, captions, control = make_control_batch(
                dataset, micro_batch_indices(args, accelerator, step, micro, len(dataset)), generator, args.random_flip)
            captions = drop_captions(captions, args.conditioning_dropout, generator)
            control = control.to(accelerator.device)
            with accelerator.accumulate(trained_module):
                with torch.no_grad():
                    latents = encode_images(vae, pixels, generator)
                    context = encode_prompts(tokenizer, text_encoder, captions)
                if controlnet is None:
                    vistune.set_control(unet, control, name=args.tuner_name)
                    loss = denoising_loss(unet, noise_scheduler, latents, context.to(weight_dtype), generator,
                                          timestep_sampling=args.timestep_sampling, snr_gamma=args.snr_gamma,
                                          max_timestep=args.max_train_timestep)
                else:
                    loss = denoising_loss(unet, noise_scheduler, latents, context.to(weight_dtype), generator,
                                          controlnet=controlnet, controlnet_cond=control,
                                          timestep_sampling=args.timestep_sampling, snr_gamma=args.snr_gamma,
                                          max_timestep=args.max_train_timestep)
                backward_and_step(accelerator, loss, params, optimizer, args.max_grad_norm)
            step_loss += accelerator.reduce(loss.detach(), "mean").item() / args.gradient_accumulation_steps
        global_step = step + 1
        finish_step(args, accelerator, progress, lr_scheduler, optimizer, trained, step_loss, global_step, output_dir,
                    extra=run_record(args, ("condition", "conditioning_dropout")), ema=ema)
        if accelerator.is_main_process:
            if args.validation_prompt and global_step % args.validation_steps == 0:
                log_validation(args, components, accelerator.unwrap_model(unet),
                               None if controlnet is None else accelerator.unwrap_model(controlnet),
                               validation_control, accelerator, global_step, f"step-{global_step:06d}")

    accelerator.wait_for_everyone()
    if controlnet is None:
        vistune.set_control(accelerator.unwrap_model(unet), None, name=args.tuner_name)
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to()
        final_unet = accelerator.unwrap_model(unet)
        final_controlnet = None if controlnet is None else accelerator.unwrap_model(controlnet)
        save_control(args, final_unet, final_controlnet, output_dir)
        accelerator.print(f"saved the {args.method} result ({args.condition}) to {output_dir}")
        if args.validation_prompt:
            log_validation(args, components, final_unet, final_controlnet, validation_control, accelerator,
                           args.max_train_steps, "final")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
