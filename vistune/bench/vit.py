"""HST training cost against full fine-tuning, linear probing and peft LoRA at the real ViT-B/16 size (random
weights, 224x224, 100 classes).

    python -m vistune.bench.vit                     # or: vistune bench vit / python scripts/bench_vit.py
    python -m vistune.bench.vit --batch-sizes 8 32 --steps 5

Each (method, batch size) runs in a fresh subprocess: build the ViT, set the method up, then time optimizer
steps (forward + cross-entropy + backward + AdamW step) and measure the peak memory above the resting model
(optimizer state, gradients and activations). Methods: ``full``, ``linear`` (head only), ``lora`` (peft r=8 on
qkv/proj/fc1/fc2 + head), ``hst`` (the paper: meta tokens + LayerNorm tuning, backward through the ViT) and
``hst_nograd`` (``backbone_grad=False``: backward never enters the ViT). CUDA is used when present (bf16
autocast for every method alike).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .runner import environment, measure_training, run_case, suite_main, write_results

METHODS = ("full", "linear", "lora", "hst", "hst_nograd")
ARCHITECTURES = {"vit_b16": "vit_base_patch16_224", "vit_tiny": "vit_tiny_patch16_224"}
#: Targets from the issue: peak training memory as a fraction of full fine-tuning's.
TARGETS = {"hst": 0.6, "hst_nograd": 0.35}


def _build(case: dict[str, Any], device: torch.device):
    import timm

    import vistune
    from vistune.tuners.hst import HSTConfig
    from vistune.vit_baselines import prepare_vit_baseline

    torch.manual_seed(0)
    model = timm.create_model(ARCHITECTURES[case["model"]], pretrained=False, num_classes=case["num_classes"],
                              img_size=case["image_size"])
    method = case["method"]
    if method in ("full", "linear", "lora"):
        prepare_vit_baseline(model, method)
    elif method in ("hst", "hst_nograd"):
        vistune.attach(model, HSTConfig(num_classes=case["num_classes"], backbone_grad=method == "hst"))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model.to(device).train()
    return model, [p for p in model.parameters() if p.requires_grad]


def run_one(case: dict[str, Any]) -> dict[str, Any]:
    """Measure one (method, batch size) in this process."""
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, params = _build(case, device)
    batch, size = case["batch_size"], case["image_size"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, case["num_classes"], (batch,), generator=generator).to(device)

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(images).float(), labels)

    return {**case, **measure_training(lambda: (params, loss), device, case["warmup"], case["steps"])}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each row's ratios to the full fine-tuning row of the same batch size."""
    for row in rows:
        ref = next((r for r in rows if r["method"] == "full" and r["batch_size"] == row["batch_size"]), None)
        if ref is not None:
            row["memory_vs_full"] = row["peak_memory_mb"] / ref["peak_memory_mb"] if ref["peak_memory_mb"] else float("nan")
            row["time_vs_full"] = row["step_seconds"] / ref["step_seconds"]
            row["params_vs_full"] = row["trainable_params"] / ref["trainable_params"]
        target = TARGETS.get(row["method"])
        if target is not None and "memory_vs_full" in row:
            row["memory_target"] = target
            row["meets_target"] = bool(row["memory_vs_full"] <= target)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    env = meta["env"]
    lines = [
        f"HST vs full fine-tuning, linear probe and peft LoRA (r=8): `{ARCHITECTURES[meta['model']]}` at "
        f"{meta['image_size']}x{meta['image_size']}, {meta['num_classes']} classes, random weights, "
        f"{env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, {env['threads']} threads, "
        f"median of {meta['steps']} steps after {meta['warmup']} warm-up",
        "",
        "| method | batch | trainable params | peak memory (MB) | step time (s) | params / full | memory / full | time / full | memory target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = f"<= {r['memory_target']:.2f}: {'met' if r['meets_target'] else 'MISSED'}" if "memory_target" in r else ""
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['trainable_params']:,d} | {r['peak_memory_mb']:.0f} | "
            f"{r['step_seconds']:.3f} | {r.get('params_vs_full', float('nan')):.4f} | "
            f"{r.get('memory_vs_full', float('nan')):.3f} | {r.get('time_vs_full', float('nan')):.2f} | {target} |"
        )
    return "\n".join(lines)


def run(batch_sizes=(2, 8), steps: int = 3, warmup: int = 1, image_size: int = 224, model: str = "vit_b16",
        num_classes: int = 100, methods=METHODS, output_dir: str = "benchmarks/results", name: str = "vit",
        threads: int | None = None, log=print) -> list[dict[str, Any]]:
    """Measure every (method, batch size) in its own subprocess; write ``<name>.json`` and ``<name>.md``."""
    cuda = torch.cuda.is_available()
    rows = []
    for batch in batch_sizes:
        for method in methods:
            case = {"method": method, "batch_size": batch, "image_size": image_size, "steps": steps, "warmup": warmup,
                    "model": model, "num_classes": num_classes, "threads": threads}
            log(f"measuring {method} at batch {batch} ...")
            rows.append(run_case("vistune.bench.vit", case))
    env = environment(torch.device("cuda" if cuda else "cpu"))
    if threads:
        env["threads"] = threads
    meta = {"model": model, "image_size": image_size, "num_classes": num_classes, "steps": steps, "warmup": warmup,
            "env": env}
    rows = ratios(rows)
    table = markdown(rows, meta)
    write_results(rows, meta, table, output_dir, name)
    log(table)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="vit_b16")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, help="torch threads per case (default: torch's choice)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--name", default="vit", help="results file name (<name>.json / <name>.md)")


def run_from_args(args: argparse.Namespace) -> None:
    run(args.batch_sizes, args.steps, args.warmup, args.image_size, args.model, args.num_classes, args.methods,
        args.output_dir, args.name, args.threads)


def main(argv=None) -> int:
    return suite_main(argv, __doc__, add_arguments, run_one, run_from_args)


if __name__ == "__main__":
    raise SystemExit(main())
