#!/usr/bin/env python
"""Control fidelity of the CSC-Tuner against diffusers' ControlNet on the shipped tiny SD, measured side by side.

    python scripts/eval_csc.py                                  # canny, 300 steps, csc + controlnet
    python scripts/eval_csc.py --steps 600 --methods csc csc_1x1 controlnet
    python scripts/eval_csc.py --conditions canny segmentation color --pairs canny+color
    python scripts/eval_csc.py --methods csc --csc_encoder_width_ratio 2 --csc_down_ratio 4   # a wider CSC-Tuner
    python scripts/eval_csc.py --skip_training --control_scales 1 1.5 2   # re-measure at other inference scales
    python scripts/eval_csc.py --conditions segmentation --learning_rate 3e-3 --controlnet_learning_rate 1e-3 \\
        --csc_encoder_width_ratio 2 --csc_down_ratio 4 --csc_condition_channels 512 --control_scales 1 1.5

Every method is trained by ``scripts/train_csc_tuner.py`` for each ``--conditions`` entry (one loop, same
shapes-world data with the exact ground truth for canny and segmentation, same steps, batch, learning rate (unless
``--controlnet_learning_rate`` gives ControlNet its own) and seed; a fresh subprocess each; ControlNet only for
``--controlnet_conditions``), loaded back the way users load it
(``CSCControlModel.from_tuners`` into ``StableDiffusionCSCControlPipeline``; ``ControlNetModel.from_pretrained``
into ``StableDiffusionControlNetPipeline``), and measured on the same unseen scenes (their captions as prompts,
their ground-truth maps as the control images, one seeded image each). ``--pairs a+b`` combines the single-condition
CSC tuners at inference (``CSCControlModel.from_tuners`` with both, ``controlnet_conditioning_scale`` =
``--pair_weights``). Every row gets every metric:

* edge F1 (1 px tolerance, ``vistune.metrics.edge_f1``) between the ground-truth edges and the canny edges of the
  generated image (higher is better);
* mIoU (``vistune.metrics.shape_miou``) between the scene's class mask (what the segmentation condition encodes)
  and the class mask the analytic checker derives from the generated image (higher is better);
* colour-layout error (``vistune.metrics.color_layout_error``, 0-255 grey levels) between the coarse colour
  layouts of the generated image and of the scene, ``--color_cell`` px cells (default: resolution // 8, an 8 x 8
  grid like SCEdit's 64 px cells at 512 px; lower is better). Note: the ``color`` condition's own default cell is
  64 px, a single cell (the mean colour) below 96 px;
* caption fidelity (``vistune.metrics.caption_fidelity``: every prompted colour and shape found by the checker),
  and its change against the uncontrolled model on the same prompts and seeds.

Two reference rows: the real scenes (the upper bound), and the real scenes encoded and decoded by the model's VAE,
a practical ceiling (a controller steers the U-Net, whose output that VAE decodes; on the shipped model it caps
mIoU at 0.929).

Writes ``<output_dir>/csc_fidelity.json``, ``.md`` and ``.png`` (grid rows: each condition's control, uncontrolled,
each method and pair, the real scenes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from vistune.assets import asset_path, sd_label
from vistune.bench.runner import write_results
from vistune.conditions import canny, color
from vistune.core.serialization import atomic_write
from vistune.data import ShapesDataset
from vistune.demo import vae_round_trip
from vistune.metrics import caption_fidelity, color_layout_error, edge_f1, shape_miou
from vistune.sd_training import (
    TIMESTEP_SAMPLINGS, ConditionedDataset, ema_flags, ema_note, read_train_time, record_train_time, snr_flag,
    snr_note, timestep_flags, timesteps_note,
)

SCRIPT = Path(__file__).with_name("train_csc_tuner.py")
METHODS = ("csc", "csc_1x1", "controlnet")
CONDITIONS = ("canny", "segmentation", "color")  # the ones with a metric here
SAMPLING_STEPS = 25
GUIDANCE = 4.0


def parse_pair(text: str) -> tuple[str, ...]:
    """``"canny+color"`` -> ``("canny", "color")``: two or more distinct known conditions."""
    names = tuple(text.split("+"))
    if len(names) < 2 or len(set(names)) != len(names) or any(n not in CONDITIONS for n in names):
        raise argparse.ArgumentTypeError(f"a pair is two or more distinct conditions of {CONDITIONS} joined by '+', "
                                         f"got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None, help="default: the shipped assets/tiny-sd-shapes")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["csc", "controlnet"])
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=["canny"],
                   help="train and measure each method on each of these conditions")
    p.add_argument("--controlnet_conditions", nargs="+", choices=CONDITIONS, default=["canny", "segmentation"],
                   help="conditions for which the controlnet method runs (if in --methods)")
    p.add_argument("--pairs", nargs="*", type=parse_pair, default=[],
                   help="conditions combined at inference, e.g. canny+color (their csc tuners are trained as needed)")
    p.add_argument("--pair_weights", nargs="+", type=float, default=None,
                   help="controlnet_conditioning_scale for each condition of a pair (default 1.0 each)")
    p.add_argument("--control_scales", nargs="+", type=float, default=[1.0],
                   help="measure every single-condition run (CSC and ControlNet alike) at each of these inference "
                        "scales (controlnet_conditioning_scale); one row per scale")
    p.add_argument("--color_cell", type=int, default=None,
                   help="cell (px) of the colour layout the colour error compares; default resolution // 8 (an 8 x 8 "
                        "grid, as SCEdit's 64 px cells at 512 px)")
    p.add_argument("--csc_encoder_width_ratio", type=float, default=None,
                   help="CSC condition-encoder width ratio for the csc runs (default: the official 1.0)")
    p.add_argument("--csc_down_ratio", type=float, default=None,
                   help="CSC skip-MLP hidden width / skip channels for the csc runs (default: the official 1.0)")
    p.add_argument("--csc_condition_channels", type=int, default=None,
                   help="CSC condition-encoder output width for the csc runs (default: the official 256)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--controlnet_learning_rate", type=float, default=None,
                   help="learning rate of the controlnet runs (default: --learning_rate); each method at its own best")
    p.add_argument("--conditioning_dropout", type=float, default=0.1)
    p.add_argument("--timestep_sampling", default="cubic", choices=TIMESTEP_SAMPLINGS,
                   help="training timesteps for every method (cubic: biased to high noise, learns control sooner)")
    p.add_argument("--snr_gamma", type=float, default=None,
                   help="train every method with Min-SNR loss weights of this gamma (default: plain MSE)")
    p.add_argument("--use_ema", action="store_true",
                   help="every method saves the moving average of its trained weights (train_csc_tuner.py --use_ema)")
    p.add_argument("--ema_decay", type=float, default=0.9999)
    p.add_argument("--num_train_images", type=int, default=2000)
    p.add_argument("--num_eval_scenes", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_training", action="store_true", help="reuse the outputs already in --work_dir")
    p.add_argument("--work_dir", default="build/eval_csc")
    p.add_argument("--output_dir", default="build/eval_csc")
    args = p.parse_args(argv)
    if any(s <= 0 for s in args.control_scales):
        p.error("--control_scales must be positive")
    for pair in args.pairs:
        if args.pair_weights is not None and len(args.pair_weights) != len(pair):
            p.error(f"--pair_weights has {len(args.pair_weights)} value(s) for the pair {'+'.join(pair)}")
    return args


def runs(args) -> list[tuple[str, str]]:
    """``(condition, method)`` to train and measure: every method on every condition (ControlNet only on
    ``--controlnet_conditions``), plus the csc tuner of every condition a pair needs."""
    out = [(c, m) for c in args.conditions for m in args.methods
           if m != "controlnet" or c in args.controlnet_conditions]
    for pair in args.pairs:
        out += [(c, "csc") for c in pair if (c, "csc") not in out]
    return out


def run_dir(work: Path, condition: str, method: str) -> Path:
    """Where a run's output lives: ``<work>/<method>`` for canny (as before), ``<work>/<method>-<condition>``."""
    return work / (method if condition == "canny" else f"{method}-{condition}")


def learning_rate(args, method: str) -> float:
    """The learning rate ``method`` trains at: ``--controlnet_learning_rate`` for controlnet when given."""
    own = args.controlnet_learning_rate
    return own if method == "controlnet" and own is not None else args.learning_rate


def train(args, method: str, base: Path, out: Path, resolution: int, condition: str = "canny") -> float:
    """Train ``method`` on ``condition`` with the training script in a fresh process; returns its wall time (s)."""
    command = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(base),
               "--method", "controlnet" if method == "controlnet" else "csc", "--condition", condition,
               "--shapes_domain", "plain", "--num_train_images", str(args.num_train_images),
               "--resolution", str(resolution), "--train_batch_size", str(args.batch_size),
               "--max_train_steps", str(args.steps), "--learning_rate", str(learning_rate(args, method)),
               "--conditioning_dropout", str(args.conditioning_dropout), "--seed", str(args.seed),
               *timestep_flags(args.timestep_sampling), *snr_flag(args.snr_gamma),
               *ema_flags(args.use_ema, args.ema_decay), "--checkpointing_steps", str(args.steps + 1),
               "--report_to", "none", "--output_dir", str(out)]
    if method == "csc_1x1":
        command += ["--dense_kernel_size", "1"]
    if method != "controlnet":
        command += [arg for flag, value in (("--encoder_width_ratio", args.csc_encoder_width_ratio),
                                            ("--down_ratio", args.csc_down_ratio),
                                            ("--condition_channels", args.csc_condition_channels)) if value is not None
                    for arg in (flag, str(value))]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def _eval_dataset(args, size: int) -> ShapesDataset:
    # at most two shapes: three-shape captions can exceed the shipped tokenizer's 20 tokens (see assets/README.md)
    return ShapesDataset(args.num_eval_scenes, seed=args.seed + 10_000, size=size, num_shapes=(1, 2))


def eval_scenes(args, size: int, condition: str = "canny"):
    """Unseen scenes (another seed than training): prompts and the ``condition`` maps (B x 3 x H x W)."""
    data = ConditionedDataset(_eval_dataset(args, size), condition)
    prompts = [data.dataset.scene(i).caption for i in range(len(data))]
    controls = torch.stack([data[i]["control"] for i in range(len(data))])
    return prompts, controls


def color_cell(args, size: int) -> int:
    """Cell (px) of the colour layouts compared: ``--color_cell`` or ``size // 8`` (at least 1)."""
    return args.color_cell if getattr(args, "color_cell", None) else max(1, size // 8)


def eval_truth(args, size: int) -> dict:
    """What every row is scored against: prompts, ground-truth edges and class masks, and the scenes' coarse
    colour layouts at :func:`color_cell` (the colour condition itself when its cell is the same)."""
    data = _eval_dataset(args, size)
    scenes = [data.scene(i) for i in range(len(data))]
    cell = color_cell(args, size)
    return {"prompts": [s.caption for s in scenes], "edges": np.stack([s.edges > 0 for s in scenes]),
            "masks": np.stack([s.mask for s in scenes]), "color_cell": cell,
            "layouts": color(np.stack([s.image for s in scenes]), cell=cell)}


def real_images(args, size: int) -> np.ndarray:
    """The evaluation scenes themselves (H x W x 3 in [0, 1]): the upper bound of every metric."""
    data = _eval_dataset(args, size)
    return np.stack([data.scene(i).image for i in range(len(data))]).astype(np.float32) / 255


def vae_ceiling_images(vae, scenes: np.ndarray) -> np.ndarray:
    """``scenes`` (:func:`real_images`) encoded and decoded by ``vae`` (H x W x 3 in [0, 1]). A controller steers the U-Net,
    whose output the VAE decodes, so its images are not expected to match a scene more closely than these: a
    practical ceiling of every fidelity metric (not a strict bound on each, e.g. canny may find cleaner edges
    in a slightly blurred image)."""
    return vae_round_trip(vae, (scenes * 255).round().astype(np.uint8)).astype(np.float32) / 255


def load_pipeline(base: Path, method: str | None, trained):
    """The base pipeline; with ``method`` the trained controller from ``trained`` (a path, or for csc a list of
    paths: several conditions combined)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from vistune.pipelines.csc_control import CSCControlModel, StableDiffusionCSCControlPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    if method in ("csc", "csc_1x1"):
        paths = list(trained) if isinstance(trained, (list, tuple)) else [trained]
        controlnet = CSCControlModel.from_tuners(pipe.unet, paths)
        pipe = StableDiffusionCSCControlPipeline(controlnet=controlnet, **pipe.components)
    elif method == "controlnet":
        controlnet = ControlNetModel.from_pretrained(trained, subfolder="controlnet")
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], controls, seed: int, chunk: int = 16,
             conditions: list[str] | None = None, weights: list[float] | None = None) -> np.ndarray:
    """One image per prompt (generator seeded by its index), as H x W x 3 floats in [0, 1].

    ``controls``: None (uncontrolled), one B x 3 x H x W map (``weights``: its one scale, either pipeline), or (CSC
    pipeline, with ``conditions`` naming the tuner of each) a list of maps combined with ``weights``."""
    several = isinstance(controls, (list, tuple))
    out = []
    for start in range(0, len(prompts), chunk):
        end = min(start + chunk, len(prompts))
        kwargs = dict(num_inference_steps=SAMPLING_STEPS, guidance_scale=GUIDANCE, output_type="np",
                      generator=[torch.Generator().manual_seed(seed + i) for i in range(start, end)])
        if controls is not None:
            kwargs["image"] = [c[start:end] for c in controls] if several else controls[start:end]
            if hasattr(pipe, "prepare_control"):  # the CSC pipeline: the map is already the condition
                kwargs["preprocess"] = False
                if conditions is not None:
                    kwargs["condition"] = list(conditions)
            if weights is not None:  # a float for one control (what diffusers' ControlNet pipeline takes)
                kwargs["controlnet_conditioning_scale"] = list(weights) if several else float(weights[0])
        with torch.no_grad():
            out.append(pipe(prompts[start:end], **kwargs).images)
    return np.concatenate(out)


def measure(images: np.ndarray, prompts: list[str], controls: torch.Tensor | None = None,
            truth: dict | None = None) -> dict:
    """Edge F1 against ``controls`` (canny maps) or ``truth["edges"]``; with ``truth`` also mIoU against its class
    masks and the colour-layout error against its layouts; caption fidelity on ``prompts``."""
    uint8 = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
    edges = canny(np.stack(uint8))[:, 0] > 0.5
    target = truth["edges"] if truth is not None else (controls[:, 0] > 0.5).numpy()
    f1 = [edge_f1(e.numpy(), t) for e, t in zip(edges, target)]
    out = {"edge_f1": float(np.mean(f1))}
    if truth is not None:
        out["miou"] = float(np.mean([shape_miou(im, m) for im, m in zip(uint8, truth["masks"])]))
        cell = truth["color_cell"]
        out["color_error"] = float(np.mean([color_layout_error(im, layout, cell=cell)
                                            for im, layout in zip(uint8, truth["layouts"])]))
    out["caption_fidelity"] = caption_fidelity(uint8, prompts)
    return out


def trainable_count(pipe, method: str | None) -> int:
    controlnet = getattr(pipe, "controlnet", None)
    return 0 if method is None or controlnet is None else sum(p.numel() for p in controlnet.parameters())


def csc_widths(pipe) -> str | None:
    """The widths of the CSC-Tuners in ``pipe`` (read from the loaded tuners, so right under --skip_training too),
    as a phrase for the report; None for a pipeline without them."""
    tuners = getattr(getattr(pipe, "controlnet", None), "tuners", None) or {}
    phrases = {f"encoder width ratio {t.config.encoder_width_ratio:g}, output width {t.config.condition_channels}, "
               f"skip-MLP width {t.config.down_ratio:g}x" for t in tuners.values()}
    return "; ".join(sorted(phrases)) or None


def scale_suffix(scale: float) -> str:
    """How a row measured at control scale ``scale`` is named in the table and the grid: `` x1.5``; none at 1."""
    return f" x{scale:g}" if scale != 1 else ""


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Control fidelity on {meta.get('model', 'the shipped tiny SD')}: CSC-Tuner vs diffusers ControlNet",
        "",
        f"{meta['steps']} steps x batch {meta['batch_size']}, AdamW constant lr {meta['learning_rate']:g}"
        + (f" (ControlNet {meta['controlnet_learning_rate']:g})" if meta.get("controlnet_learning_rate") else "")
        + ", "
        f"{timesteps_note(meta)}{snr_note(meta)}{ema_note(meta)}, caption "
        f"dropout {meta['conditioning_dropout']:g}, seed {meta['seed']}, {meta['train_images']} training scenes "
        f"(exact edges / class masks); {meta['eval_scenes']} unseen scenes (caption as prompt, ground-truth map as "
        f"control), one image each, {SAMPLING_STEPS} DDIM steps, guidance {GUIDANCE:g}. Edge F1: canny edges of "
        "the image vs the ground-truth edges, 1 px tolerance. mIoU: the checker's class mask of the image vs the "
        "scene's (background + 4 shapes). Colour error: mean |RGB| difference (0-255) between the coarse colour "
        f"layouts ({meta.get('color_cell', '?')} px cells) of the image and of the scene (lower is better). Ratios "
        "are to the uncontrolled row; the VAE ceiling row is the scenes themselves encoded and decoded by the "
        "model's VAE, a practical ceiling for any controller of this model. "
        + (f"CSC-Tuners (official: 1, 256, 1x): {'; '.join(meta['csc_widths'])}. " if meta.get("csc_widths") else "")
        + ("Method xS: measured at control scale S (controlnet_conditioning_scale; 1 otherwise). "
           if any(r.get("control_scale", 1.0) != 1.0 for r in rows) else "")
        + "Pairs: "
        f"single-condition CSC tuners combined at inference, weights {meta.get('pair_weights') or 'all 1.0'}.",
        "",
        "| condition | method | trainable params | edge F1 | F1 / unc. | mIoU | mIoU / unc. | colour error "
        "| caption fidelity | fidelity change | train time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]
    for r in rows:
        change = 100 * (r["caption_fidelity"] - base["caption_fidelity"])
        seconds = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else "-"
        miou = f"{r['miou']:.3f}" if "miou" in r else "-"
        miou_ratio = _ratio(r["miou"], base["miou"]) if "miou" in r and "miou" in base else "-"
        colour = f"{r['color_error']:.1f}" if "color_error" in r else "-"
        method = r["method"] + scale_suffix(r.get("control_scale", 1.0))
        lines.append(f"| {r.get('condition', '-')} | {method} | {r['trainable_params']:,d} | {r['edge_f1']:.3f} | "
                     f"{_ratio(r['edge_f1'], base['edge_f1'])} | {miou} | {miou_ratio} | {colour} | "
                     f"{100 * r['caption_fidelity']:.1f}% | {change:+.1f} pts | {seconds} |")
    pair_lines = pair_verdicts(rows)
    if pair_lines:
        lines += ["", "Pairs against each condition alone (csc):", ""] + pair_lines
    return "\n".join(lines)


def pair_verdicts(rows: list[dict]) -> list[str]:
    """For each pair row, whether it beats each of its single-condition csc rows on each condition's metric."""
    metric = {"canny": ("edge_f1", 1), "segmentation": ("miou", 1), "color": ("color_error", -1)}
    singles = {r["condition"]: r for r in rows if r.get("method") == "csc" and "+" not in r.get("condition", "+")
               and r.get("control_scale", 1.0) == 1.0}  # at the scale the pair gives each (default 1)
    out = []
    for r in rows:
        if "+" not in r.get("condition", ""):
            continue
        parts = r["condition"].split("+")
        for c in parts:
            key, sign = metric[c]
            alone = [singles[o][key] for o in parts if o in singles and key in singles[o]]
            if key not in r or not alone:
                continue
            beats = all(sign * (r[key] - a) > 0 for a in alone)
            out.append(f"- {r['condition']} on {key}: {r[key]:.3f} vs alone "
                       f"{', '.join(f'{o} {singles[o][key]:.3f}' for o in parts if o in singles)} -> "
                       f"{'beats both' if beats else 'does NOT beat both'}")
    return out


def save_grid(grids: dict[str, np.ndarray], path: Path, columns: int = 8, zoom: int = 3) -> None:
    """One row of ``columns`` images (H x W x 3 in [0, 1]) per entry, zoomed ``zoom`` x, its name on the left;
    written atomically (temp + rename)."""
    import cv2

    rows = []
    for name, images in grids.items():
        strip = np.concatenate(list(images[:columns]), axis=1)
        strip = (np.clip(strip, 0, 1) * 255).round().astype(np.uint8)
        strip = cv2.resize(strip, (strip.shape[1] * zoom, strip.shape[0] * zoom), interpolation=cv2.INTER_NEAREST)
        label = np.full((strip.shape[0], 170, 3), 255, np.uint8)
        lines = textwrap.wrap(name, 24) or [""]  # long names on several lines, none cut off
        for i, line in enumerate(lines):
            y = strip.shape[0] // 2 + 4 + 14 * i - 7 * (len(lines) - 1)
            cv2.putText(label, line, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([label, strip], axis=1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode the grid image for {path}")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(png.tobytes()))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    base = Path(args.pretrained_model_name_or_path or asset_path("tiny-sd-shapes"))
    work, results = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(base, None, None)
    size = pipe.vae.config.sample_size
    truth = eval_truth(args, size)
    prompts = truth["prompts"]
    needed = {c for c, _ in runs(args)}
    controls = {c: eval_scenes(args, size, c)[1] for c in CONDITIONS if c in needed}

    images = generate(pipe, prompts, None, args.seed)
    rows = [{"condition": "-", "method": "uncontrolled", "trainable_params": 0, **measure(images, prompts, truth=truth)}]
    scenes = real_images(args, size)
    real = {"condition": "-", "method": "real scenes (upper bound)", "trainable_params": 0,
            **measure(scenes, prompts, truth=truth)}
    ceiling = {"condition": "-", "method": "real scenes through the VAE (ceiling)", "trainable_params": 0,
               **measure(vae_ceiling_images(pipe.vae, scenes), prompts, truth=truth)}
    print(json.dumps(real), flush=True)
    print(json.dumps(ceiling), flush=True)
    print(json.dumps(rows[-1]), flush=True)
    grids = {f"control {c}": controls[c].permute(0, 2, 3, 1).numpy() for c in controls}
    grids["uncontrolled"] = images
    for condition, method in runs(args):
        out = run_dir(work, condition, method)
        row = {"condition": condition, "method": method}
        if not args.skip_training:
            record_train_time(out, train(args, method, base, out, size, condition))
        if (seconds := read_train_time(out)) is not None:  # also when --skip_training reuses a run
            row["train_seconds"] = seconds
        pipe = load_pipeline(base, method, out)
        row.update(trainable_params=trainable_count(pipe, method), csc_widths=csc_widths(pipe))
        for scale in args.control_scales:
            images = generate(pipe, prompts, controls[condition], args.seed, weights=[scale])
            rows.append({**row, "control_scale": scale, **measure(images, prompts, truth=truth)})
            grids[f"{method} {condition}{scale_suffix(scale)}"] = images
            print(json.dumps(rows[-1]), flush=True)
    for pair in args.pairs:
        weights = args.pair_weights or [1.0] * len(pair)
        pipe = load_pipeline(base, "csc", [run_dir(work, c, "csc") for c in pair])
        images = generate(pipe, prompts, [controls[c] for c in pair], args.seed, conditions=list(pair),
                          weights=weights)
        name = "+".join(pair)
        rows.append({"condition": name, "method": "csc", "weights": weights,
                     "trainable_params": trainable_count(pipe, "csc"), "csc_widths": csc_widths(pipe),
                     **measure(images, prompts, truth=truth)})
        grids[f"csc {name}"] = images
        print(json.dumps(rows[-1]), flush=True)

    rows += [ceiling, real]
    meta = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
            "controlnet_learning_rate": args.controlnet_learning_rate,
            "timestep_sampling": args.timestep_sampling, "snr_gamma": args.snr_gamma,
            "use_ema": args.use_ema, "ema_decay": args.ema_decay,
            "conditioning_dropout": args.conditioning_dropout, "seed": args.seed,
            "train_images": args.num_train_images, "eval_scenes": args.num_eval_scenes, "base": str(base),
            "model": sd_label(base),
            "conditions": args.conditions, "pairs": ["+".join(p) for p in args.pairs],
            "pair_weights": args.pair_weights, "control_scales": args.control_scales, "color_cell": truth["color_cell"],
            "grid_rows": list(grids) + ["real"],
            "csc_widths": sorted({r["csc_widths"] for r in rows if r.get("csc_widths")})}
    table = markdown(rows, meta)
    write_results(rows, meta, table, results, "csc_fidelity")
    grids["real"] = scenes
    save_grid(grids, results / "csc_fidelity.png", columns=min(8, args.num_eval_scenes))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
