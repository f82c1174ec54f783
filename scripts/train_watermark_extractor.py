#!/usr/bin/env python
"""Pre-train a HiDDeN watermark encoder/extractor pair with attacks in the loop, then PCA-whiten the extractor.

Stable Signature's extractor recipe (``hidden/main.py``) at shapes-world scale: the encoder hides random k-bit
messages in images, one random attack per batch (by default: a crop left in place on a grey canvas, which is how
the detector reads crops, resize, straight-through real JPEG, brightness, contrast, saturation, blur, noise,
rotation, a combination) and the extractor reads them back (BCE). A small image loss
keeps the encoder's residual faint. After training, the extractor is whitened on unwatermarked images so its
bits are fair, uncorrelated coins on clean content (what the binomial p-value of detection assumes).

    python scripts/train_watermark_extractor.py --output_dir out/extractor --max_train_steps 1500
    # the shipped one (assets/watermark-extractor) was made with:
    python scripts/train_watermark_extractor.py --output_dir assets/watermark-extractor --seed 0 \\
        --pretrained_vae assets/tiny-sd-shapes/vae --max_train_steps 5000 --num_train_images 8192 \\
        --scaling_w 0.08 --lambda_i 0 --lr_warmup_steps 100

Training images are shapes-world scenes at ``--resolution`` (every style), half of them through
``--pretrained_vae`` (a diffusers AutoencoderKL folder) when given, so the extractor sees the decoder's look.
Outputs: ``config.json`` + ``model.safetensors`` (the whitened extractor) and ``encoder.safetensors`` (the HiDDeN
encoder, the post-hoc baseline), each written atomically; ``checkpoint-<step>/`` for ``--resume_from_checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from vistune.core.serialization import atomic_write
from vistune.sd_training import batch_indices, step_generator
from vistune.training import checkpoint_extra, resolve_checkpoint, resume_training, save_checkpoint
from vistune.tuners.watermark.attacks import (
    EXTRACTOR_AUGMENTATIONS, TRAIN_AUGMENTATIONS, RandomAttack, parse_attack_spec, quantize_straight_through,
)
from vistune.tuners.watermark.data import clean_images
from vistune.tuners.watermark.hidden import ExtractorConfig, HiddenEncoder, HiddenExtractor, save_extractor, whiten


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="watermark-extractor")
    p.add_argument("--pretrained_vae", help="a diffusers AutoencoderKL folder; half the images go through it")
    p.add_argument("--num_bits", type=int, default=48)
    p.add_argument("--channels", type=int, default=64, help="extractor width")
    p.add_argument("--depth", type=int, default=4, help="extractor conv blocks before the k-channel block")
    p.add_argument("--head", default="flatten", choices=["flatten", "pool"],
                   help="flatten: resize to --resolution, position-aware read-out (default); pool: Stable Signature's "
                        "global average pool, any input size")
    p.add_argument("--encoder_channels", type=int, default=32)
    p.add_argument("--encoder_depth", type=int, default=3)
    p.add_argument("--scaling_w", type=float, default=0.03, help="encoder residual scale (images in [0, 1])")
    p.add_argument("--lambda_i", type=float, default=1.0, help="weight of the encoder's image MSE loss")
    p.add_argument("--augmentations", default=",".join(EXTRACTOR_AUGMENTATIONS),
                   help=f"comma list of NAME or NAME:WEIGHT (drawn in proportion to the weights, default 1) from "
                        f"{','.join(TRAIN_AUGMENTATIONS)}")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num_train_images", type=int, default=4096)
    p.add_argument("--num_whitening_images", type=int, default=2048)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--max_train_steps", type=int, default=1500)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lr_warmup_steps", type=int, default=50)
    p.add_argument("--seed", type=int, help="default: random (recorded in checkpoints, reused on resume)")
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", help='"latest" or a checkpoint path')
    args = p.parse_args(argv)
    for name in ("num_bits", "channels", "depth", "encoder_channels", "encoder_depth", "resolution", "num_train_images",
                 "num_whitening_images", "train_batch_size", "max_train_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.num_whitening_images <= args.num_bits:
        p.error(f"--num_whitening_images must exceed --num_bits ({args.num_bits}) for a full-rank covariance")
    if args.resolution < 8 or (args.head == "flatten" and args.resolution % 8):
        p.error("--resolution must be at least 8 (a multiple of 8 with --head flatten)")
    try:
        args.augmentations, args.augmentation_weights = parse_attack_spec(args.augmentations)
    except ValueError as err:
        p.error(f"--augmentations: {err}")
    return args


def load_vae(path: str | None):
    if path is None:
        return None
    from diffusers import AutoencoderKL

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--pretrained_vae {path}: not a diffusers AutoencoderKL folder (no config.json)")
    return AutoencoderKL.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)


def lr_at(args, step: int) -> float:
    """Linear warmup then cosine to 1 % (Stable Signature's scheduler shape)."""
    if step < args.lr_warmup_steps:
        return args.learning_rate * (step + 1) / args.lr_warmup_steps
    progress = (step - args.lr_warmup_steps) / max(1, args.max_train_steps - args.lr_warmup_steps)
    return args.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    resume = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        args.seed = checkpoint_extra(resume)["seed"]
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    vae = load_vae(args.pretrained_vae)
    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    config = ExtractorConfig(num_bits=args.num_bits, channels=args.channels, depth=args.depth, head=args.head,
                             input_size=args.resolution)
    extractor = HiddenExtractor(config)
    encoder = HiddenEncoder(args.num_bits, args.encoder_channels, args.encoder_depth, args.scaling_w)
    models = torch.nn.ModuleDict({"extractor": extractor, "encoder": encoder})
    optimizer = torch.optim.Adam(models.parameters(), lr=args.learning_rate)
    models, optimizer = accelerator.prepare(models, optimizer)
    attack = RandomAttack(args.augmentations, args.augmentation_weights)

    accelerator.print(f"rendering {args.num_train_images} training images ...")
    images = clean_images(args.num_train_images, args.seed, args.resolution, vae)
    first_step = resume_training(resume, {"models": accelerator.unwrap_model(models)}, optimizer, log=accelerator.print)
    output_dir = Path(args.output_dir)
    progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                    desc="Steps", disable=not accelerator.is_local_main_process)
    models.train()
    n = args.train_batch_size
    for step in progress:
        generator = step_generator(args.seed, step, accelerator.process_index)
        start = (step * accelerator.num_processes + accelerator.process_index) * n
        x = images[batch_indices(args.seed, start, n, len(images))].to(accelerator.device)
        bits = torch.randint(0, 2, (n, args.num_bits), generator=generator).float().to(accelerator.device)
        lr = lr_at(args, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        unwrapped = accelerator.unwrap_model(models)
        xw = quantize_straight_through(unwrapped["encoder"](x, bits))
        logits = unwrapped["extractor"](attack(xw, generator))
        loss_w = F.binary_cross_entropy_with_logits(logits, bits)
        loss_i = F.mse_loss(xw, x)
        loss = loss_w + args.lambda_i * loss_i
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; lower --learning_rate?")
        acc = ((logits > 0).float() == bits).float().mean().item()
        psnr = 10 * math.log10(1 / max(loss_i.item(), 1e-12))
        progress.set_postfix(loss=f"{loss_w.item():.3f}", bit_acc=f"{acc:.3f}", psnr=f"{psnr:.1f}", lr=f"{lr:.1e}")
        if accelerator.is_main_process and (step + 1) % args.checkpointing_steps == 0:
            save_checkpoint(output_dir, step + 1, {"models": unwrapped}, optimizer, extra={"seed": args.seed},
                            total_limit=args.checkpoints_total_limit)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(models)
        extractor, encoder = unwrapped["extractor"].eval(), unwrapped["encoder"].eval()
        accelerator.print(f"whitening on {args.num_whitening_images} held-out unwatermarked images ...")
        held_out = clean_images(args.num_whitening_images, args.seed + 1, args.resolution, vae).to(accelerator.device)
        stats = whiten(extractor, held_out)
        extra = {"training": {k: v for k, v in vars(args).items() if k not in ("resume_from_checkpoint", "output_dir")},
                 "whitening": stats, "steps": args.max_train_steps}
        save_extractor(extractor.cpu(), output_dir, extra=extra)
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        meta = {"num_bits": str(args.num_bits), "channels": str(args.encoder_channels),
                "depth": str(args.encoder_depth), "scaling": str(args.scaling_w)}
        data = safetensors.torch.save(state, metadata=meta)
        atomic_write(output_dir / "encoder.safetensors", lambda tmp: Path(tmp).write_bytes(data))
        accelerator.print(f"saved the whitened extractor and the encoder to {output_dir} ({json.dumps(stats)})")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
