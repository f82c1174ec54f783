"""The ``vistune`` command: ``vistune demo``, ``vistune bench SUITE``, ``vistune detect FILE...``, ``vistune info [PATH]``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Sequence

from .bench import SUITES


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        result = run_demo(args.output, steps=args.steps, seed=args.seed, style=args.style,
                          images_per_prompt=args.images_per_prompt)
    except FileNotFoundError as err:
        print(f"vistune demo: {err}", file=sys.stderr)
        return 2
    checks = ("identity_at_attach", "scale_zero_is_base", "save_load_exact")
    return 0 if all(result[c] for c in checks) and result["style_gap_closed"] > 0 else 1


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, registered_tuners
    from .core import CONFIG_NAME, WEIGHTS_NAME

    if args.path is None:
        import diffusers
        import timm

        print(f"vistune {__version__}  torch {torch.__version__}  diffusers {diffusers.__version__}  timm {timm.__version__}")
        print(f"device: {'cuda (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else 'cpu'}")
        print("tuners: " + ", ".join(f"{t} ({e.config_class.__name__})" for t, e in sorted(registered_tuners().items())))
        return 0
    from safetensors import safe_open

    root = Path(args.path)
    folders = [root] if (root / CONFIG_NAME).is_file() else sorted(p for p in root.glob("*") if (p / CONFIG_NAME).is_file())
    if not folders:
        print(f"{root}: no {CONFIG_NAME} found", file=sys.stderr)
        return 2
    for folder in folders:
        record = json.loads((folder / CONFIG_NAME).read_text())
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
            count = sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())
        print(f"{folder}: {record.get('name')} [{record.get('tuner_type')}] {count:,d} params")
        print("  config: " + json.dumps(record.get("config"), sort_keys=True))
        print("  layout: " + json.dumps(record.get("layout"), sort_keys=True))
    return 0


def _bench(args: argparse.Namespace) -> int:
    importlib.import_module(f".bench.{SUITES[args.suite][0]}", __package__).run_from_args(args)
    return 0


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .data import STYLES

    parser = argparse.ArgumentParser(prog="vistune", description="Vision-side tuners for frozen diffusion and vision backbones.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="adapt the shipped tiny SD to a style with an SC-Tuner; writes images and a report")
    demo.add_argument("--output", default="vistune-demo", help="output folder (default: vistune-demo)")
    demo.add_argument("--steps", type=_positive_int, default=600, help="training steps (default: 600)")
    demo.add_argument("--style", default="striped", choices=[s for s in STYLES if s != "plain"],
                      help="target style domain (default: striped)")
    demo.add_argument("--images-per-prompt", type=_positive_int, default=8,
                      help="images per prompt in the grids and the measurements (default: 8, 64 images in all)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="cost benchmarks against the baselines, each method in a fresh subprocess")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    for suite, (module, text) in SUITES.items():
        suite_parser = bench_sub.add_parser(suite, help=text)
        importlib.import_module(f".bench.{module}", __package__).add_arguments(suite_parser)
        suite_parser.set_defaults(func=_bench)
    from .tuners.watermark import cli as watermark_cli

    detect = sub.add_parser("detect", help="is each image watermarked with KEY? matched bits, p-value, decision at an FPR")
    watermark_cli.add_arguments(detect)
    detect.set_defaults(func=watermark_cli.run)
    info = sub.add_parser("info", help="versions, device and registered tuners; or describe a saved tuner folder")
    info.add_argument("path", nargs="?", help="a folder written by vistune.save_tuners")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
