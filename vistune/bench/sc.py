"""SC-Tuner training cost against peft LoRA and full fine-tuning at the real SD1.5 U-Net size (random weights).

    python -m vistune.bench.sc                      # or: vistune bench sc / python scripts/bench_sc.py
    python -m vistune.bench.sc --batch-sizes 1 4 --steps 5

Each (method, batch size) runs in a fresh subprocess: build the U-Net, set the method up, then time
optimizer steps (forward + backward + AdamW step) and measure the peak memory above the resting model.
The text conditioning is a frozen tensor of the SD shape (77 x 768). CUDA is used when present, with the recipe of
``scripts/train_sc_tuner.py --mixed_precision bf16``: bf16 autocast for every method, the frozen U-Net stored in bf16
for LoRA and SC-Tuner (their trained weights stay fp32), fp32 weights for full fine-tuning. On CPU everything is fp32
and the latent is smaller (default 32x32) so the run fits the machine.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..testing import SD15_UNET_CONFIG, TINY_UNET_CONFIG
from .runner import environment, frozen_dtype, measure_training, suite_main, sweep

METHODS = ("full", "lora", "sc", "sc_shallow")
#: ``sc_shallow``: SC-Tuner on the four shallowest skips (conv_in's and the first down block's) at hidden width 4x
#: the skip's, the setting that comes closest to LoRA's adaptation on the shapes world (``eval_sc_adaptation.py``); backward
#: then runs through the last two up blocks only
SHALLOW_SKIPS = [-4, -3, -2, -1]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
CONFIGS = {"sd15": SD15_UNET_CONFIG, "tiny": TINY_UNET_CONFIG}


def _build_unet(config_name: str, device: torch.device):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[config_name])
    unet = unet.to_empty(device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():  # random weights: cost does not depend on them, and this is fast at 860M parameters
        for param in unet.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        for buffer in unet.buffers():
            buffer.zero_()
    return unet


def _setup(method: str, unet) -> list[torch.nn.Parameter]:
    import vistune

    if method == "full":
        unet.requires_grad_(True)
    elif method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        from diffusers.training_utils import cast_training_params

        cast_training_params(unet, dtype=torch.float32)  # LoRA weights in fp32 on a bf16 backbone
    elif method == "sc":
        vistune.attach(unet, vistune.SCTunerConfig(down_ratio=1.0))
    elif method == "sc_shallow":
        vistune.attach(unet, vistune.SCTunerConfig(down_ratio=4.0, target_skips=SHALLOW_SKIPS))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return [p for p in unet.parameters() if p.requires_grad]


def run_one(case: dict[str, Any]) -> dict[str, Any]:
    """Measure one (method, batch size) in this process (the method is set up before memory tracking starts)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet = _build_unet(case["config"], device).train()
    if case["method"] != "full":
        unet.to(frozen_dtype(device))
    params = _setup(case["method"], unet)
    batch, latent = case["batch_size"], case["latent"]
    sample = torch.randn(batch, 4, latent, latent, device=device)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    timestep = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn_like(sample)

    def loss() -> torch.Tensor:
        return torch.nn.functional.mse_loss(unet(sample, timestep, encoder_hidden_states=context).sample.float(), target)

    return {**case, **measure_training(lambda: (params, loss), device, case["warmup"], case["steps"])}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each row's ratios to the LoRA and full fine-tuning rows of the same batch size."""
    for row in rows:
        for base in ("lora", "full"):
            ref = next((r for r in rows if r["method"] == base and r["batch_size"] == row["batch_size"]), None)
            if ref is not None:
                row[f"memory_vs_{base}"] = row["peak_memory_mb"] / ref["peak_memory_mb"] if ref["peak_memory_mb"] else float("nan")
                row[f"time_vs_{base}"] = row["step_seconds"] / ref["step_seconds"]
                row[f"params_vs_{base}"] = row["trainable_params"] / ref["trainable_params"]
    return rows


def _precision(meta: dict[str, Any]) -> str:
    if meta.get("frozen_dtype", "float32") == "float32":
        return ""
    return f"; bf16 autocast, frozen U-Net stored in {meta['frozen_dtype']}, trained weights fp32"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"SC-Tuner vs peft LoRA (r=64) vs full fine-tuning: U-Net `{meta['config']}`, latent {meta['latent']}x{meta['latent']}, "
        f"{meta['env']['device']}{' (' + meta['env'].get('gpu', '') + ')' if 'gpu' in meta['env'] else ''}, "
        f"median of {meta['steps']} steps after {meta['warmup']} warm-up{_precision(meta)}",
        "",
        "| method | batch | trainable params | peak memory (MB) | step time (s) | memory / LoRA | time / LoRA | memory / full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['trainable_params']:,d} | {r['peak_memory_mb']:.0f} | "
            f"{r['step_seconds']:.3f} | {r.get('memory_vs_lora', float('nan')):.2f} | {r.get('time_vs_lora', float('nan')):.2f} | "
            f"{r.get('memory_vs_full', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def run_unet_suite(module: str, ratios, markdown, batch_sizes=(1, 4), steps: int = 3, warmup: int = 1,
                   latent: int | None = None, config: str = "sd15", methods=METHODS,
                   output_dir: str = "benchmarks/results", name: str = "sc", log=print) -> list[dict[str, Any]]:
    """A U-Net suite (this one, ``csc``): every (method, batch size) of ``module`` in its own subprocess at the
    ``config`` U-Net and ``latent`` size; writes ``<name>.json`` and ``<name>.md``."""
    cuda = torch.cuda.is_available()
    latent = latent or (64 if cuda else 32)
    device = torch.device("cuda" if cuda else "cpu")
    meta = {"config": config, "latent": latent, "steps": steps, "warmup": warmup,
            "frozen_dtype": str(frozen_dtype(device)).removeprefix("torch."), "env": environment(device)}
    base = {"latent": latent, "steps": steps, "warmup": warmup, "config": config}
    return sweep(module, methods, batch_sizes, base, meta, ratios, markdown, output_dir, name, log)


def add_unet_arguments(parser: argparse.ArgumentParser, methods=METHODS, steps: int = 3, name: str = "sc") -> None:
    """The command-line options of a U-Net suite (:func:`run_unet_suite`)."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per case (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--latent", type=int, default=None, help="latent size (default: 64 on CUDA, 32 on CPU)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--methods", nargs="+", choices=methods, default=list(methods))
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--name", default=name, help="results file name (<name>.json / <name>.md)")


def run(batch_sizes=(1, 4), steps: int = 3, warmup: int = 1, latent: int | None = None, config: str = "sd15",
        methods=METHODS, output_dir: str = "benchmarks/results", name: str = "sc", log=print) -> list[dict[str, Any]]:
    """Measure every (method, batch size) in its own subprocess; write ``<name>.json`` and ``<name>.md``."""
    return run_unet_suite("vistune.bench.sc", ratios, markdown, batch_sizes, steps, warmup, latent, config, methods,
                          output_dir, name, log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_unet_arguments(parser, METHODS, steps=3)


def run_from_args(args: argparse.Namespace) -> None:
    run(args.batch_sizes, args.steps, args.warmup, args.latent, args.config, args.methods, args.output_dir, args.name)


def main(argv=None) -> int:
    return suite_main(argv, __doc__, add_arguments, run_one, run_from_args)


if __name__ == "__main__":
    raise SystemExit(main())
