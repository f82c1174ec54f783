"""Watermark decoder tuning on the shipped tiny SD: robustness, quality, false positives, generation cost.

    python -m vistune.bench.watermark --watermarked out/wm           # or: vistune bench watermark / scripts/bench_watermark.py
    python -m vistune.bench.watermark --watermarked out/wm --compare out/wm-pas

``--watermarked`` is an output folder of ``scripts/train_watermark.py`` (``vae/`` + ``key.json``). The suite
generates ``--num_images`` images with the tiny SD (latents once, seeded per prompt), decodes them with the
original and the watermarked decoder and reports, in one run:

* per attack (the suite of ``vistune.tuners.watermark.attacks``): bit accuracy (mean) and TPR at FPR 1e-6
  (>= 41/48 matched bits) on the watermarked images, and the FPR at the same threshold on the original decoder's
  images under the same attack;
* PSNR / SSIM of the watermarked images against the original decoder's;
* the empirical false-positive count on ``--num_clean`` unwatermarked images (shapes scenes, their VAE
  reconstructions and the original decoder's generations) and the mean/correlation of their bits;
* generation time (s/image, same prompts and seeds) with the original decoder, the watermarked decoder, and the
  original decoder followed by the post-hoc HiDDeN encoder (the baseline the in-generation watermark replaces),
  and the time of the step they differ in alone (latents -> image), steadier than whole generations.

``--compare`` adds the same quality and robustness columns for a second folder (e.g. a PAS run) side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .runner import environment, suite_main, write_results

REPORT_ATTACKS = ("none", "jpeg_80", "jpeg_50", "crop_0.5", "crop_0.1", "resize_0.5", "resize_0.3", "brightness_1.5",
                  "brightness_2.0", "contrast_1.5", "contrast_2.0", "saturation_1.5", "blur_1", "noise_0.05",
                  "rotate_10", "comb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Stable Diffusion folder (default: the shipped tiny SD)")
    parser.add_argument("--watermarked", required=True, help="output folder of scripts/train_watermark.py")
    parser.add_argument("--compare", nargs="*", default=[], help="more such folders to report side by side")
    parser.add_argument("--extractor", help="extractor folder (default: the shipped one)")
    parser.add_argument("--num_images", type=int, default=128, help="generated images (>= 1)")
    parser.add_argument("--num_clean", type=int, default=1200, help="unwatermarked images for the FPR count")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--timing_images", type=int, default=16)
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--video_watermarked", nargs="*", default=[],
                        help="output folders of scripts/train_watermark.py --video, reported side by side")
    parser.add_argument("--num_clips", type=int, default=24, help="moving-shape clips for the video section")
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", dest="output_dir", default="benchmarks/results")
    parser.add_argument("--name", default="watermark")


def _load_vae(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()


def _ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from ..tuners.watermark.losses import ssim

    return float(ssim(a, b))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a - b) ** 2, dim=(1, 2, 3)).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def _generate_latents(pipe, prompts: list[str], steps: int, seed: int) -> torch.Tensor:
    from ..demo import GUIDANCE

    out = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        out.append(pipe(prompt, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator,
                        output_type="latent").images)
    return torch.cat(out) / pipe.vae.config.scaling_factor


#: Interleaved timing rounds per generation variant (the fastest round counts).
TIMING_ROUNDS = 3


def _time_generation(pipe, prompts: list[str], steps: int, seed: int, post=None) -> float:
    from ..demo import GUIDANCE

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator,
                     output_type="pt").images
        if post is not None:
            image = post(image)
    return (time.perf_counter() - start) / len(prompts)


#: Interleaved repetitions of the decode-only timing (the median counts).
DECODE_ROUNDS = 21


@torch.no_grad()
def _time_decode(variants: dict, latents: torch.Tensor) -> dict[str, float]:
    """Milliseconds per image of the step the variants differ in, latents -> image (decoder, plus the post-hoc
    embedder where there is one): the median of :data:`DECODE_ROUNDS` interleaved repetitions, much steadier than
    whole generations, whose U-Net steps are the same for every variant."""
    from ..tuners.watermark.train import decode

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(DECODE_ROUNDS + 1):
        for name, (vae, hook) in variants.items():
            start = time.perf_counter()
            image = decode(vae, latents)
            if hook is not None:
                image = hook(image)
            if latents.is_cuda:
                torch.cuda.synchronize()
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1000 / len(latents))
    return {name: float(np.median(values)) for name, values in times.items()}


def _bits_table(detector, images: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    from ..tuners.watermark.attacks import get_attack

    rows = {}
    for name in REPORT_ATTACKS:
        attack = get_attack(name)
        wm = detector.detect(attack(images["wm"]))
        base = detector.detect(attack(clean["base"]))
        rows[name] = {"bit_acc": float(np.mean([r.bit_accuracy for r in wm])),
                      "tpr": float(np.mean([r.detected for r in wm])),
                      "fpr_base": float(np.mean([r.detected for r in base]))}
    return rows


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from ..assets import asset_path, load_tiny_sd
    from ..tuners.watermark import HiddenEncoder, WatermarkDetector, WatermarkKey, load_extractor
    from ..tuners.watermark.attacks import get_attack
    from ..tuners.watermark.data import clean_images, decode_latents

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.num_images < 1 or args.num_clean < 1:
        raise ValueError("--num_images and --num_clean must be at least 1")
    folders = [Path(args.watermarked)] + [Path(p) for p in args.compare]
    for folder in folders:
        if not (folder / "vae" / "config.json").is_file() or not (folder / "key.json").is_file():
            raise FileNotFoundError(f"{folder} is not an output of scripts/train_watermark.py (vae/ + key.json)")
    if args.model is None:
        pipe = load_tiny_sd()
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    extractor = load_extractor(args.extractor, device)

    # prompts: shapes-world captions of one-shape scenes (they fit the tiny tokenizer's 16 tokens)
    from ..data.shapes import sample_scene

    prompts = [sample_scene((args.seed, i), size=32, num_shapes=1).caption for i in range(args.num_images)]
    latents = _generate_latents(pipe, prompts, args.steps, args.seed)
    base_images = decode_latents(pipe.vae, latents)

    # false positives on >= num_clean unwatermarked images
    clean = torch.cat([clean_images(max(0, args.num_clean - len(base_images)), args.seed + 7, 32, pipe.vae), base_images])
    results: dict[str, Any] = {"folders": [str(f) for f in folders], "num_images": len(base_images),
                               "num_clean": len(clean)}
    per_folder = {}
    for folder in folders:
        key = WatermarkKey.load(folder / "key.json", num_bits=extractor.num_bits)
        detector = WatermarkDetector(key, extractor, fpr=args.fpr)
        vae = _load_vae(folder).to(device)
        wm_images = decode_latents(vae, latents)
        clean_results = detector.detect(clean)
        # crops are read twice (as they are, and put back on an output-size canvas): count that path too
        cropped_results = detector.detect(get_attack("crop_0.5")(clean))
        clean_bits = torch.tensor([r.bits for r in clean_results], dtype=torch.float64)
        entry = {
            "key": key.to_string(),
            "psnr": _psnr(wm_images, base_images),
            "ssim": _ssim(wm_images, base_images),
            "attacks": _bits_table(detector, {"wm": wm_images}, {"base": base_images}),
            "clean_false_positives": int(sum(r.detected for r in clean_results)),
            "clean_crop_false_positives": int(sum(r.detected for r in cropped_results)),
            "crop_readings": cropped_results[0].readings,
            "clean_bit_acc_mean": float(np.mean([r.bit_accuracy for r in clean_results])),
            "clean_bit_mean_range": [float(clean_bits.mean(0).min()), float(clean_bits.mean(0).max())],
            "clean_max_abs_bit_corr": float((torch.corrcoef(clean_bits.T) - torch.eye(clean_bits.shape[1])).nan_to_num().abs().max()),
        }
        report_path = folder / "train_report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            entry["frozen_layers"] = len(report.get("frozen_layers") or [])
            entry["tuned_layers"] = report.get("tuned_layers")
        per_folder[str(folder)] = entry
    results["per_folder"] = per_folder

    # generation time: base decoder, watermarked decoder (replaced, not added), base + post-hoc HiDDeN encoder
    timing_prompts = prompts[: args.timing_images]
    # the post-hoc embedder's cost does not depend on its weights: a random HiDDeN encoder of the default size
    # stands in when the extractor folder ships none (or one of another layout)
    encoder = HiddenEncoder(extractor.num_bits)
    enc_path = (Path(args.extractor) if args.extractor else asset_path("watermark-extractor")) / "encoder.safetensors"
    if enc_path.is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(enc_path), "pt") as handle:
            meta = handle.metadata()
        trained = HiddenEncoder(int(meta["num_bits"]), int(meta["channels"]), int(meta["depth"]), float(meta["scaling"]))
        try:
            trained.load_state_dict(load_file(str(enc_path)))
            encoder = trained
        except RuntimeError:
            pass
    encoder.eval().to(device)
    base_vae, watermarked_vae = pipe.vae, _load_vae(folders[0]).to(device)
    message = torch.randint(0, 2, (1, encoder.num_bits), generator=torch.Generator().manual_seed(0)).float().to(device)

    @torch.no_grad()
    def post(image):
        return encoder(image.to(device), message.expand(len(image), -1))

    variants = {"base": (base_vae, None), "watermarked_decoder": (watermarked_vae, None),
                "base_plus_posthoc_hidden": (base_vae, post)}
    _time_generation(pipe, timing_prompts[:2], args.steps, args.seed)  # warm-up
    timing = {name: float("inf") for name in variants}
    for _ in range(TIMING_ROUNDS):  # interleaved rounds, best of each: machine noise hits every variant alike
        for name, (vae, hook) in variants.items():
            pipe.vae = vae
            timing[name] = min(timing[name], _time_generation(pipe, timing_prompts, args.steps, args.seed, hook))
    pipe.vae = base_vae
    results["timing_s_per_image"] = timing
    results["decode_ms_per_image"] = _time_decode(variants, latents[: args.timing_images].to(device))
    if args.video_watermarked:
        results["video"] = video_section(args, pipe.vae, extractor, [Path(p) for p in args.video_watermarked])
    meta = {"env": environment(device), "args": {k: v for k, v in vars(args).items() if k != "func"}}
    write_results([results], meta, format_table(results, args.fpr), args.output_dir, args.name)
    print(format_table(results, args.fpr))
    return results


VIDEO_REPORT_ATTACKS = ("none", "frame_drop", "frame_swap", "frame_insert", "temporal_crop", "compress", "crop_0.5",
                        "brightness_1.5")


def video_section(args: argparse.Namespace, base_vae, extractor, folders: list[Path]) -> dict[str, Any]:
    """Video, per folder: per-frame bit accuracy and video-level (majority vote) TPR per video attack, PSNR, and
    the background flicker (ground-truth static pixels) of the watermarked vs the original decoder."""
    from ..tuners.watermark import WatermarkDetector, WatermarkKey
    from ..tuners.watermark.attacks import format_attack_spec, get_attack
    from ..tuners.watermark.data import decode_latents, encode_latents
    from ..tuners.watermark.video import background_flicker, shapes_clips

    for folder in folders:
        if not (folder / "vae" / "config.json").is_file() or not (folder / "key.json").is_file():
            raise FileNotFoundError(f"{folder} is not an output of scripts/train_watermark.py --video")
    clips, static = shapes_clips(args.num_clips, args.num_frames, args.seed + 1000, 32)
    latents = encode_latents(base_vae, clips.flatten(0, 1))
    base = decode_latents(base_vae, latents).view_as(clips)
    attacks = {name: get_attack(name, video=True) for name in VIDEO_REPORT_ATTACKS}
    attacked_base = {name: [attack(v) for v in base] for name, attack in attacks.items()}  # the same for every key
    per_folder = {}
    for folder in folders:
        detector = WatermarkDetector(WatermarkKey.load(folder / "key.json", num_bits=extractor.num_bits), extractor,
                                     fpr=args.fpr)
        wm = decode_latents(_load_vae(folder).to(next(base_vae.parameters()).device), latents).view_as(clips)
        rows = {}
        for name, attack in attacks.items():
            videos = [attack(v) for v in wm]
            frame_acc = float(np.mean([r.bit_accuracy for v in videos for r in detector.detect(v)]))
            vid = [detector.detect_video(v) for v in videos]
            base_vid = [detector.detect_video(v) for v in attacked_base[name]]
            rows[name] = {"frame_bit_acc": frame_acc, "video_bit_acc": float(np.mean([r.bit_accuracy for r in vid])),
                          "video_tpr": float(np.mean([r.detected for r in vid])),
                          "video_fpr_base": float(np.mean([r.detected for r in base_vid]))}
        report_path = folder / "train_report.json"
        train_args = json.loads(report_path.read_text()).get("args", {}) if report_path.is_file() else {}
        per_folder[str(folder)] = {
            "attacks": rows, "psnr": _psnr(wm.flatten(0, 1), base.flatten(0, 1)),
            "flicker_watermarked": background_flicker(wm, static),
            # image-trained decoders have none; older video runs predate --temporal_loss (VidSig's unaligned term)
            "temporal_loss": train_args.get("temporal_loss", "vidsig") if train_args.get("video") else None,
            "lambda_t": train_args.get("lambda_t"),
            "train_attacks": format_attack_spec(train_args.get("train_attacks") or [],
                                                train_args.get("train_attack_weights"))}
    return {"clips": args.num_clips, "frames": args.num_frames, "per_folder": per_folder,
            "flicker_base": background_flicker(base, static), "flicker_source": background_flicker(clips, static)}


def format_table(results: dict[str, Any], fpr: float) -> str:
    folders = list(results["per_folder"])
    names = [Path(f).name for f in folders]
    lines = [f"Watermark decoder tuning on the tiny SD: {results['num_images']} generated 32x32 images; "
             f"detection at FPR {fpr:g} (>= threshold matched bits).", ""]
    header = "| attack | " + " | ".join(f"{n} bit acc | {n} TPR | base FPR" for n in names) + " |"
    lines += [header, "|---|" + "---|---|---|" * len(names)]
    for attack in REPORT_ATTACKS:
        cells = []
        for f in folders:
            row = results["per_folder"][f]["attacks"][attack]
            cells.append(f"{row['bit_acc']:.3f} | {row['tpr']:.3f} | {row['fpr_base']:.3f}")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines += ["", "| decoder | PSNR (dB) vs original | SSIM | tuned/frozen layers | false positives on clean | "
                  "false positives on clean crop_0.5 (readings) | clean bit acc | clean per-bit P(1) range | "
                  "max |bit corr| |", "|---|---|---|---|---|---|---|---|---|"]
    for f, n in zip(folders, names):
        e = results["per_folder"][f]
        lines.append(f"| {n} | {e['psnr']:.2f} | {e['ssim']:.4f} | {e.get('tuned_layers')}/{e.get('frozen_layers')} | "
                     f"{e['clean_false_positives']}/{results['num_clean']} | "
                     f"{e.get('clean_crop_false_positives', '-')}/{results['num_clean']} ({e.get('crop_readings', '-')}) | "
                     f"{e['clean_bit_acc_mean']:.3f} | "
                     f"{e['clean_bit_mean_range'][0]:.2f}-{e['clean_bit_mean_range'][1]:.2f} | "
                     f"{e['clean_max_abs_bit_corr']:.2f} |")
    t = results["timing_s_per_image"]
    lines += ["", f"| generation | s/image (best of {TIMING_ROUNDS} interleaved rounds) | vs base |", "|---|---|---|"]
    for name, value in t.items():
        lines.append(f"| {name} | {value:.4f} | {value / t['base']:.3f}x |")
    d = results.get("decode_ms_per_image")
    if d:
        lines += ["", f"| latents -> image | ms/image (median of {DECODE_ROUNDS} interleaved repetitions) | vs base |",
                  "|---|---|---|"]
        lines += [f"| {name} | {value:.3f} | {value / d['base']:.3f}x |" for name, value in d.items()]
    video = results.get("video")
    if video:
        folders, names = list(video["per_folder"]), [Path(f).name for f in video["per_folder"]]
        lines += ["", f"Video ({video['clips']} moving-shape clips x {video['frames']} frames). Background flicker: mean "
                  f"frame-to-frame change (0-255) on pixels static by ground truth; original decoder "
                  f"{video['flicker_base']:.3f}, source clips {video['flicker_source']:.3f}.", "",
                  "| video decoder | temporal loss (lambda_t) | training attacks | PSNR (dB) | background flicker | vs original |",
                  "|---|---|---|---|---|---|"]
        for f, n in zip(folders, names):
            e = video["per_folder"][f]
            lines.append(f"| {n} | {e['temporal_loss']} ({e['lambda_t']}) | {e.get('train_attacks', 'none')} | "
                         f"{e['psnr']:.2f} | {e['flicker_watermarked']:.3f} | "
                         f"{e['flicker_watermarked'] / video['flicker_base']:.3f}x |")
        lines += ["", "Per video attack: frame bit acc / video bit acc (majority vote) / video TPR.", "",
                  "| video decoder | " + " | ".join(VIDEO_REPORT_ATTACKS) + " |", "|---|" + "---|" * len(VIDEO_REPORT_ATTACKS)]
        for f, n in zip(folders, names):
            rows = video["per_folder"][f]["attacks"]
            lines.append(f"| {n} | " + " | ".join(f"{rows[a]['frame_bit_acc']:.3f} / {rows[a]['video_bit_acc']:.3f} / "
                                                  f"{rows[a]['video_tpr']:.2f}" for a in VIDEO_REPORT_ATTACKS) + " |")
        worst = max(r["video_fpr_base"] for e in video["per_folder"].values() for r in e["attacks"].values())
        lines += ["", f"Highest video FPR on the original decoder's clips (each key, each attack): {worst:.3f}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    return suite_main(argv, __doc__, add_arguments, None, run_from_args)


if __name__ == "__main__":
    raise SystemExit(main())
