#!/usr/bin/env python
"""Train HST (Hierarchical Side-Tuning) on a frozen timm ViT for classification, segmentation or detection, or
the full / linear-probe / peft-LoRA baselines with the same loop.

Runs under ``accelerate launch`` or plain ``python``; nothing is downloaded.

    # shapes-world tasks on the shipped tiny ViT (default --vit), evaluated on held-out scenes at the end
    python scripts/train_hst.py --task segment --method hst --max_train_steps 300 --output_dir out/seg-hst
    python scripts/train_hst.py --task detect --method lora --output_dir out/det-lora

    # your data: classification = ImageFolder (root/<class>/<image>); segmentation = root/images + root/masks
    # (class ids as PNG pixel values, --num_classes); detection = COCO json + its image folder
    python scripts/train_hst.py --task classify --train_data_dir my_classes/ --vit path/to/timm-folder ...
    python scripts/train_hst.py --task segment --train_data_dir my_seg/ --num_classes 21 ...
    python scripts/train_hst.py --task detect --train_data_dir images/ --coco_json train.json ...

    # continue an interrupted run: add --resume_from_checkpoint latest

``--vit`` is a timm model folder (``config.json`` + weights, timm's ``local-dir`` layout) or ``timm:<name>`` for
random weights. Images are resized to the ViT's input size. Every random draw of a step (which examples) is a
function of (seed, step), so resuming reproduces an uninterrupted run exactly.

Outputs in ``--output_dir`` (atomic): ``task_config.json`` + ``task_model.safetensors`` (the whole task model,
loadable with ``vistune.dense.load_task_model`` and the HST dense pipeline), for ``--method hst`` also ``hst/``
(the tuner alone, ``vistune.load_tuners(vit, out/hst)``), ``metrics.json`` (evaluation), ``checkpoint-<step>/``.
Defaults follow the official HST recipe where it fits a short run: AdamW, weight decay 5e-4, cosine schedule with
warmup (official: lr 1e-2 for HST; the baselines default to 1e-3, full fine-tuning to 1e-4).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from vistune.assets import TINY_VIT, asset_path
from vistune.core.serialization import atomic_write
from vistune.data.dense import ClassificationFolder, CocoDetection, SegmentationFolder, ShapesTaskDataset, dense_collate
from vistune.dense import METHODS, TASKS, build_task_model, create_vit, evaluate_task, save_task_model
from vistune.dense.heads import DETECTORS
from vistune.training import checkpoint_extra, resolve_checkpoint, resume_training, save_checkpoint
from vistune.tuners.hst import HSTConfig

DEFAULT_LR = {"hst": 1e-2, "linear": 1e-3, "lora": 1e-3, "full": 1e-4}
EVAL_SEED_OFFSET = 1_000_003


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--method", default="hst", choices=METHODS)
    p.add_argument("--vit", help="timm model folder or timm:<architecture>; default: the shipped tiny ViT")
    p.add_argument("--train_data_dir", help="user data (see the module help); default: shapes-world scenes")
    p.add_argument("--coco_json", help="COCO annotation file for --task detect with --train_data_dir")
    p.add_argument("--eval_data_dir", help="held-out user data in the same layout")
    p.add_argument("--eval_coco_json")
    p.add_argument("--num_classes", type=int, help="segmentation classes (mask ids) for a user folder")
    p.add_argument("--num_train_images", type=int, default=2000, help="shapes-world training scenes")
    p.add_argument("--num_eval_images", type=int, default=200, help="shapes-world evaluation scenes (0 = none)")
    p.add_argument("--hst_backbone_grad", default="true", choices=["true", "false"],
                   help="false: no meta tokens / LayerNorm tuning, backward never enters the ViT")
    p.add_argument("--hst_gradient_checkpointing", default="true", choices=["true", "false"],
                   help="recompute the ViT blocks in backward (about half the memory, about +40%% step time)")
    p.add_argument("--detector", default="fcos", choices=DETECTORS)
    p.add_argument("--fpn_channels", type=int, default=64)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--output_dir", default="hst-output")
    p.add_argument("--seed", type=int, help="default: random (recorded in checkpoints, reused on resume)")
    p.add_argument("--train_batch_size", type=int, default=32, help="per process")
    p.add_argument("--max_train_steps", type=int, default=500)
    p.add_argument("--learning_rate", type=float, help="default: 1e-2 hst, 1e-3 linear/lora, 1e-4 full")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--checkpoints_total_limit", type=int)
    p.add_argument("--resume_from_checkpoint", help='"latest" (newest in --output_dir, if any) or a checkpoint path')
    p.add_argument("--num_threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    for name in ("train_batch_size", "max_train_steps", "checkpointing_steps", "num_train_images", "fpn_channels",
                 "lora_rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.task == "segment" and args.train_data_dir and not args.num_classes:
        p.error("--task segment with --train_data_dir needs --num_classes")
    if args.task == "detect" and args.train_data_dir and not args.coco_json:
        p.error("--task detect with --train_data_dir needs --coco_json")
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LR[args.method]
    return args


def build_datasets(args, size: int):
    """(train, eval or None, class names); user data is checked here, before anything is written."""
    if not args.train_data_dir:
        train = ShapesTaskDataset(args.task, args.num_train_images, seed=args.seed, size=size)
        held_out = (ShapesTaskDataset(args.task, args.num_eval_images, seed=args.seed + EVAL_SEED_OFFSET, size=size)
                    if args.num_eval_images else None)
        return train, held_out, list(train.class_names)

    def user(root, coco):
        if args.task == "classify":
            return ClassificationFolder(root, size)
        if args.task == "segment":
            return SegmentationFolder(root, size, args.num_classes)
        return CocoDetection(root, coco, size)

    train = user(args.train_data_dir, args.coco_json)
    if len(train) == 0:
        raise ValueError(f"no training examples in {args.train_data_dir}")
    train[0]  # decode one example now: a bad mask or image fails before any output is written
    held_out = user(args.eval_data_dir, args.eval_coco_json or args.coco_json) if args.eval_data_dir else None
    return train, held_out, list(train.class_names)


def task_loss(model, task: str, images: torch.Tensor, targets) -> torch.Tensor:
    if task == "classify":
        return F.cross_entropy(model(images), targets)
    if task == "segment":
        return F.cross_entropy(model(images), targets, ignore_index=255)
    return sum(model(list(images), targets).values())


def step_batch(dataset, seed: int, step: int, process: int, batch_size: int):
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 9973 + process)
    indices = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
    return dense_collate([dataset[i] for i in indices])


def to_device(targets, device):
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    resume = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        saved = checkpoint_extra(resume)
        if (saved.get("task"), saved.get("method")) != (args.task, args.method):
            raise ValueError(f"{resume} was written by --task {saved.get('task')} --method {saved.get('method')}")
        args.seed = saved["seed"]
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    vit = create_vit(args.vit or str(asset_path(TINY_VIT)))
    size = int(vit.patch_embed.img_size[0])
    train, held_out, class_names = build_datasets(args, size)
    num_classes = args.num_classes if args.task == "segment" and args.train_data_dir else len(class_names)

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)  # new modules (tuner, heads, LoRA) are drawn from the global RNG
    hst_config = HSTConfig(backbone_grad=args.hst_backbone_grad == "true",
                           gradient_checkpointing=args.hst_gradient_checkpointing == "true")
    build_kwargs = {"hst_config": hst_config, "detector": args.detector, "fpn_channels": args.fpn_channels,
                    "lora_rank": args.lora_rank}
    model = build_task_model(vit, args.task, args.method, num_classes, **build_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)

    first_step = resume_training(resume, {"model": inner}, optimizer, lr_scheduler, accelerator.print)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.print(f"{args.task} / {args.method}: {len(train)} training examples, {num_classes} classes, "
                      f"{sum(p.numel() for p in params):,d} trainable parameters, {args.max_train_steps} steps of "
                      f"{args.train_batch_size} x {accelerator.num_processes} processes")

    model.train()
    progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                    desc="Steps", disable=not accelerator.is_local_main_process)
    for step in progress:
        images, targets = step_batch(train, args.seed, step, accelerator.process_index, args.train_batch_size)
        loss = task_loss(model, args.task, images.to(accelerator.device), to_device(targets, accelerator.device))
        accelerator.backward(loss)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        step_loss = accelerator.reduce(loss.detach(), "mean").item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; lower --learning_rate?")
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if accelerator.is_main_process and (step + 1) % args.checkpointing_steps == 0:
            extra = {"seed": args.seed, "task": args.task, "method": args.method,
                     "lr_scheduler": lr_scheduler.state_dict()}
            save_checkpoint(output_dir, step + 1, {"model": inner}, optimizer, extra=extra,
                            total_limit=args.checkpoints_total_limit)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_task_model(inner, output_dir, vit=vit, task=args.task, method=args.method, num_classes=num_classes,
                        class_names=class_names, build_kwargs=build_kwargs)
        if args.method == "hst":
            import vistune

            vistune.save_tuners(vit, output_dir / "hst")
        metrics = {"task": args.task, "method": args.method, "steps": args.max_train_steps, "seed": args.seed,
                   "trainable_parameters": sum(p.numel() for p in params)}
        if held_out is not None:
            metrics.update(evaluate_task(inner, args.task, held_out, device=accelerator.device))
            accelerator.print(json.dumps(metrics))
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(output_dir / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
