"""``vistune demo``: adapt the shipped tiny Stable Diffusion to a shapes-world style with an SC-Tuner, measured.

The demo loads ``assets/tiny-sd-shapes`` (trained by ``scripts/build_assets.py`` on plain shapes-world scenes),
generates a before-grid, attaches an SC-Tuner, trains it on scenes of one style domain (the captions do not name
the style: the tuner *is* the style), generates the after-grid, and reports what the analytic metrics measure:
the style statistic before / after / on real images of that style, and caption fidelity before / after. It also
checks the API's promises: identity at attach, scale 0 is the base model, save -> load reproduces the images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import core
from .assets import load_tiny_sd
from .data import HELD_OUT_PAIRS, sample_scene, style_statistic
from .metrics import caption_fidelity
from .sd_training import denoising_loss, encode_images, encode_prompts
from .tuners import SCTunerConfig

#: Prompts of (shape, colour) pairs the base model was trained on, one to three shapes.
PROMPTS = [
    "a red circle on a white background",
    "a blue square on a gray background",
    "a green triangle on a black background",
    "a yellow star on a white background",
    "an orange triangle on a gray background",
    "a purple star on a white background",
    "a red square and a green circle on a white background",
    "a blue circle and a yellow triangle on a black background",
]
GUIDANCE = 4.0
SAMPLING_STEPS = 25


def demo_tuner_config() -> SCTunerConfig:
    """The demo's SC-Tuner: the four shallowest skips at hidden width 4x. Those skips carry colour and texture;
    tuning the deep ones too moves the style no further on the shipped model but bends shapes (assets/README.md)."""
    return SCTunerConfig(target_skips=[-4, -3, -2, -1], down_ratio=4.0)


def generate(pipe, prompts: Sequence[str], seed: int, images_per_prompt: int = 2, guidance_scale: float = GUIDANCE,
             progress: bool = False, **call_kwargs) -> list:
    """``images_per_prompt`` images per prompt, seeded per prompt so every call reproduces the same noise;
    ``call_kwargs`` go to each pipeline call (e.g. ``callback_on_step_end``)."""
    images = []
    for i, prompt in enumerate(tqdm(prompts, desc="prompts", leave=False, disable=not progress)):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        images += pipe(prompt, num_inference_steps=SAMPLING_STEPS, guidance_scale=guidance_scale, generator=generator,
                       num_images_per_prompt=images_per_prompt, **call_kwargs).images
    return images


def save_grid(images: list, columns: int, path: Path, upscale: int = 3) -> None:
    from diffusers.utils import make_image_grid

    grid = make_image_grid(images, rows=len(images) // columns, cols=columns)
    grid.resize((grid.width * upscale, grid.height * upscale), resample=0).save(path)  # nearest-neighbour


def style_domain(style: str, count: int, seed: int, size: int) -> tuple[np.ndarray, list[str]]:
    """``count`` scenes of ``style`` (never a held-out pair) as N x H x W x 3 uint8 images, and their captions
    (which do not name the style)."""
    scenes = [sample_scene((seed, i), size=size, style=style, exclude=HELD_OUT_PAIRS) for i in range(count)]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float in [-1, 1], what the VAE encodes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """N x H x W x 3 uint8 images encoded (posterior mean) and decoded by ``vae``, as uint8.

    A text-to-image model can only output what its VAE decodes, so a style statistic measured on round-tripped
    real images is the most any tuner of that model can reach (a thin outline or a stripe pattern the VAE
    blurs away cannot be learned by tuning the U-Net)."""
    device, dtype = vae.device, vae.dtype
    out = []
    for i in range(0, len(images), batch_size):
        pixels = to_pixels(images[i:i + batch_size]).to(device, dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.float().clamp(-1, 1)
        out.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def checker_ceiling(vae, style: str, count: int = 200, seed: int = 0) -> float:
    """Caption fidelity of the checker on real ``style`` scenes (1-3 shapes) encoded and decoded by ``vae``.

    The checker reads colours and shapes from pixels, and a style changes both (pastel colours sit between
    named colours, outlines are thin), so a model that has fully learned a style scores lower on the checker for
    that reason alone. This is the score of perfect images of the style through the model's own decoder: the
    reference against which a tuned model's fidelity is judged."""
    images, captions = style_domain(style, count, seed, vae.config.sample_size)
    return caption_fidelity(list(vae_round_trip(vae, images)), captions)


def fidelity_reference(ceiling_plain: float, ceiling_style: float, gap_closed: float) -> float:
    """The checker's expected score on perfect images that are ``gap_closed`` of the way from plain to the style.

    A tuner that has learned part of a style is judged against the same part of the way from the plain
    reference to the style's (both from :func:`checker_ceiling`), so neither an unlearned style nor a fully
    learned one is flattered; ``gap_closed`` is clipped to [0, 1]."""
    return ceiling_plain + min(max(gap_closed, 0.0), 1.0) * (ceiling_style - ceiling_plain)


def train_on_latents(pipe, latents: torch.Tensor, context: torch.Tensor, steps: int, batch_size: int = 32,
                     learning_rate: float = 3e-4, seed: int = 0, desc: str = "training") -> list[float]:
    """Train whatever requires grad in ``pipe.unet`` (e.g. an attached tuner) on (latent, text embedding) pairs
    with the pipeline's own noise schedule and prediction type; AdamW, constant rate. Returns the losses."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(core.trainable_parameters(pipe.unet), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in (progress := tqdm(range(steps), desc=desc)):
        index = torch.randint(0, len(latents), (batch_size,), generator=generator).to(latents.device)
        loss = denoising_loss(pipe.unet, noise_scheduler, latents[index], context[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses


def mean_statistic(images: Sequence, style: str) -> float:
    return float(np.mean([style_statistic(image, style) for image in images]))


def same_images(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def run_demo(
    output_dir: str | Path = "vistune-demo",
    steps: int = 600,
    seed: int = 0,
    style: str = "striped",
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    num_train_images: int = 512,
    images_per_prompt: int = 8,
    config: SCTunerConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo; write ``before.png``, ``after.png``, the tuner (``tuner/``) and ``report.md``.

    ``config`` defaults to :func:`demo_tuner_config`."""
    from accelerate import Accelerator

    device = Accelerator().device
    pipe = load_tiny_sd().to(device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet = pipe.unet
    size = pipe.vae.config.sample_size
    log(f"vistune demo: adapting the shipped tiny Stable Diffusion (assets/tiny-sd-shapes, {size}x{size}) "
        f"to the '{style}' style with an SC-Tuner on {device}")

    n = images_per_prompt
    before = generate(pipe, PROMPTS, seed, n)
    save_grid(before, 2 * n, out / "before.png")
    images, captions = style_domain(style, num_train_images, seed + 1000, size)
    reference, _ = style_domain(style, 64, seed + 2000, size)
    with torch.no_grad():
        latents = encode_images(pipe.vae, to_pixels(images), torch.Generator().manual_seed(seed))
        context = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
    target_value = mean_statistic(reference, style)
    ceiling = {s: checker_ceiling(pipe.vae, s, seed=seed + 3000) for s in ("plain", style)}

    config = config or demo_tuner_config()
    torch.manual_seed(seed)  # the tuner's random init: the same seed gives the same run
    tuner = core.attach(unet, config, name=style)
    identity = same_images(generate(pipe, PROMPTS[:2], seed, n), before[:2 * n])
    started = time.perf_counter()
    losses = train_on_latents(pipe, latents, context, steps, batch_size, learning_rate, seed, desc=f"SC-Tuner ({style})")
    train_seconds = time.perf_counter() - started

    after = generate(pipe, PROMPTS, seed, n)
    save_grid(after, 2 * n, out / "after.png")
    tuner_dir = core.save_tuners(unet, out / "tuner")
    reloaded = load_tiny_sd().to(device)
    core.load_tuners(reloaded.unet, tuner_dir)
    round_trip = same_images(generate(reloaded, PROMPTS[:2], seed, n), after[:2 * n])
    with core.disabled(unet):
        scale_zero = same_images(generate(pipe, PROMPTS[:2], seed, n), before[:2 * n])

    prompts = [p for p in PROMPTS for _ in range(n)]
    base_value, tuned_value = mean_statistic(before, style), mean_statistic(after, style)
    result = {
        "device": str(device),
        "style": style,
        "tuner_params": sum(p.numel() for p in tuner.parameters()),
        "tuned_skips": "all" if config.target_skips is None else ", ".join(map(str, config.target_skips)),
        "down_ratio": config.down_ratio,
        "unet_params": sum(p.numel() for n, p in unet.named_parameters() if not n.startswith(core.model.CONTAINER_NAME)),
        "steps": steps,
        "batch_size": batch_size,
        "images_per_prompt": n,
        "train_seconds": train_seconds,
        "loss_first": float(np.mean(losses[:20])),
        "loss_last": float(np.mean(losses[-20:])),
        "style_base": base_value,
        "style_tuned": tuned_value,
        "style_target": target_value,
        "style_gap_closed": (tuned_value - base_value) / (target_value - base_value),
        "fidelity_base": caption_fidelity(before, prompts),
        "fidelity_tuned": caption_fidelity(after, prompts),
        "checker_ceiling_plain": ceiling["plain"],
        "checker_ceiling_style": ceiling[style],
        "identity_at_attach": identity,
        "scale_zero_is_base": scale_zero,
        "save_load_exact": round_trip,
    }
    result["fidelity_reference_tuned"] = fidelity_reference(ceiling["plain"], ceiling[style], result["style_gap_closed"])
    ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731  (a VAE that keeps no shape: no reference)
    result["relative_fidelity_base"] = ratio(result["fidelity_base"], ceiling["plain"])
    result["relative_fidelity_tuned"] = ratio(result["fidelity_tuned"], result["fidelity_reference_tuned"])
    _write_report(out, result)
    log(f"'{style}' statistic {base_value:.3f} -> {tuned_value:.3f} (real {style} images: {target_value:.3f}, "
        f"{100 * result['style_gap_closed']:.0f}% of the gap closed); caption fidelity "
        f"{100 * result['fidelity_base']:.0f}% -> {100 * result['fidelity_tuned']:.0f}% (relative to perfect images "
        f"of the same style share through the VAE: {100 * result['relative_fidelity_base']:.0f}% -> "
        f"{100 * result['relative_fidelity_tuned']:.0f}%)")
    log(f"report: {out / 'report.md'}")
    return result


def _write_report(out: Path, r: dict) -> None:
    yes = {True: "yes", False: "NO"}
    rows = "\n".join(f"| {p} |" for p in PROMPTS)
    text = f"""# vistune demo: SC-Tuner style adaptation

The shipped tiny Stable Diffusion (`assets/tiny-sd-shapes`, trained on plain shapes-world scenes) with an
SC-Tuner trained on the **{r['style']}** style domain; captions in training do not name the style. Measured on
{r['device']} with the analytic checker and style statistic of `vistune.metrics` / `vistune.data`
({len(PROMPTS)} prompts x {r['images_per_prompt']} images, {SAMPLING_STEPS} DDIM steps, guidance {GUIDANCE}).

| measure | base | SC-Tuner |
|---|---|---|
| '{r['style']}' style statistic (real {r['style']} images: {r['style_target']:.3f}) | {r['style_base']:.3f} | {r['style_tuned']:.3f} |
| share of the gap to real {r['style']} images closed | 0% | {100 * r['style_gap_closed']:.0f}% |
| caption fidelity (every prompted colour + shape found) | {100 * r['fidelity_base']:.0f}% | {100 * r['fidelity_tuned']:.0f}% |
| the checker on real scenes of the same style through this VAE (plain / {r['style']}) | {100 * r['checker_ceiling_plain']:.0f}% | {100 * r['checker_ceiling_style']:.0f}% |
| reference: perfect images at this share of the style through this VAE | {100 * r['checker_ceiling_plain']:.0f}% | {100 * r['fidelity_reference_tuned']:.0f}% |
| caption fidelity relative to that reference | {100 * r['relative_fidelity_base']:.0f}% | {100 * r['relative_fidelity_tuned']:.0f}% |

| training | value |
|---|---|
| U-Net parameters (frozen) | {r['unet_params']:,d} |
| SC-Tuner parameters (trained) | {r['tuner_params']:,d} (skips {r['tuned_skips']}, hidden width {r['down_ratio']:g}x) |
| steps x batch, time | {r['steps']} x {r['batch_size']}, {r['train_seconds']:.1f} s |
| denoising loss, first 20 -> last 20 steps | {r['loss_first']:.4f} -> {r['loss_last']:.4f} |
| images unchanged right after attach (identity at init) | {yes[r['identity_at_attach']]} |
| scale 0 reproduces the base images exactly | {yes[r['scale_zero_is_base']]} |
| saved tuner reloaded into a fresh pipeline reproduces the images exactly | {yes[r['save_load_exact']]} |

Before (base model), {r['images_per_prompt']} images per prompt, prompts in order:

![before](before.png)

After (SC-Tuner attached):

![after](after.png)

| prompts |
|---|
{rows}

The checker reads colours and shapes from pixels, and a style changes both (pastel colours lie between the
named colours, outlines are thin), so images that have fully taken on a style score lower for that reason
alone. The checker row is what perfect images of each style score: real scenes encoded and decoded by this
model's VAE. The tuned images have taken on only part of the style, so their reference is the same part of the
way from the plain score to the style's score; the relative row divides by that reference, so it shows what the
tuner cost, not what the style costs the checker.

The trained tuner is in `tuner/` (`tuner_config.json` + `tuner_model.safetensors`); load it with
`vistune.load_tuners(pipe.unet, "{out.name}/tuner")`.
"""
    (out / "report.md").write_text(text)
