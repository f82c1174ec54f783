"""Watermark decoder tuning: the tuner (identity at attach, exact detach, merge, save/load), PAS, the training
objective (bit accuracy rises), and scripts/train_watermark.py end to end on a tiny VAE."""

import json

import pytest
import torch

import vistune
from vistune.core.errors import BackboneMismatchError, TunerError
from vistune.testing import tiny_sd_components
from vistune.tuners.watermark import (
    ExtractorConfig, HiddenExtractor, WatermarkConfig, WatermarkKey, pas_select, pas_sensitivity, save_extractor, whiten,
)
from vistune.tuners.watermark.train import decode, merged_vae, save_vae, watermark_loss

from .conftest import load_script, randomize

KEY = "01" * 8


def tiny_vae():
    return tiny_sd_components(seed=0)["vae"].eval()


def latents(n=4, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_config_checks_key_and_layers():
    assert WatermarkConfig(key=KEY).num_bits == 16
    for bad in ("", "0120", 5):
        with pytest.raises(TunerError):
            WatermarkConfig(key=bad)
    with pytest.raises(TunerError):
        WatermarkConfig(key=KEY, frozen_layers="decoder.conv_in")
    config = WatermarkConfig(key=KEY, frozen_layers=["decoder.conv_out"])
    assert vistune.TunerConfig.from_json(config.to_json()) == config


def test_identity_at_attach_exact_detach_and_merge():
    vae, z = tiny_vae(), latents()
    with torch.no_grad():
        before = vae.decode(z).sample
    tuner = vistune.attach(vae, WatermarkConfig(key=KEY), name="watermark")
    assert all(not p.requires_grad for n, p in vae.named_parameters() if not n.startswith("vistune_tuners"))
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, before)
        randomize(tuner, std=0.01)
        tuned = vae.decode(z).sample
        assert (tuned - before).abs().max() > 1e-3
        vistune.set_scale(vae, 0.0)
        assert torch.equal(vae.decode(z).sample, before)
        vistune.set_scale(vae, 1.0)
    merged = merged_vae(vae)
    assert not hasattr(merged, "vistune_tuners")
    with torch.no_grad():
        torch.testing.assert_close(merged.decode(z).sample, tuned, atol=1e-5, rtol=1e-5)
        vistune.detach(vae)
        assert torch.equal(vae.decode(z).sample, before)


def test_frozen_layers_have_no_update_and_bad_names_fail():
    vae = tiny_vae()
    tuner = vistune.attach(vae, WatermarkConfig(key=KEY, frozen_layers=["decoder.conv_in", "decoder.conv_out"]))
    assert "decoder.conv_in" not in tuner.tuned and "decoder.conv_out" not in tuner.tuned
    assert not any(k.startswith("decoder__conv_in") for k in tuner.deltas)
    vistune.detach(vae)
    with pytest.raises(BackboneMismatchError, match="not decoder layers"):
        vistune.attach(vae, WatermarkConfig(key=KEY, frozen_layers=["decoder.nope"]))
    with pytest.raises(BackboneMismatchError, match="no .decoder"):
        vistune.attach(torch.nn.Linear(2, 2), WatermarkConfig(key=KEY))


def test_save_load_round_trip(tmp_path):
    vae, z = tiny_vae(), latents()
    tuner = vistune.attach(vae, WatermarkConfig(key=KEY, frozen_layers=["decoder.conv_in"]), name="watermark")
    randomize(tuner, std=0.01)
    with torch.no_grad():
        tuned = vae.decode(z).sample
    vistune.save_tuners(vae, tmp_path / "wm")
    fresh = tiny_vae()
    vistune.load_tuners(fresh, tmp_path / "wm")
    with torch.no_grad():
        assert torch.equal(fresh.decode(z).sample, tuned)
    save_vae(merged_vae(vae), tmp_path / "vae")
    from diffusers import AutoencoderKL

    reloaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.decode(z).sample, tuned, atol=1e-5, rtol=1e-5)


def test_pas_scores_every_layer_restores_weights_and_selects_top():
    vae, z = tiny_vae(), latents(2)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    scores = pas_sensitivity(vae, z, iterations=1)
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
    from vistune.sites.vae import decoder_layers

    assert set(scores) == set(decoder_layers(vae)) and all(s > 0 for s in scores.values())
    top = pas_select(scores, 0.25)
    assert len(top) == -(-len(scores) // 4) and scores[top[0]] == max(scores.values())
    assert min(scores[n] for n in top) >= max(scores[n] for n in scores if n not in top)
    assert pas_select(scores, 0.0) == []
    with pytest.raises(ValueError):
        pas_select(scores, 1.0)


@pytest.mark.parametrize("noise", ["absolute", "relative"])
def test_pas_score_matches_a_hand_perturbed_decode(noise):
    from vistune.sites.vae import decoder_layers
    from vistune.tuners.watermark.losses import image_loss

    vae, z = tiny_vae(), latents(2)
    scores = pas_sensitivity(vae, z, sigma=0.05, iterations=1, seed=3, noise=noise)
    first, module = next(iter(decoder_layers(vae).items()))  # the first layer scored: the first noise drawn
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        base = decode(vae, z)
        for p in module.parameters(recurse=False):
            scale = p.pow(2).mean().sqrt().clamp_min(1e-3) if noise == "relative" else 1.0
            p.add_(0.05 * scale * torch.randn(p.shape, generator=generator))
        expected = float(image_loss(decode(vae, z), base))
    assert scores[first] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="noise"):
        pas_sensitivity(vae, z, noise="uniform")


def small_extractor(bits=16, seed=0):
    torch.manual_seed(seed)
    extractor = HiddenExtractor(ExtractorConfig(num_bits=bits, channels=16, depth=2))
    extractor.eval()
    whiten(extractor, torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    return extractor.requires_grad_(False)


def test_training_embeds_the_key():
    torch.manual_seed(0)
    vae, z = tiny_vae(), latents(8)
    extractor = small_extractor()
    key = WatermarkKey.random(16, seed=3).tensor()
    with torch.no_grad():
        reference = decode(vae, z)
    tuner = vistune.attach(vae, WatermarkConfig(key=WatermarkKey.random(16, seed=3).to_string()))
    optimizer = torch.optim.AdamW(tuner.parameters(), lr=1e-3, weight_decay=0)
    _, first = watermark_loss(vae, extractor, z, reference, key, lambda_i=0.3)
    for _ in range(40):
        loss, logs = watermark_loss(vae, extractor, z, reference, key, lambda_i=0.3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert logs["bit_acc"] > max(0.9, first["bit_acc"] + 0.2)
    assert logs["psnr"] > 15  # a random extractor on a random VAE: the mechanism, not the shipped quality


def test_training_scripts_refuse_bad_attack_weights():
    for name, base, flag in [("train_watermark", ["--pretrained_model_name_or_path", "x"], "--train_attacks"),
                             ("train_watermark_extractor", [], "--augmentations")]:
        script = load_script(name)
        parsed = script.parse_args(base + [flag, "identity,brightness:4"])  # the arguments alone are valid
        assert "brightness" in vars(parsed)[flag[2:]]
        for bad in ("brightness:0", "glitter"):
            with pytest.raises(SystemExit):
                script.parse_args(base + [flag, bad])


@pytest.mark.slow
def test_train_watermark_script_end_to_end(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "sd" / "vae")
    save_extractor(small_extractor(), tmp_path / "extractor")
    script = load_script("train_watermark")
    args = ["--pretrained_model_name_or_path", str(tmp_path / "sd"), "--extractor", str(tmp_path / "extractor"),
            "--output_dir", str(tmp_path / "out"), "--num_train_images", "16", "--train_batch_size", "4",
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--seed", "1", "--pas_fraction", "0.2",
            "--learning_rate", "1e-3", "--train_attacks", "identity,jpeg:2"]
    assert script.main(args) == 0
    out = tmp_path / "out"
    key = WatermarkKey.load(out / "key.json", num_bits=16)
    report = json.loads((out / "train_report.json").read_text())
    assert report["key"] == key.to_string() and len(report["frozen_layers"]) >= 1
    from diffusers import AutoencoderKL

    watermarked = AutoencoderKL.from_pretrained(out / "vae")
    assert any(not torch.equal(a, b) for a, b in zip(watermarked.state_dict().values(), vae.state_dict().values()))
    # resuming from the step-2 checkpoint reproduces the uninterrupted run exactly
    assert script.main(args[:-4] + ["--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "2",
                                    "--pas_fraction", "0.2", "--learning_rate", "1e-3", "--train_attacks", "identity,jpeg:2"]) == 0
    args2 = [a if a != str(tmp_path / "out") else str(tmp_path / "resumed") for a in args]
    assert script.main(args2 + ["--resume_from_checkpoint", "latest"]) == 0
    again = AutoencoderKL.from_pretrained(tmp_path / "resumed" / "vae")
    for a, b in zip(again.state_dict().values(), watermarked.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_video_objective_and_flicker_statistic():
    from vistune.tuners.watermark.video import background_flicker, shapes_clips, temporal_loss, video_watermark_loss

    frames, static = shapes_clips(2, num_frames=4, seed=0, size=32)
    assert frames.shape == (2, 4, 3, 32, 32) and static.shape == (2, 3, 32, 32) and static.float().mean() > 0.3
    assert background_flicker(frames, static) == 0  # the ground truth: static pixels never change
    flicker = frames + 0.02 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))
    assert background_flicker(flicker, static) > 1
    assert temporal_loss(frames, frames) == 0 and temporal_loss(frames + 0.1, frames) < 1e-10  # a constant offset
    vae, extractor = tiny_vae(), small_extractor()
    latents = torch.randn(2, 4, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # tiny VAE: x2
    with torch.no_grad():
        reference = decode(vae, latents.flatten(0, 1)).view(2, 4, 3, 32, 32)
    vistune.attach(vae, WatermarkConfig(key=KEY))
    loss, logs = video_watermark_loss(vae, extractor, latents, reference, WatermarkKey.random(16, seed=0).tensor())
    loss.backward()
    assert logs["loss_t"] == 0 and logs["psnr"] > 100  # identity at attach
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vistune.get_tuner(vae).parameters())
    from vistune.tuners.watermark.temporal import TemporalAlignment

    alignment = TemporalAlignment.from_frames(reference)
    key = WatermarkKey.random(16, seed=0).tensor()
    assert video_watermark_loss(vae, extractor, latents, reference, key, alignment=alignment, index=[0, 1])[1]["loss_t"] == 0
    with pytest.raises(ValueError, match="index"):
        video_watermark_loss(vae, extractor, latents, reference, key, alignment=alignment)
    from vistune.tuners.watermark import RandomAttack

    plain = video_watermark_loss(vae, extractor, latents, reference, key)[1]
    assert video_watermark_loss(vae, extractor, latents, reference, key, attack=RandomAttack(["identity"]))[1] == plain
    darker = video_watermark_loss(vae, extractor, latents, reference, key, attack=RandomAttack(["brightness"]),
                                  generator=torch.Generator().manual_seed(0))[1]
    assert darker["loss_w"] != plain["loss_w"] and darker["psnr"] == plain["psnr"]  # the extractor reads attacked frames


def test_train_watermark_script_video_mode(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    save_extractor(small_extractor(), tmp_path / "extractor")
    script = load_script("train_watermark")
    base = ["--pretrained_model_name_or_path", str(tmp_path / "vae"), "--extractor", str(tmp_path / "extractor"),
            "--output_dir", str(tmp_path / "out"), "--num_train_images", "2", "--train_batch_size", "1",
            "--max_train_steps", "2", "--seed", "0", "--video", "--num_frames", "3"]
    assert script.main(base) == 0
    assert (tmp_path / "out" / "vae" / "config.json").is_file()
    vidsig = [a if a != str(tmp_path / "out") else str(tmp_path / "vidsig") for a in base]
    assert script.main(vidsig + ["--temporal_loss", "vidsig"]) == 0
    report = json.loads((tmp_path / "vidsig" / "train_report.json").read_text())
    assert report["args"]["temporal_loss"] == "vidsig" and report["last_step"]["loss_t"] >= 0
    unaligned = [a if a != str(tmp_path / "out") else str(tmp_path / "unaligned") for a in base]
    assert script.main(unaligned + ["--temporal_loss", "unaligned", "--train_attacks", "brightness,crop"]) == 0
    with pytest.raises(ValueError, match="at least 2"):
        script.main(base + ["--num_frames", "1"])
