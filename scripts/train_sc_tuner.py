#!/usr/bin/env python
"""Train an SC-Tuner (SCEdit) on a frozen Stable Diffusion U-Net, or peft LoRA / the full U-Net with the same loop.

Runs under ``accelerate launch`` (any number of processes) or plain ``python``; nothing is downloaded.

    # a style tuner on your images (an imagefolder: images + metadata.jsonl with "file_name" and "text")
    accelerate launch scripts/train_sc_tuner.py --pretrained_model_name_or_path path/to/sd15 \\
        --train_data_dir my_style/ --resolution 512 --output_dir out/my-style --validation_prompt "a cat"

    # the shipped tiny model learning the shapes world's "striped" style, generated on the fly
    python scripts/train_sc_tuner.py --pretrained_model_name_or_path assets/tiny-sd-shapes \\
        --shapes_domain striped --num_train_images 2000 --resolution 32 --train_batch_size 32 \\
        --max_train_steps 500 --output_dir out/striped --validation_prompt "a red circle on a white background"

    # the same loop for comparisons: --method lora (--lora_rank 64) or --method full
    # continue an interrupted run from its newest checkpoint: add --resume_from_checkpoint latest

    # several CPU processes (gloo): accelerate's --cpu flag starts only one, so launch like this
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train_sc_tuner.py ...

Defaults follow the official SC-Tuner recipe (scepter ``methods/scedit/t2i``): AdamW lr 1e-4 (betas 0.9/0.999,
weight decay 1e-2), constant schedule, batch 1, 2000 steps, ``--sc_down_ratio 1.0``, plain MSE on the target of the
model folder's scheduler (epsilon or v_prediction), uniform timesteps (``--snr_gamma 5`` weights the loss by
Min-SNR-5, as diffusers' ``--snr_gamma``; ``--max_train_timestep 500`` trains on the low-noise half only, for a
tuner used on the matching sampling steps only). ``--lr_scheduler`` steps once per optimizer step whatever the
number of processes. ``--use_ema`` saves the moving average of the trained weights (diffusers' ``EMAModel``)
instead of the last step's, as diffusers' ``--use_ema``. ``--proportion_empty_prompts 0.1`` trains that share of
the examples with the empty caption, as diffusers' flag of that name: the tuned model then also learns the
unconditional prediction that classifier-free guidance subtracts at inference.

Outputs in ``--output_dir`` (each written to a staging folder and renamed into place at the end):
  sc    tuner_config.json + tuner_model.safetensors   ``vistune.load_tuners(pipe.unet, output_dir)``
  lora  pytorch_lora_weights.safetensors              ``pipe.load_lora_weights(output_dir)``
  full  unet/                                         ``UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet")``
plus ``checkpoint-<step>/`` (safetensors + JSON, no pickles; resumable), ``validation/*.png`` and ``logs/``
(tensorboard, the default when it is installed).

Data: images are resized (shorter side) and centre-cropped to ``--resolution``. Images without a caption train
with the empty caption (``--missing_captions empty``, the default) or are left out (``skip``); unreadable images
are skipped; both with a warning and a count. ``--shapes_domain STYLE`` renders ``--num_train_images`` shapes-world
scenes in that style (plain, striped, outline, pastel, noise) with their ordinary captions, so the tuner learns
the style as the new default look. Every random draw of a step (which examples, noise, timesteps, flips, dropped
captions) is a function of (seed, step), so ``--resume_from_checkpoint`` reproduces an uninterrupted run exactly;
it refuses flags that change the optimisation (method, batch, learning rate and schedule, timesteps,
``--snr_gamma``, caption dropout) other than the interrupted run's.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from vistune.data import STYLES, ShapesDataset
from vistune.data.imagefolder import CaptionedImageFolder
from vistune.sd_training import (
    add_training_arguments,
    check_caption_dropout,
    check_training_arguments,
    LORA_TARGET_MODULES,
    METHODS,
    TrainableState,
    TrainedEMA,
    add_trainable,
    backward_and_step,
    begin_training,
    check_sd_folder,
    continue_run,
    denoising_loss,
    drop_captions,
    encode_images,
    encode_prompts,
    index_list,
    load_sd_components,
    make_batch,
    save_trained,
    finish_step,
    micro_batch_indices,
    run_record,
    step_generator,
)
from vistune.training import resolve_checkpoint

#: Flags of this script that a checkpoint records and a resume must repeat (besides ``RUN_FLAGS``).
RECORDED_FLAGS = ("proportion_empty_prompts",)


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
    p.add_argument("--method", default="sc", choices=METHODS)
    p.add_argument("--sc_down_ratio", type=float, default=1.0)
    p.add_argument("--sc_target_skips", type=index_list, help="comma-separated decoder skip indices the SC-Tuner "
                   "tunes (0 = deepest, read first; negative from the shallow end: --sc_target_skips=-4,-3,-2,-1 is "
                   "conv_in's and the first down block's skips); default: every skip")
    p.add_argument("--tuner_name", default="default", help="name saved with the SC-Tuner")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--lora_target_modules", default=",".join(LORA_TARGET_MODULES))
    p.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="train this share of the examples with the empty caption (as diffusers' scripts), so the "
                        "tuned model also learns the unconditional prediction that classifier-free guidance subtracts")
    add_training_arguments(p, "sc-tuner-output")
    args = p.parse_args(argv)
    check_training_arguments(p, args, positive=("num_train_images", "lora_rank"))
    check_caption_dropout(p, "--proportion_empty_prompts", args.proportion_empty_prompts)
    return args


def build_dataset(args):
    if args.shapes_domain:
        return ShapesDataset(args.num_train_images, seed=args.seed, size=args.resolution, style=args.shapes_domain)
    return CaptionedImageFolder(args.train_data_dir, args.resolution, image_column=args.image_column,
                                caption_column=args.caption_column, missing_captions=args.missing_captions)


def log_validation(args, components, unet, accelerator, step: int, tag: str) -> None:
    """Generate ``--num_validation_images`` for the prompt, save them and log them to the tracker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, unet=unet, vae=components.vae, text_encoder=components.text_encoder,
        tokenizer=components.tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    with torch.no_grad(), accelerator.autocast():
        images = pipe([args.validation_prompt] * args.num_validation_images, height=args.resolution,
                      width=args.resolution, num_inference_steps=args.validation_inference_steps,
                      generator=generator).images
    unet.train(was_training)
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{tag}-{i}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Every input is checked before anything is written.
    check_sd_folder(args.pretrained_model_name_or_path)
    resume = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        continue_run(resume, args, RECORDED_FLAGS)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    dataset = build_dataset(args)

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
    text_encoder = components.text_encoder.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    vae = components.vae.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    unet = components.unet.requires_grad_(False)
    if args.method != "full":  # frozen backbone in the compute dtype; the trained parameters stay fp32
        unet.to(dtype=weight_dtype)
    set_seed(args.seed)  # the new tuner / LoRA weights are drawn from the global RNG
    params = add_trainable(unet, args.method, sc_down_ratio=args.sc_down_ratio,
                           sc_target_skips=args.sc_target_skips, tuner_name=args.tuner_name,
                           lora_rank=args.lora_rank, lora_target_modules=args.lora_target_modules.split(","))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(accelerator.device).train()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    trained = TrainableState(accelerator.unwrap_model(unet))
    ema = TrainedEMA(trained, args.ema_decay) if args.use_ema else None

    first_step = begin_training(args, accelerator, "train_sc_tuner", resume, trained, optimizer, lr_scheduler, output_dir,
                                ema)
    accelerator.print(f"{len(dataset)} training images; {sum(p.numel() for p in params):,d} trainable parameters "
                      f"({args.method}); {args.max_train_steps} steps of {args.train_batch_size} x "
                      f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation")

    progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                    desc="Steps", disable=not accelerator.is_local_main_process)
    for step in progress:
        step_loss = 0.0
        for micro in range(args.gradient_accumulation_steps):
            generator = step_generator(args.seed, step, micro, accelerator.process_index)
            pixels, captions = make_batch(dataset, micro_batch_indices(args, accelerator, step, micro, len(dataset)),
                                          generator, args.random_flip)
            captions = drop_captions(captions, args.proportion_empty_prompts, generator)
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    latents = encode_images(vae, pixels, generator)
                    context = encode_prompts(tokenizer, text_encoder, captions)
                loss = denoising_loss(unet, noise_scheduler, latents, context, generator,
                                      timestep_sampling=args.timestep_sampling, snr_gamma=args.snr_gamma,
                                      max_timestep=args.max_train_timestep)
                backward_and_step(accelerator, loss, params, optimizer, args.max_grad_norm)
            step_loss += accelerator.reduce(loss.detach(), "mean").item() / args.gradient_accumulation_steps
        global_step = step + 1
        finish_step(args, accelerator, progress, lr_scheduler, optimizer, trained, step_loss, global_step, output_dir,
                    extra=run_record(args, RECORDED_FLAGS), ema=ema)
        if accelerator.is_main_process:
            if args.validation_prompt and global_step % args.validation_steps == 0:
                log_validation(args, components, accelerator.unwrap_model(unet), accelerator, global_step,
                               f"step-{global_step:06d}")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to()
        save_trained(final, args.method, output_dir, tuner_name=args.tuner_name if args.method == "sc" else None)
        accelerator.print(f"saved the {args.method} result to {output_dir}")
        if args.validation_prompt:
            log_validation(args, components, final, accelerator, args.max_train_steps, "final")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
