"""HST training cost against full fine-tuning, linear probing and peft LoRA at the real ViT-B/16 size (random
weights, 224x224, 100 classes).

    python -m vistune.bench.vit                     # or: vistune bench vit / python scripts/bench_vit.py
    python -m vistune.bench.vit --batch-sizes 8 32 --steps 5

Each (method, batch size) runs in a fresh subprocess: build the ViT, set the method up, then time optimizer
steps (forward + cross-entropy + backward + AdamW step) and measure the peak memory above the resting model
(optimizer state, gradients and activations). Methods: ``full``, ``linear`` (head only), ``lora`` (peft r=8 on
qkv/proj/fc1/fc2 + head), ``hst`` (the default config: the paper's meta tokens + LayerNorm tuning, backward
through the ViT, with the ViT blocks' activations checkpointed), ``hst_nockpt`` (the same without checkpointing:
every block's activations kept), ``hst_sideckpt`` (only the side network checkpointed), ``hst_allckpt`` (ViT blocks
and side network checkpointed), ``hst_nograd`` (``backbone_grad=False``: backward never enters the ViT) and
``full_ckpt`` (full fine-tuning with the same timm block checkpointing, for reference). CUDA is used when present
(bf16 autocast for every method alike).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .runner import environment, measure_training, suite_main, sweep

METHODS = ("full", "full_ckpt", "linear", "lora", "hst", "hst_nockpt", "hst_sideckpt", "hst_allckpt", "hst_nograd")
#: HSTConfig of each HST method (``hst`` = the defaults).
HST_METHODS = {
    "hst": {},
    "hst_nockpt": {"gradient_checkpointing": False, "side_checkpointing": False},
    "hst_sideckpt": {"gradient_checkpointing": False, "side_checkpointing": True},
    "hst_allckpt": {"gradient_checkpointing": True, "side_checkpointing": True},
    "hst_nograd": {"backbone_grad": False},
}
#: What each method runs (the markdown table's legend).
DESCRIPTIONS = {
    "full": "full fine-tuning",
    "full_ckpt": "full fine-tuning with timm's block checkpointing (set_grad_checkpointing)",
    "linear": "linear probe (head only)",
    "lora": "peft LoRA r=8 on qkv/proj/fc1/fc2 + head",
    "hst": "HST, default config (meta tokens + LayerNorm tuning, ViT blocks checkpointed)",
    "hst_nockpt": "HST with gradient_checkpointing=False (every ViT block's activations kept)",
    "hst_sideckpt": "HST with gradient_checkpointing=False, side_checkpointing=True (only the side network recomputed)",
    "hst_allckpt": "HST with gradient_checkpointing=True, side_checkpointing=True (ViT blocks and side network recomputed)",
    "hst_nograd": "HST with backbone_grad=False (backward never enters the ViT)",
}
ARCHITECTURES = {"vit_b16": "vit_base_patch16_224", "vit_tiny": "vit_tiny_patch16_224"}
#: Targets from the issue: peak training memory as a fraction of full fine-tuning's (``hst`` = the default).
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
    if method in ("full", "full_ckpt", "linear", "lora"):
        prepare_vit_baseline(model, method.removesuffix("_ckpt"))
        if method == "full_ckpt":
            model.set_grad_checkpointing(True)
    elif method in HST_METHODS:
        vistune.attach(model, HSTConfig(num_classes=case["num_classes"], **HST_METHODS[method]))
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
    lines += ["", "Ratios are to `full` at the same batch size. Checkpointing (`*_ckpt*` rows, and `hst`, whose default "
              "checkpoints the ViT blocks) trades step time for memory with unchanged losses and gradients: compare "
              "`hst` with `hst_nockpt`."]
    lines += [f"- `{m}`: {DESCRIPTIONS[m]}" for m in METHODS if any(r["method"] == m for r in rows)]
    return "\n".join(lines)


def run(batch_sizes=(2, 8), steps: int = 3, warmup: int = 1, image_size: int = 224, model: str = "vit_b16",
        num_classes: int = 100, methods=METHODS, output_dir: str = "benchmarks/results", name: str = "vit",
        threads: int | None = None, log=print) -> list[dict[str, Any]]:
    """Measure every (method, batch size) in its own subprocess; write ``<name>.json`` and ``<name>.md``."""
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        env["threads"] = threads
    meta = {"model": model, "image_size": image_size, "num_classes": num_classes, "steps": steps, "warmup": warmup,
            "env": env}
    base = {"image_size": image_size, "steps": steps, "warmup": warmup, "model": model, "num_classes": num_classes,
            "threads": threads}
    return sweep("vistune.bench.vit", methods, batch_sizes, base, meta, ratios, markdown, output_dir, name, log)


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
