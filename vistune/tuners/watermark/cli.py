"""``vistune detect FILE... --key KEY.json``: is each image watermarked with this key?"""

from __future__ import annotations

import argparse
import json
import sys

from .detector import WatermarkDetector, WatermarkKey, detect_files, load_image
from .hidden import load_extractor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="image files (RGB; PNG is lossless, JPEG works too)")
    parser.add_argument("--key", required=True, help="the key file written by scripts/train_watermark.py (key.json)")
    parser.add_argument("--extractor", help="extractor folder (default: the shipped assets/watermark-extractor)")
    parser.add_argument("--fpr", type=float, default=1e-6, help="false-positive rate of the decision (default 1e-6)")
    parser.add_argument("--output_size", type=int, default=None,
                        help="side of the watermarked generator's images (default: the extractor's input size); smaller "
                             "images are also read as a centre crop of one, with a Bonferroni-corrected p-value; 0: off")
    parser.add_argument("--video", action="store_true",
                        help="treat the files as the frames of one video (bits aggregated by majority vote)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")


def run(args: argparse.Namespace) -> int:
    """Print one line per file (or one for the video); exit 0 when all are detected, 1 when some are not,
    2 on bad input."""
    try:
        extractor = load_extractor(args.extractor)
        key = WatermarkKey.load(args.key, num_bits=extractor.num_bits)
        detector = WatermarkDetector(key, extractor, fpr=args.fpr, output_size=args.output_size)
        if args.video:
            import torch

            frames = [load_image(p) for p in args.files]
            if len({tuple(f.shape) for f in frames}) != 1:
                raise ValueError("the frames of a video must all have the same size")
            results = [("video", detector.detect_video(torch.stack(frames)))]
        else:
            results = list(zip(args.files, detect_files(detector, args.files)))
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"vistune detect: {err}", file=sys.stderr)
        return 2
    for name, result in results:
        if args.json:
            print(json.dumps({"file": str(name), **result.to_dict()}))
        else:
            verdict = "WATERMARKED" if result.detected else "not detected"
            print(f"{name}: {verdict}  matched {result.matches}/{result.num_bits} bits, p-value {result.p_value:.3g} "
                  f"(threshold {result.threshold} bits at FPR {args.fpr:g}"
                  f"{'' if result.readings == 1 else f'; best of {result.readings} readings, as is and as a centre crop'})")
    return 0 if all(r.detected for _, r in results) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vistune detect", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
