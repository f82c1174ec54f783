#!/usr/bin/env python
"""Control fidelity of the CSC-Tuner against diffusers' ControlNet on the shipped tiny SD, measured side by side.

    python scripts/eval_csc.py                                  # canny, 300 steps, csc + controlnet
    python scripts/eval_csc.py --steps 600 --methods csc csc_1x1 controlnet

Every method is trained by ``scripts/train_csc_tuner.py`` (one loop, same shapes-world data with the exact canny
ground truth, same steps, batch, learning rate and seed; a fresh subprocess each), loaded back the way users load
it (``CSCControlModel.from_tuners`` into ``StableDiffusionCSCControlPipeline``; ``ControlNetModel.from_pretrained``
into ``StableDiffusionControlNetPipeline``), and measured on the same unseen scenes (their captions as prompts,
their ground-truth edges as the control image, one seeded image each):

* edge F1 (1 px tolerance, ``vistune.metrics.edge_f1``) between the control edges and the canny edges of the
  generated image, against the uncontrolled model on the same prompts and seeds;
* caption fidelity (``vistune.metrics.caption_fidelity``: every prompted colour and shape found by the checker).

Writes ``<output_dir>/csc_fidelity.json``, ``.md`` and ``.png`` (rows: control, uncontrolled, each method,
the real scenes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vistune.assets import asset_path
from vistune.bench.runner import write_results
from vistune.conditions import canny
from vistune.data import ShapesDataset
from vistune.metrics import caption_fidelity, edge_f1
from vistune.sd_training import ConditionedDataset

SCRIPT = Path(__file__).with_name("train_csc_tuner.py")
METHODS = ("csc", "csc_1x1", "controlnet")
SAMPLING_STEPS = 25
GUIDANCE = 4.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None, help="default: the shipped assets/tiny-sd-shapes")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["csc", "controlnet"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--conditioning_dropout", type=float, default=0.1)
    p.add_argument("--num_train_images", type=int, default=2000)
    p.add_argument("--num_eval_scenes", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_training", action="store_true", help="reuse the outputs already in --work_dir")
    p.add_argument("--work_dir", default="build/eval_csc")
    p.add_argument("--output_dir", default="build/eval_csc")
    return p.parse_args(argv)


def train(args, method: str, base: Path, out: Path, resolution: int) -> float:
    """Train ``method`` with the training script in a fresh process; returns its wall time in seconds."""
    command = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(base),
               "--method", "controlnet" if method == "controlnet" else "csc", "--condition", "canny",
               "--shapes_domain", "plain", "--num_train_images", str(args.num_train_images),
               "--resolution", str(resolution), "--train_batch_size", str(args.batch_size),
               "--max_train_steps", str(args.steps), "--learning_rate", str(args.learning_rate),
               "--conditioning_dropout", str(args.conditioning_dropout), "--seed", str(args.seed),
               "--checkpointing_steps", str(args.steps + 1), "--report_to", "none", "--output_dir", str(out)]
    if method == "csc_1x1":
        command += ["--dense_kernel_size", "1"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def eval_scenes(args, size: int):
    """Unseen scenes (another seed than training): prompts, ground-truth canny maps, edge maps."""
    data = ConditionedDataset(
        ShapesDataset(args.num_eval_scenes, seed=args.seed + 10_000, size=size, num_shapes=(1, 2)), "canny"
    )  # at most two shapes: longer captions exceed the tiny tokenizer's 16 tokens
    prompts = [data.dataset.scene(i).caption for i in range(len(data))]
    controls = torch.stack([data[i]["control"] for i in range(len(data))])
    return prompts, controls


def real_images(args, size: int) -> np.ndarray:
    """The evaluation scenes themselves (H x W x 3 in [0, 1]): the upper bound of both metrics."""
    data = ShapesDataset(args.num_eval_scenes, seed=args.seed + 10_000, size=size, num_shapes=(1, 2))
    return np.stack([data.scene(i).image for i in range(len(data))]).astype(np.float32) / 255


def load_pipeline(base: Path, method: str | None, trained: Path | None):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from vistune.pipelines.csc_control import CSCControlModel, StableDiffusionCSCControlPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    if method in ("csc", "csc_1x1"):
        controlnet = CSCControlModel.from_tuners(pipe.unet, [trained])
        pipe = StableDiffusionCSCControlPipeline(controlnet=controlnet, **pipe.components)
    elif method == "controlnet":
        controlnet = ControlNetModel.from_pretrained(trained, subfolder="controlnet")
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], controls: torch.Tensor | None, seed: int, chunk: int = 16) -> np.ndarray:
    """One image per prompt (generator seeded by its index), as H x W x 3 floats in [0, 1]."""
    out = []
    for start in range(0, len(prompts), chunk):
        end = min(start + chunk, len(prompts))
        kwargs = dict(num_inference_steps=SAMPLING_STEPS, guidance_scale=GUIDANCE, output_type="np",
                      generator=[torch.Generator().manual_seed(seed + i) for i in range(start, end)])
        if controls is not None:
            kwargs["image"] = controls[start:end]
            if hasattr(pipe, "prepare_control"):  # the CSC pipeline: the map is already the condition
                kwargs["preprocess"] = False
        with torch.no_grad():
            out.append(pipe(prompts[start:end], **kwargs).images)
    return np.concatenate(out)


def measure(images: np.ndarray, prompts: list[str], controls: torch.Tensor) -> dict:
    uint8 = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
    edges = canny(np.stack(uint8))[:, 0] > 0.5
    f1 = [edge_f1(e.numpy(), c[0].numpy() > 0.5) for e, c in zip(edges, controls)]
    return {"edge_f1": float(np.mean(f1)), "caption_fidelity": caption_fidelity(uint8, prompts)}


def trainable_count(pipe, method: str | None) -> int:
    controlnet = getattr(pipe, "controlnet", None)
    return 0 if method is None or controlnet is None else sum(p.numel() for p in controlnet.parameters())


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Canny control of the shipped tiny SD: CSC-Tuner vs diffusers ControlNet",
        "",
        f"{meta['steps']} steps x batch {meta['batch_size']}, AdamW constant lr {meta['learning_rate']:g}, caption "
        f"dropout {meta['conditioning_dropout']:g}, seed {meta['seed']}, {meta['train_images']} training scenes with "
        f"exact edges; {meta['eval_scenes']} unseen scenes (caption as prompt, ground-truth edges as control), one "
        f"image each, {SAMPLING_STEPS} DDIM steps, guidance {GUIDANCE:g}. Edge F1: canny edges of the image vs the "
        "control edges, 1 px tolerance.",
        "",
        "| method | trainable params | edge F1 | F1 / uncontrolled | caption fidelity | fidelity change | train time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]
    for r in rows:
        ratio = r["edge_f1"] / base["edge_f1"] if base["edge_f1"] else float("nan")
        change = 100 * (r["caption_fidelity"] - base["caption_fidelity"])
        seconds = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else "-"
        lines.append(f"| {r['method']} | {r['trainable_params']:,d} | {r['edge_f1']:.3f} | {ratio:.2f}x | "
                     f"{100 * r['caption_fidelity']:.1f}% | {change:+.1f} pts | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    base = Path(args.pretrained_model_name_or_path or asset_path("tiny-sd-shapes"))
    work, results = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(base, None, None)
    size = pipe.vae.config.sample_size
    prompts, controls = eval_scenes(args, size)

    images = generate(pipe, prompts, None, args.seed)
    rows = [{"method": "uncontrolled", "trainable_params": 0, **measure(images, prompts, controls)}]
    real = {"method": "real scenes (upper bound)", "trainable_params": 0,
            **measure(real_images(args, size), prompts, controls)}
    print(json.dumps(real), flush=True)
    grids = {"control": controls.permute(0, 2, 3, 1).numpy(), "uncontrolled": images}
    print(json.dumps(rows[-1]), flush=True)
    for method in args.methods:
        out = work / method
        row = {"method": method}
        if not args.skip_training:
            row["train_seconds"] = train(args, method, base, out, size)
        pipe = load_pipeline(base, method, out)
        images = generate(pipe, prompts, controls, args.seed)
        rows.append({**row, "trainable_params": trainable_count(pipe, method), **measure(images, prompts, controls)})
        grids[method] = images
        print(json.dumps(rows[-1]), flush=True)

    rows.append(real)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
            "conditioning_dropout": args.conditioning_dropout, "seed": args.seed,
            "train_images": args.num_train_images, "eval_scenes": args.num_eval_scenes, "base": str(base)}
    table = markdown(rows, meta)
    write_results(rows, meta, table, results, "csc_fidelity")
    columns = min(8, args.num_eval_scenes)
    from PIL import Image

    grids["real"] = real_images(args, size)
    grid = np.concatenate([np.concatenate(list(g[:columns]), axis=1) for g in grids.values()], axis=0)
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).resize(
        (grid.shape[1] * 3, grid.shape[0] * 3), resample=Image.NEAREST).save(results / "csc_fidelity.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
