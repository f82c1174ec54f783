"""CSC-Tuner training cost against diffusers' ControlNet at the real SD1.5 U-Net size (random weights).

    python -m vistune.bench.csc                     # or: vistune bench csc / python scripts/bench_csc.py
    python -m vistune.bench.csc --batch-sizes 1 4 --steps 2 --latent 32

Methods: ``csc`` (SCEdit's official widths: encoder output 256, ratio 1.0, 3x3 per-skip convs), ``csc_1x1``
(1x1 per-skip convs) and ``controlnet`` (``ControlNetModel.from_unet``, 361,279,120 parameters). Each
(method, batch size) runs in a fresh subprocess: build the frozen U-Net, then, while memory is tracked, build the
method's trainable modules and time optimizer steps (forward + backward + AdamW step) with a random control image
of 8x the latent size. Peak memory is therefore what the method adds to the frozen U-Net: its weights, gradients,
AdamW state and activations. Ratios are to ControlNet at the same batch size, measured in the same run. CUDA is
used when present (bf16 autocast for every method alike, the frozen U-Net stored in bf16 and the trained modules
in fp32, as ``scripts/train_csc_tuner.py --mixed_precision bf16``); on CPU everything is fp32 and the latent is
smaller (default 32x32).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .runner import frozen_dtype, measure_training, suite_main
from .sc import _build_unet, _precision, add_unet_arguments, run_unet_suite

METHODS = ("controlnet", "csc", "csc_1x1")
#: Targets of the CSC issue: trainable params and peak memory (batch 4) as fractions of ControlNet's.
TARGETS = {"csc": {"params": 0.30, "memory": 0.70}, "csc_1x1": {"params": 0.08, "memory": 0.70}}


def _setup(method: str, unet, image: torch.Tensor):
    """The trainable parameters and a function running one forward pass of ``method`` to the U-Net output."""
    import vistune

    unet.requires_grad_(False)
    if method in ("csc", "csc_1x1"):
        config = vistune.CSCTunerConfig(dense_kernel_size=3 if method == "csc" else 1, condition="canny")
        vistune.attach(unet, config, name="canny")
        vistune.set_control(unet, image, name="canny")

        def forward(sample, timestep, context):
            return unet(sample, timestep, encoder_hidden_states=context).sample

        return vistune.trainable_parameters(unet), forward
    if method == "controlnet":
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_unet(unet).to(image.device, torch.float32).train()
        controlnet.requires_grad_(True)

        def forward(sample, timestep, context):
            down, mid = controlnet(sample, timestep, encoder_hidden_states=context, controlnet_cond=image,
                                   return_dict=False)
            return unet(sample, timestep, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample

        return list(controlnet.parameters()), forward
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def run_one(case: dict[str, Any]) -> dict[str, Any]:
    """Measure one (method, batch size) in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet = _build_unet(case["config"], device).train().to(frozen_dtype(device))
    batch, latent = case["batch_size"], case["latent"]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=generator).to(device)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    timestep = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    image = torch.rand(batch, 3, 8 * latent, 8 * latent, generator=generator).to(device)
    target = torch.randn(sample.shape, generator=generator).to(device)

    def setup():  # inside the memory tracking: each method's own weights count
        params, forward = _setup(case["method"], unet, image)
        return params, lambda: torch.nn.functional.mse_loss(forward(sample, timestep, context).float(), target)

    return {**case, **measure_training(setup, device, case["warmup"], case["steps"])}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each row's ratios to the ControlNet row of the same batch size, and whether the issue's targets hold."""
    for row in rows:
        ref = next((r for r in rows if r["method"] == "controlnet" and r["batch_size"] == row["batch_size"]), None)
        if ref is None:
            continue
        row["params_vs_controlnet"] = row["trainable_params"] / ref["trainable_params"]
        row["memory_vs_controlnet"] = row["peak_memory_mb"] / ref["peak_memory_mb"] if ref["peak_memory_mb"] else float("nan")
        row["time_vs_controlnet"] = row["step_seconds"] / ref["step_seconds"]
        target = TARGETS.get(row["method"])
        if target is not None:
            row["meets_params_target"] = row["params_vs_controlnet"] <= target["params"]
            row["meets_memory_target"] = row["memory_vs_controlnet"] <= target["memory"]
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    gpu = f" ({meta['env']['gpu']})" if "gpu" in meta["env"] else ""
    lines = [
        f"CSC-Tuner vs diffusers ControlNet (`ControlNetModel.from_unet`): U-Net `{meta['config']}`, latent "
        f"{meta['latent']}x{meta['latent']} (control image {8 * meta['latent']}x{8 * meta['latent']}), "
        f"{meta['env']['device']}{gpu}, {meta['env']['threads']} thread(s), median of {meta['steps']} step(s) after "
        f"{meta['warmup']} warm-up{_precision(meta)}. Peak memory: what the method adds to the frozen U-Net (weights, gradients, "
        "AdamW state, activations).",
        "",
        "| method | batch | trainable params | peak memory (MB) | step time (s) | params / ControlNet | memory / ControlNet | time / ControlNet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['trainable_params']:,d} | {r['peak_memory_mb']:.0f} | "
            f"{r['step_seconds']:.3f} | {r.get('params_vs_controlnet', nan):.3f} | "
            f"{r.get('memory_vs_controlnet', nan):.3f} | {r.get('time_vs_controlnet', nan):.3f} |"
        )
    checks = []
    for method, target in TARGETS.items():
        row = next((r for r in rows if r["method"] == method and "params_vs_controlnet" in r), None)
        big = [r for r in rows if r["method"] == method and "memory_vs_controlnet" in r]
        if row is None:
            continue
        mem = max(big, key=lambda r: r["batch_size"])
        checks.append(
            f"- {method}: params {row['params_vs_controlnet']:.3f}x (target <= {target['params']}x: "
            f"{'met' if row['meets_params_target'] else 'NOT met'}); memory at batch {mem['batch_size']} "
            f"{mem['memory_vs_controlnet']:.3f}x (target <= {target['memory']}x at batch 4: "
            f"{'met' if mem['meets_memory_target'] else 'NOT met'})"
        )
    if checks:
        lines += ["", "Targets:", *checks]
    return "\n".join(lines)


def run(batch_sizes=(1, 4), steps: int = 2, warmup: int = 1, latent: int | None = None, config: str = "sd15",
        methods=METHODS, output_dir: str = "benchmarks/results", name: str = "csc", log=print) -> list[dict[str, Any]]:
    """Measure every (method, batch size) in its own subprocess; write ``<name>.json`` and ``<name>.md``."""
    return run_unet_suite("vistune.bench.csc", ratios, markdown, batch_sizes, steps, warmup, latent, config, methods,
                          output_dir, name, log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_unet_arguments(parser, METHODS, steps=2, name="csc")


def run_from_args(args: argparse.Namespace) -> None:
    run(args.batch_sizes, args.steps, args.warmup, args.latent, args.config, args.methods, args.output_dir, args.name)


def main(argv=None) -> int:
    return suite_main(argv, __doc__, add_arguments, run_one, run_from_args)


if __name__ == "__main__":
    raise SystemExit(main())
