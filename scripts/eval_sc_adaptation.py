#!/usr/bin/env python
"""Style adaptation of the shipped tiny SD by SC-Tuner, peft LoRA and full fine-tuning, measured side by side.

    python scripts/eval_sc_adaptation.py                       # pastel, 600 steps, all methods
    python scripts/eval_sc_adaptation.py --style striped --steps 1000
    python scripts/eval_sc_adaptation.py --skip_training --images_per_prompt 32   # measure saved runs again

Every method is trained by ``scripts/train_sc_tuner.py`` (one loop, same data, steps, batch, learning rate and
seed; a fresh subprocess each), loaded back the way users load it (``load_tuners``, ``load_lora_weights``,
``UNet2DConditionModel.from_pretrained``), and measured with the analytic metrics on the same seeded prompts:

* style statistic of the target domain (``vistune.data.style_statistic``) and the share of the gap from the base
  model's value to real images of that style that the method closes; the same real images round-tripped through
  the model's VAE give the ceiling (no U-Net tuner can output what the VAE cannot decode);
* caption fidelity (every prompted colour and shape found by the checker) and its change from the base model.

Where the fidelity cost comes from: ``--step_windows 0:0.5 0.5:1`` also measures each trained SC-Tuner and LoRA
acting on part of the sampling steps only (strength 0 elsewhere; fractions of the steps, as diffusers'
``control_guidance_start`` / ``end``), and ``--recolored_base`` (pastel) adds the base model's own images
recoloured to pastel pixel by pixel (``vistune.data.recolor_pastel``): the style with no shape changed.

Writes ``<output_dir>/sc_adaptation_<style>.{json,md,png}`` (the grid: one image per prompt, a row per method).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from vistune import core
from vistune.assets import asset_path, sd_label
from vistune.bench.runner import write_results
from vistune.data import recolor_pastel
from vistune.demo import (
    PROMPTS, SAMPLING_STEPS, generate, mean_statistic, save_grid, style_domain, vae_round_trip,
)
from vistune.metrics import caption_fidelity, caption_misses
from vistune.pipelines.steps import in_step_window
from vistune.sd_training import (
    LORA_TARGET_MODULES, LORA_WEIGHT_NAME, TIMESTEP_SAMPLINGS, check_caption_dropout, ema_flags, ema_note, index_list,
    read_train_time, record_train_time, snr_flag, snr_note, timestep_flags, timesteps_note,
)

SCRIPT = Path(__file__).with_name("train_sc_tuner.py")
METHODS = ("sc", "lora", "full")
ALL_STEPS = (0.0, 1.0)  # the step window of a method acting on every sampling step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None, help="default: the shipped assets/tiny-sd-shapes")
    p.add_argument("--style", default="pastel")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--full_learning_rate", type=float, default=None,
                   help="learning rate for full fine-tuning (default: --learning_rate / 10, its usual setting)")
    p.add_argument("--sc_target_skips", type=index_list, help="decoder skips the SC-Tuner tunes (default: all)")
    p.add_argument("--sc_down_ratio", type=float, default=1.0, help="SC-Tuner hidden width / skip channels")
    p.add_argument("--lora_rank", type=int, default=4, help="4: about SC-Tuner's trainable parameters on the tiny U-Net")
    p.add_argument("--timestep_sampling", default="uniform", choices=TIMESTEP_SAMPLINGS,
                   help="training timesteps: uniform (the SD recipe), cubic (biased to high noise, where layout and colour "
                        "form) or cubic_low (biased to low noise)")
    p.add_argument("--max_train_timestep", type=int, default=None,
                   help="every method trains on timesteps below this only (train_sc_tuner.py --max_train_timestep); "
                        "measure it with the --step_windows whose sampling steps lie below it, e.g. 500 and 0.5:1")
    p.add_argument("--snr_gamma", type=float, default=None,
                   help="train every method with Min-SNR loss weights of this gamma (default: plain MSE)")
    p.add_argument("--use_ema", action="store_true",
                   help="every method saves the moving average of its trained weights (train_sc_tuner.py --use_ema)")
    p.add_argument("--ema_decay", type=float, default=0.9999)
    p.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="every method trains this share of its examples with the empty caption "
                        "(train_sc_tuner.py --proportion_empty_prompts)")
    p.add_argument("--num_train_images", type=int, default=1000)
    p.add_argument("--images_per_prompt", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default="build/eval_sc_adaptation")
    p.add_argument("--skip_training", action="store_true",
                   help="measure the runs already in --work_dir again (e.g. with more --images_per_prompt); pass the "
                        "training flags they were trained with, since the report describes its runs by them")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="inference strengths to measure each trained SC-Tuner and LoRA at (the tuners' scale, LoRA's "
                        "adapter weight), e.g. 1 0.8 0.6 for the trade-off between style and caption fidelity; full "
                        "fine-tuning is measured at 1 only")
    p.add_argument("--step_windows", type=step_window, nargs="+", default=[ALL_STEPS],
                   help="START:END fractions of the sampling steps where each trained SC-Tuner and LoRA acts "
                        "(strength 0 elsewhere), one row each, e.g. 0:1 0:0.5 0.5:1; full fine-tuning: 0:1 only")
    p.add_argument("--recolored_base", action="store_true",
                   help="add a row of the base model's images recoloured to pastel (needs --style pastel)")
    p.add_argument("--output_dir", default="benchmarks/results")
    args = p.parse_args(argv)
    if any(not 0 < s <= 2 for s in args.scales):
        p.error(f"--scales must lie in (0, 2], got {args.scales}")
    check_caption_dropout(p, "--proportion_empty_prompts", args.proportion_empty_prompts)
    if args.recolored_base and args.style != "pastel":
        p.error(f"--recolored_base recolours to pastel only, not {args.style!r}")
    return args


def step_window(text: str) -> tuple[float, float]:
    """'START:END' -> (start, end), fractions of the sampling steps with 0 <= start < end <= 1."""
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a step window is START:END, e.g. 0:0.5; got {text!r}") from None
    if not 0.0 <= start < end <= 1.0:
        raise argparse.ArgumentTypeError(f"a step window needs 0 <= START < END <= 1, got {text!r}")
    return start, end


def train(args, method: str, base: Path, out: Path, resolution: int) -> float:
    """Train ``method`` with the training script in a fresh process; returns its wall time in seconds."""
    lr = args.learning_rate if method != "full" else (args.full_learning_rate or args.learning_rate / 10)
    command = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(base), "--method", method,
               "--shapes_domain", args.style, "--num_train_images", str(args.num_train_images),
               "--resolution", str(resolution),
               "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
               "--learning_rate", str(lr), "--lora_rank", str(args.lora_rank), "--seed", str(args.seed),
               *timestep_flags(args.timestep_sampling, args.max_train_timestep), *snr_flag(args.snr_gamma),
               *ema_flags(args.use_ema, args.ema_decay), *dropout_flag(args.proportion_empty_prompts),
               "--checkpointing_steps", str(args.steps + 1), "--report_to", "none", "--output_dir", str(out)]
    if method == "sc":
        command += ["--sc_down_ratio", str(args.sc_down_ratio)]
        if args.sc_target_skips is not None:
            command.append("--sc_target_skips=" + ",".join(map(str, args.sc_target_skips)))
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def load_pipeline(base: Path, method: str | None = None, trained: Path | None = None):
    """The base pipeline, or the base with ``method``'s output loaded the way a user loads it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if method == "sc":
        core.load_tuners(pipe.unet, trained)
    elif method == "lora":
        pipe.load_lora_weights(trained, weight_name=LORA_WEIGHT_NAME)
    elif method == "full":
        pipe.unet = UNet2DConditionModel.from_pretrained(trained, subfolder="unet")
    return pipe


def set_strength(pipe, method: str, scale: float) -> None:
    """Scale the trained method's effect at inference: 0 would be the base model, 1 the trained one."""
    if method == "sc":
        core.set_scale(pipe.unet, scale)
    elif method == "lora":
        names = pipe.get_active_adapters()
        pipe.set_adapters(names, adapter_weights=[scale] * len(names))
    elif scale != 1.0:
        raise ValueError(f"{method} has no inference strength; measure it at scale 1")


def windowed(pipe, method: str, scale: float, window: tuple[float, float]):
    """Set ``method``'s strength for the first sampling step and return the ``callback_on_step_end`` that sets it
    for each next one: ``scale`` inside ``window`` (fractions of the steps), 0 outside. It wraps round after the
    last step, so the next prompt's call starts right too."""

    def strength(i: int, total: int) -> float:
        return scale if in_step_window(i, total, *window) else 0.0

    def step_end(called, i, t, callback_kwargs):
        total = called.num_timesteps
        set_strength(called, method, strength((i + 1) % total, total))
        return {}

    set_strength(pipe, method, strength(0, SAMPLING_STEPS))
    return step_end


def method_label(row: dict) -> str:
    """The row's method, with its inference strength when that is not 1 and its step window when not all."""
    scale, window = row.get("scale", 1.0), tuple(row.get("step_window", ALL_STEPS))
    label = row["method"] if scale == 1.0 else f"{row['method']} at scale {scale:g}"
    return label if window == ALL_STEPS else f"{label} on steps {window[0]:g}-{window[1]:g}"


def trainable_count(pipe, method: str | None) -> int:
    unet = pipe.unet
    if method == "sc":
        return sum(p.numel() for tuner in core.list_tuners(unet).values() for p in tuner.parameters())
    if method == "lora":
        return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    return sum(p.numel() for p in unet.parameters()) if method == "full" else 0


def gap_share(value: float, base: float, target: float) -> float:
    """Share of the style gap from ``base`` to ``target`` that ``value`` covers (0 = base, 1 = real images)."""
    return (value - base) / (target - base)


def measure(args, pipe, prompts: list[str], target: float, base_row: dict | None, images: list | None = None,
            **call_kwargs) -> tuple[dict, list]:
    """Generate (or take ``images``) and measure the style statistic, caption fidelity and misses."""
    if images is None:
        images = generate(pipe, PROMPTS, args.seed, args.images_per_prompt, **call_kwargs)
    row = {"style_statistic": mean_statistic(images, args.style), "caption_fidelity": caption_fidelity(images, prompts),
           "caption_misses": caption_misses(images, prompts)}
    if base_row is not None:
        row["style_gap_closed"] = gap_share(row["style_statistic"], base_row["style_statistic"], target)
        row["fidelity_change_points"] = 100 * (row["caption_fidelity"] - base_row["caption_fidelity"])
    return row, images


def dropout_flag(proportion: float) -> list[str]:
    """The training-script arguments for caption dropout (none when 0)."""
    return ["--proportion_empty_prompts", str(proportion)] if proportion > 0 else []


def dropout_note(meta: dict) -> str:
    """The report phrase for runs trained with caption dropout (``meta["proportion_empty_prompts"]``), else ``""``."""
    share = meta.get("proportion_empty_prompts") or 0
    return f", {100 * share:g}% of the captions dropped" if share > 0 else ""


def methods_note(rows: list[dict], meta: dict) -> str:
    """How the report's SC-Tuner and LoRA were configured (the rows name only the method)."""
    methods, notes = {r["method"] for r in rows}, []
    if "sc" in methods:
        skips = meta.get("sc_target_skips")
        where = "every skip" if skips is None else "decoder skips " + ", ".join(map(str, skips))
        notes.append(f"SC-Tuner on {where}, hidden width {meta.get('sc_down_ratio', 1.0):g}x the skip's channels")
    if "lora" in methods:
        notes.append(f"LoRA rank {meta['lora_rank']} on {', '.join(LORA_TARGET_MODULES)}")
    return "".join(f" {note}." for note in notes)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Style adaptation of {meta.get('model', 'the shipped tiny SD')} to '{meta['style']}'",
        "",
        f"{meta['steps']} steps x batch {meta['batch_size']}, AdamW constant lr {meta['learning_rate']:g} "
        f"(full fine-tuning {meta['full_learning_rate']:g}), {timesteps_note(meta)}{snr_note(meta)}{ema_note(meta)}{dropout_note(meta)}, seed {meta['seed']}, {meta['train_images']} training scenes; "
        f"{len(PROMPTS)} prompts x {meta['images_per_prompt']} images, 25 DDIM steps. Real '{meta['style']}' images "
        f"score {meta['style_target']:.3f}; through the model's VAE (encode + decode) they score "
        f"{meta['style_vae_ceiling']:.3f}, so no U-Net tuner can close more than {100 * meta['gap_ceiling']:.0f}% of the gap.{methods_note(rows, meta)} "
        "Train time is wall clock on the machine as it was shared during the run.",
        "",
        "| method | trainable params | style statistic | gap closed | caption fidelity | fidelity change | train time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gap = f"{100 * r['style_gap_closed']:.0f}%" if "style_gap_closed" in r else "0%"
        change = f"{r['fidelity_change_points']:+.1f} pts" if "fidelity_change_points" in r else "-"
        seconds = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else "-"
        lines.append(f"| {method_label(r)} | {r['trainable_params']:,d} | {r['style_statistic']:.3f} | {gap} | "
                     f"{100 * r['caption_fidelity']:.1f}% | {change} | {seconds} |")
    return "\n".join(lines + probes_note(rows) + misses_note(rows))


def probes_note(rows: list[dict]) -> list[str]:
    """What the probe rows (recoloured base, step windows) are, when the report has any."""
    notes = []
    if any(r["method"] == "base recoloured" for r in rows):
        notes.append("'base recoloured': the base model's images above with their shapes mixed toward white as the "
                     "pastel style mixes them (`vistune.data.recolor_pastel`), the style with no shape changed.")
    if any(tuple(r.get("step_window", ALL_STEPS)) != ALL_STEPS for r in rows):
        notes.append(f"'on steps a-b': the trained method acts on that fraction of the {SAMPLING_STEPS} sampling steps "
                     "only (0 = the first, noisiest), at strength 0 on the others.")
    return ["", " ".join(notes)] if notes else []


def misses_note(rows: list[dict]) -> list[str]:
    """A line on why captions failed (``vistune.metrics.caption_misses``), for rows that measured it."""
    parts = []
    for r in rows:
        if (m := r.get("caption_misses")) is not None:
            missed = m["wrong_shape"] + m["wrong_colour"] + m["missing"]
            parts.append(f"{method_label(r)} {missed} of {missed + m['found']} ({m['wrong_shape']} / {m['wrong_colour']} / "
                         f"{m['missing']})")
    if not parts:
        return []
    return ["", "Prompted (colour, shape) pairs the checker missed (the colour found on another shape only / the shape "
            "found in another colour only / neither): " + "; ".join(parts) + "."]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    base = Path(args.pretrained_model_name_or_path or asset_path("tiny-sd-shapes"))
    work, results = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    prompts = [p for p in PROMPTS for _ in range(args.images_per_prompt)]
    pipe = load_pipeline(base)
    size = pipe.vae.config.sample_size
    reference, _ = style_domain(args.style, 128, args.seed + 2000, size)
    target = mean_statistic(reference, args.style)
    ceiling = mean_statistic(vae_round_trip(pipe.vae, reference), args.style)

    base_row, images = measure(args, pipe, prompts, target, None)
    rows = [{"method": "base", "trainable_params": 0, **base_row}]
    grids = {"base": images}
    if args.recolored_base:
        recolored = [Image.fromarray(recolor_pastel(image)) for image in images]
        row, _ = measure(args, pipe, prompts, target, base_row, images=recolored)
        rows.append({"method": "base recoloured", "trainable_params": 0, **row})
        grids["base recoloured"] = recolored
    for method in args.methods:
        out = work / method
        if not args.skip_training:
            record_train_time(out, train(args, method, base, out, size))
        elif not out.is_dir():
            raise SystemExit(f"--skip_training: no {method} run in {out}; train it first (without --skip_training)")
        pipe = load_pipeline(base, method, out)
        fixed = {"trainable_params": trainable_count(pipe, method)}
        if (seconds := read_train_time(out)) is not None:
            fixed["train_seconds"] = seconds
        tunable = method != "full"
        for scale in args.scales if tunable else [1.0]:
            for window in args.step_windows if tunable else [ALL_STEPS]:
                callback = windowed(pipe, method, scale, window)
                row, images = measure(args, pipe, prompts, target, base_row, callback_on_step_end=callback)
                rows.append({"method": method, "scale": scale, "step_window": list(window), **fixed, **row})
                grids[method_label(rows[-1])] = images
                print(json.dumps(rows[-1]))

    meta = {"style": args.style, "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
            "full_learning_rate": args.full_learning_rate or args.learning_rate / 10, "seed": args.seed,
            "train_images": args.num_train_images, "images_per_prompt": args.images_per_prompt, "style_target": target,
            "lora_rank": args.lora_rank, "sc_target_skips": args.sc_target_skips, "sc_down_ratio": args.sc_down_ratio,
            "timestep_sampling": args.timestep_sampling, "max_train_timestep": args.max_train_timestep,
            "snr_gamma": args.snr_gamma, "use_ema": args.use_ema, "ema_decay": args.ema_decay,
            "proportion_empty_prompts": args.proportion_empty_prompts,
            "step_windows": [list(w) for w in args.step_windows],
            "style_vae_ceiling": ceiling,
            "gap_ceiling": gap_share(ceiling, base_row["style_statistic"], target), "base": str(base),
            "model": sd_label(base)}
    table = markdown(rows, meta)
    write_results(rows, meta, table, results, f"sc_adaptation_{args.style}")
    first = [images[i] for images in grids.values() for i in range(0, len(images), args.images_per_prompt)]
    save_grid(first, len(PROMPTS), results / f"sc_adaptation_{args.style}.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
