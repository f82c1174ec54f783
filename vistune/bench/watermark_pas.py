"""PAS side by side: PSNR against bit accuracy for the whole decoder tuned vs PAS (most sensitive layers frozen),
over a sweep of the image-loss weight, on the shipped tiny SD.

    python -m vistune.bench.watermark_pas --runs_dir out/pas-sweep      # or: vistune bench watermark-pas
    python -m vistune.bench.watermark_pas --runs_dir out/pas-sweep --fractions 0,0.1,0.25 --lambda_i 0.6,2,6 --jobs 2

Each (frozen fraction, PAS scoring ``--pas_noise``, ``lambda_i``) cell is a run of ``scripts/train_watermark.py``
in ``--runs_dir`` (trained here when missing, ``--jobs`` at a time with one thread each; finished runs are reused,
so an interrupted sweep goes on where it stopped). A larger ``lambda_i`` buys PSNR with bit accuracy, so each
variant traces a curve; PAS is better when its curve lies above the whole decoder's: the table interpolates each
curve's PSNR at the bit accuracies the other reached. Bit accuracy is read on ``--num_images`` generated images, as they are and under the attacks the issue
targets (JPEG 80, crop 50%, brightness 1.5), since without attack every run reads all bits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .runner import environment, suite_main, write_results
from .watermark import _generate_latents, _load_vae, _psnr, _ssim

TARGET_ATTACKS = ("jpeg_80", "crop_0.5", "brightness_1.5")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_watermark.py"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a comma list of numbers expected, got {text!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs_dir", default="out/pas-sweep", help="where the sweep's training runs live")
    parser.add_argument("--fractions", type=_floats, default=[0.0, 0.25], help="PAS frozen fractions (0: whole decoder)")
    parser.add_argument("--pas_noise", default="absolute,relative",
                        help="comma list of PAS scorings to sweep (absolute: VidSig's; relative: per-tensor RMS)")
    parser.add_argument("--lambda_i", type=_floats, default=[0.6, 2.0, 6.0], help="image-loss weights")
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--train_attacks", default="identity,crop_in_place,brightness:4")
    parser.add_argument("--num_train_images", type=int, default=1024)
    parser.add_argument("--train_seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once (one thread each)")
    parser.add_argument("--num_images", type=int, default=64, help="generated images to evaluate on")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", dest="output_dir", default="benchmarks/results")
    parser.add_argument("--name", default="watermark_pas")


def variants(args: argparse.Namespace) -> list[tuple[float, str | None]]:
    """(frozen fraction, PAS noise) per curve: the whole decoder (no scoring) and each fraction x scoring."""
    noises = [n.strip() for n in args.pas_noise.split(",") if n.strip()]
    if not noises or any(n not in ("absolute", "relative") for n in noises):
        raise ValueError(f"--pas_noise: a comma list of absolute / relative expected, got {args.pas_noise!r}")
    return [(f, None if f == 0 else n) for f in args.fractions for n in (noises if f > 0 else [None])]


def run_dir(args: argparse.Namespace, fraction: float, noise: str | None, lambda_i: float) -> Path:
    middle = f"-{noise}" if fraction > 0 else ""
    return Path(args.runs_dir) / f"frac{fraction:g}{middle}-li{lambda_i:g}"


def _train(args: argparse.Namespace, fraction: float, noise: str | None, lambda_i: float, threads: int) -> Path:
    out = run_dir(args, fraction, noise, lambda_i)
    if (out / "key.json").is_file() and (out / "vae" / "config.json").is_file():
        return out
    if not SCRIPT.is_file():
        raise FileNotFoundError(f"{SCRIPT} not found: run the sweep from a source checkout (pip install -e .)")
    cmd = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(args.model_path), "--output_dir",
           str(out), "--seed", str(args.train_seed), "--max_train_steps", str(args.max_train_steps), "--lambda_i",
           str(lambda_i), "--pas_fraction", str(fraction), "--train_attacks", args.train_attacks,
           "--num_train_images", str(args.num_train_images)] + (["--pas_noise", noise] if noise else [])
    if any(out.glob("checkpoint-*")):
        cmd += ["--resume_from_checkpoint", "latest"]
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"training {out} ...", flush=True)
    with open(out.parent / f"{out.name}.log", "a") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"training {out} failed (exit {done.returncode}); see {out.parent / (out.name + '.log')}")
    return out


def _interpolate(points: list[dict[str, Any]], accuracy: float) -> float | None:
    """PSNR of a curve (points with ``acc`` and ``psnr``) at ``accuracy``, linear between its points; None
    outside its range."""
    pts = sorted(points, key=lambda p: p["acc"])
    accs = [p["acc"] for p in pts]
    if not accs[0] <= accuracy <= accs[-1]:
        return None
    return float(np.interp(accuracy, accs, [p["psnr"] for p in pts]))


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from ..assets import asset_path, load_tiny_sd
    from ..data.shapes import sample_scene
    from ..tuners.watermark import WatermarkDetector, WatermarkKey, load_extractor
    from ..tuners.watermark.attacks import get_attack
    from ..tuners.watermark.data import decode_latents

    if not args.fractions or not args.lambda_i or args.jobs < 1 or args.num_images < 1:
        raise ValueError("--fractions and --lambda_i need values; --jobs and --num_images must be at least 1")
    if any(not 0 <= f < 1 for f in args.fractions):
        raise ValueError("--fractions must lie in [0, 1)")
    args.model_path = asset_path("tiny-sd-shapes")
    cells = [(f, noise, li) for f, noise in variants(args) for li in args.lambda_i]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda cell: _train(args, *cell, threads=1 if args.jobs > 1 else torch.get_num_threads()), cells))

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    pipe = load_tiny_sd()
    extractor = load_extractor()
    prompts = [sample_scene((args.seed, i), size=32, num_shapes=1).caption for i in range(args.num_images)]
    latents = _generate_latents(pipe, prompts, args.steps, args.seed)
    base = decode_latents(pipe.vae, latents)
    rows = []
    for fraction, noise, lambda_i in cells:
        folder = run_dir(args, fraction, noise, lambda_i)
        detector = WatermarkDetector(WatermarkKey.load(folder / "key.json", num_bits=extractor.num_bits), extractor)
        images = decode_latents(_load_vae(folder), latents)
        clean = detector.detect(images)
        attacked = {name: float(np.mean([r.bit_accuracy for r in detector.detect(get_attack(name)(images))]))
                    for name in TARGET_ATTACKS}
        rows.append({"fraction": fraction, "noise": noise, "lambda_i": lambda_i, "psnr": _psnr(images, base), "ssim": _ssim(images, base),
                     "bit_acc_none": float(np.mean([r.bit_accuracy for r in clean])),
                     "tpr_none": float(np.mean([r.detected for r in clean])),
                     "bit_acc_attacks": attacked, "acc": float(np.mean(list(attacked.values())))})
    table = format_table(rows, args)
    meta = {"env": environment(torch.device("cpu")), "args": {k: str(v) for k, v in vars(args).items() if k != "func"}}
    write_results(rows, meta, table, args.output_dir, args.name)
    print(table)
    return {"rows": rows}


def _label(row: dict[str, Any]) -> str:
    return "whole decoder" if row["fraction"] == 0 else f"PAS {row['fraction']:g} ({row['noise']})"


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"PAS vs whole-decoder tuning on the tiny SD: {args.max_train_steps} steps per run "
             f"(--train_attacks {args.train_attacks}), evaluated on {args.num_images} generated 32x32 images. "
             f"'attacked' is the mean bit accuracy under {', '.join(TARGET_ATTACKS)}.", "",
             "| decoder tuned | lambda_i | PSNR (dB) | SSIM | bit acc (none) | TPR (none) | "
             + " | ".join(TARGET_ATTACKS) + " | attacked |", "|---|---|---|---|---|---|" + "---|" * (len(TARGET_ATTACKS) + 1)]
    for r in rows:
        lines.append(f"| {_label(r)} | {r['lambda_i']:g} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['bit_acc_none']:.3f} | "
                     f"{r['tpr_none']:.3f} | " + " | ".join(f"{r['bit_acc_attacks'][a]:.3f}" for a in TARGET_ATTACKS)
                     + f" | {r['acc']:.3f} |")
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        curves.setdefault(_label(r), []).append(r)
    whole = curves.pop("whole decoder", None)
    if whole and curves:
        lines += ["", "PSNR at equal attacked bit accuracy (each curve interpolated at the other's points; "
                      "positive: PAS better):", "", "| PAS | at attacked bit acc | PAS PSNR | whole-decoder PSNR | gain (dB) |",
                  "|---|---|---|---|---|"]
        for label, points in curves.items():
            for acc in sorted({p["acc"] for p in points + whole}):
                pas, base = _interpolate(points, acc), _interpolate(whole, acc)
                if pas is not None and base is not None:
                    lines.append(f"| {label} | {acc:.3f} | {pas:.2f} | {base:.2f} | {pas - base:+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return suite_main(argv, __doc__, add_arguments, None, run_from_args)


if __name__ == "__main__":
    raise SystemExit(main())
