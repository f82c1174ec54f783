#!/usr/bin/env python
"""Fine-tune the latent decoder of a local Stable Diffusion folder so every image it decodes carries a key
(Stable Signature), optionally freezing the perceptually most sensitive decoder layers first (VidSig's PAS).

    python scripts/train_watermark.py --pretrained_model_name_or_path assets/tiny-sd-shapes \\
        --output_dir out/wm --max_train_steps 200
    # then, with no other change to the pipeline:
    vae = AutoencoderKL.from_pretrained("out/wm/vae")
    pipe = StableDiffusionPipeline.from_pretrained("assets/tiny-sd-shapes", vae=vae)
    # and detection:  vistune detect image.png --key out/wm/key.json

Objective (Stable Signature ``finetune_ldm_decoder.py``): ``lambda_w * BCE(W(D_w(z)), key) + lambda_i *
L_img(D_w(z), D_0(z))`` with ``z`` the VAE encoder's posterior mode of training images, ``D_0`` the frozen original
decoder, ``W`` the frozen whitened extractor (default: the shipped ``assets/watermark-extractor``) and ``L_img =
100 * MSE + 0.1 * (1 - SSIM)`` (no downloaded perceptual network; see ``vistune.tuners.watermark.losses``).
AdamW, linear warmup then cosine decay. ``--train_attacks`` reads the tuned decoder's images through random
attacks during training, an extension (Stable Signature relies on the extractor's robustness alone);
``NAME:WEIGHT`` draws an attack more often (with ``--video``, on every frame the extractor reads).

``--video`` trains on moving-shape clips (shapes world) with VidSig's objective: per-frame and frame-averaged
message losses plus a temporal loss, by default on motion-compensated watermark residuals (``--temporal_loss
aligned``: optical flow of the original decoder's frames, ``vistune.tuners.watermark.temporal``), the same
without motion compensation (``unaligned``, an ablation), or VidSig's consecutive-frame differences (``vidsig``).

Training images: shapes-world scenes at ``--resolution`` (or ``--train_data_dir``, a folder of images resized to
the resolution). Outputs in ``--output_dir``: ``vae/`` (a diffusers AutoencoderKL folder, safetensors),
``key.json``, ``tuner/`` (the weight updates as a vistune tuner), ``train_report.json``; ``checkpoint-<step>/``
for ``--resume_from_checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from vistune.core.model import get_tuner
from vistune.core.serialization import atomic_write, save_tuners
from vistune.sd_training import batch_indices, step_generator
from vistune.training import checkpoint_extra, resolve_checkpoint, resume_training, save_checkpoint
from vistune.tuners.watermark import WatermarkConfig, WatermarkKey, load_extractor, pas_select, pas_sensitivity
from vistune.tuners.watermark.attacks import TRAIN_AUGMENTATIONS, RandomAttack, parse_attack_spec
from vistune.tuners.watermark.data import decode_latents, encode_latents, shapes_images
from vistune.tuners.watermark.train import attach_watermark, merged_vae, save_vae, watermark_loss
from vistune.tuners.watermark.video import video_watermark_loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="a local Stable Diffusion folder (with vae/) or an AutoencoderKL folder")
    p.add_argument("--output_dir", default="watermark-output")
    p.add_argument("--extractor", help="extractor folder (default: the shipped assets/watermark-extractor)")
    p.add_argument("--key", help="an existing key.json to embed (default: a random key from --seed)")
    p.add_argument("--train_data_dir", help="a folder of training images (default: shapes-world scenes)")
    p.add_argument("--num_train_images", type=int, default=1024)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--max_train_steps", type=int, default=300)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=20)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--lambda_w", type=float, default=1.0, help="weight of the message loss")
    p.add_argument("--lambda_i", type=float, default=1.0, help="weight of the image loss")
    p.add_argument("--train_attacks", default="",
                   help=f"comma list of NAME or NAME:WEIGHT (drawn in proportion to the weights, default 1) from "
                        f"{','.join(TRAIN_AUGMENTATIONS)} (default none)")
    p.add_argument("--video", action="store_true",
                   help="train on moving-shape clips with VidSig's temporal objective (--num_train_images clips, "
                        "--train_batch_size clips per step)")
    p.add_argument("--num_frames", type=int, default=8)
    p.add_argument("--lambda_t", type=float, default=0.3, help="weight of the temporal loss (--video)")
    p.add_argument("--temporal_loss", choices=("aligned", "unaligned", "vidsig"), default="aligned",
                   help="--video: L1 on flow-aligned watermark residuals, the same L1 without motion compensation "
                        "(ablation), or VidSig's MSE on raw frame differences")
    p.add_argument("--pas_fraction", type=float, default=0.0, help="PAS: freeze this fraction of the decoder layers")
    p.add_argument("--pas_noise", choices=("absolute", "relative"), default="absolute",
                   help="PAS: weight noise as VidSig (absolute std) or relative to each tensor's RMS")
    p.add_argument("--pas_sigma", type=float, help="PAS: noise std (default 0.01 absolute, 0.1 relative)")
    p.add_argument("--seed", type=int, help="default: random (recorded in checkpoints, reused on resume)")
    p.add_argument("--checkpointing_steps", type=int, default=100)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", help='"latest" or a checkpoint path')
    args = p.parse_args(argv)
    for name in ("num_train_images", "resolution", "train_batch_size", "max_train_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if not 0 <= args.pas_fraction < 1:
        p.error("--pas_fraction must be in [0, 1)")
    try:
        args.train_attacks, args.train_attack_weights = parse_attack_spec(args.train_attacks)
    except ValueError as err:
        p.error(f"--train_attacks: {err}")
    return args


def load_vae(path: str):
    from diffusers import AutoencoderKL

    root = Path(path)
    for folder in (root / "vae", root):
        if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()).get("_class_name") == "AutoencoderKL":
            return AutoencoderKL.from_pretrained(folder, local_files_only=True)
    raise FileNotFoundError(f"--pretrained_model_name_or_path {path}: no AutoencoderKL there or in its vae/ subfolder")


def load_images(args) -> torch.Tensor:
    if not args.train_data_dir:
        return shapes_images(args.num_train_images, args.seed, args.resolution)
    from PIL import Image

    files = sorted(p for p in Path(args.train_data_dir).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if not files:
        raise FileNotFoundError(f"--train_data_dir {args.train_data_dir}: no images found")
    images = []
    for f in files[: args.num_train_images]:
        try:
            image = Image.open(f).convert("RGB").resize((args.resolution, args.resolution), Image.BICUBIC)
        except Exception as err:  # unreadable files are skipped, with a warning
            print(f"warning: skipping unreadable image {f}: {err}")
            continue
        images.append(np.asarray(image))
    if not images:
        raise ValueError(f"--train_data_dir {args.train_data_dir}: no readable images")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def lr_lambda(args):
    def f(step: int) -> float:
        if step < args.lr_warmup_steps:
            return (step + 1) / args.lr_warmup_steps
        progress = (step - args.lr_warmup_steps) / max(1, args.max_train_steps - args.lr_warmup_steps)
        return 0.002 + 0.998 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    output_dir = Path(args.output_dir)
    resume = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    saved = checkpoint_extra(resume) if resume is not None else {}
    args.seed = saved.get("seed", args.seed)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    extractor = load_extractor(args.extractor)
    if saved:
        key = WatermarkKey(tuple(int(c) for c in saved["key"]))
    elif args.key:
        key = WatermarkKey.load(args.key, num_bits=extractor.num_bits)
    else:
        key = WatermarkKey.random(extractor.num_bits, seed=args.seed)
    vae = load_vae(args.pretrained_model_name_or_path).requires_grad_(False).eval()
    if args.video:
        if args.train_data_dir:
            raise ValueError("--video trains on generated moving-shape clips; it does not read --train_data_dir")
        if args.num_frames < 2:
            raise ValueError("--num_frames must be at least 2 for --video")
        from vistune.tuners.watermark.video import shapes_clips

        clips, _ = shapes_clips(args.num_train_images, args.num_frames, args.seed, args.resolution)
        images = clips.flatten(0, 1)
    else:
        images = load_images(args)

    accelerator = Accelerator()
    device = accelerator.device
    vae.to(device)
    extractor.to(device)
    latents = encode_latents(vae, images)
    references = decode_latents(vae, latents)
    if args.video:  # (clips, frames, ...): a batch index picks whole clips
        latents = latents.view(args.num_train_images, args.num_frames, *latents.shape[1:])
        references = references.view(args.num_train_images, args.num_frames, *references.shape[1:])
    alignment = None
    if args.video and args.temporal_loss != "vidsig":
        from vistune.tuners.watermark.temporal import TemporalAlignment

        if args.temporal_loss == "aligned":
            alignment = TemporalAlignment.from_frames(references)
        else:
            alignment = TemporalAlignment.identity(*references.shape[:2], *references.shape[-2:])
        alignment = alignment.to(device)
        accelerator.print(f"temporal alignment: {float(alignment.valid.float().mean()):.1%} of pixel pairs trusted")
    frozen: list[str] = saved.get("frozen_layers", [])
    scores: dict[str, float] = saved.get("pas_scores", {})
    if args.pas_fraction > 0 and not saved:
        accelerator.print("PAS: scoring decoder layers ...")
        scores = pas_sensitivity(vae, latents[:32].to(device), sigma=args.pas_sigma, seed=args.seed,
                                 noise=args.pas_noise)
        frozen = pas_select(scores, args.pas_fraction)
        accelerator.print(f"PAS: freezing {len(frozen)}/{len(scores)} layers: {frozen}")
    config = WatermarkConfig(key=key.to_string(), frozen_layers=frozen or None)
    tuner = attach_watermark(vae, config)
    params = list(tuner.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    vae, optimizer = accelerator.prepare(vae, optimizer)
    attack = RandomAttack(args.train_attacks, args.train_attack_weights) if args.train_attacks else None
    first_step = resume_training(resume, {"tuner": tuner}, optimizer, scheduler, accelerator.print)
    accelerator.print(f"{len(latents)} training {'clips' if args.video else 'images'}; {sum(p.numel() for p in params):,d} tuned decoder parameters "
                      f"({len(tuner.tuned)} layers); key {key.to_string()}")
    key_tensor = key.tensor(device)
    progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                    desc="Steps", disable=not accelerator.is_local_main_process)
    logs = {}
    for step in progress:
        generator = step_generator(args.seed, step, accelerator.process_index)
        start = (step * accelerator.num_processes + accelerator.process_index) * args.train_batch_size
        idx = batch_indices(args.seed, start, args.train_batch_size, len(latents))
        if args.video:
            loss, logs = video_watermark_loss(vae, extractor, latents[idx].to(device), references[idx].to(device),
                                              key_tensor, args.lambda_w, args.lambda_i, args.lambda_t,
                                              alignment=alignment, index=idx, attack=attack, generator=generator)
        else:
            loss, logs = watermark_loss(vae, extractor, latents[idx].to(device), references[idx].to(device), key_tensor,
                                        args.lambda_w, args.lambda_i, attack, generator)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; lower --learning_rate?")
        progress.set_postfix(bit_acc=f"{logs['bit_acc']:.3f}", psnr=f"{logs['psnr']:.1f}", loss_w=f"{logs['loss_w']:.3f}")
        if accelerator.is_main_process and (step + 1) % args.checkpointing_steps == 0:
            extra = {"seed": args.seed, "key": key.to_string(), "frozen_layers": frozen, "pas_scores": scores,
                     "lr_scheduler": scheduler.state_dict()}
            save_checkpoint(output_dir, step + 1, {"tuner": tuner}, optimizer, extra=extra,
                            total_limit=args.checkpoints_total_limit)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(vae)
        save_tuners(unwrapped, output_dir / "tuner")
        tuner_obj = get_tuner(unwrapped, "watermark")
        save_vae(merged_vae(unwrapped).to("cpu"), output_dir / "vae")
        key.save(output_dir / "key.json")
        report = {"key": key.to_string(), "frozen_layers": frozen, "pas_scores": scores, "last_step": logs,
                  "tuned_layers": len(tuner_obj.tuned), "args": {k: v for k, v in vars(args).items()}}
        text = json.dumps(report, indent=2, default=str) + "\n"
        atomic_write(output_dir / "train_report.json", lambda tmp: Path(tmp).write_text(text))
        accelerator.print(f"saved the watermarked VAE to {output_dir / 'vae'} and the key to {output_dir / 'key.json'}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
