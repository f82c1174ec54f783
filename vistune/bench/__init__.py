"""Cost benchmarks: each method measured in a fresh subprocess, reported as ratios to a baseline of the same run."""

# `vistune bench <suite>`: suite name -> (module under vistune.bench, help). Each module has
# `add_arguments(parser)` and `run_from_args(args)`, and runs its cases in fresh subprocesses.
SUITES: dict[str, tuple[str, str]] = {
    "sc": ("sc", "SC-Tuner vs peft LoRA vs full fine-tuning (SD1.5 U-Net, random weights)"),
    "csc": ("csc", "CSC-Tuner (official widths and 1x1) vs diffusers ControlNet (SD1.5 U-Net, random weights)"),
    "watermark": ("watermark", "watermark decoder tuning on the tiny SD: bit accuracy / TPR per attack, PSNR/SSIM, FPR, time"),
    "watermark-pas": ("watermark_pas", "PAS vs whole-decoder watermark tuning: PSNR against bit accuracy over a "
                      "lambda_i sweep (trains the missing runs)"),
    "adapters": ("adapters", "linear / full / LoRA / adapter / MoSA / Pear on VTAB-1k-style shapes tasks (tiny ViT); "
                 "--cost: ViT-B/16 training cost"),
    "vit": ("vit", "HST vs full / linear / LoRA training cost (ViT-B/16, random weights)"),
}
