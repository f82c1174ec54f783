"""scripts/build_assets.py end to end at toy sizes: every stage runs and its outputs load the standard way."""

import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import load_script


@pytest.mark.slow
def test_build_assets_stages_produce_loadable_models(tmp_path):
    import timm
    from diffusers import StableDiffusionPipeline

    build = load_script("build_assets")
    out, work = tmp_path / "assets", tmp_path / "work"
    argv = ["--output_dir", str(out), "--work_dir", str(work), "--stages", "tokenizer,vae,sd,vit",
            "--num_images", "48", "--vae_steps", "2", "--sd_steps", "3", "--sd_batch_size", "4",
            "--vit_steps", "2", "--vit_images", "40", "--checkpointing_steps", "2", "--sd_eval_steps", "2",
            "--vae_latent_channels", "8", "--vae_plain_share", "0.5", "--vae_edge_weight", "1.0",
            "--sd_finetune_steps", "2"]
    assert build.main(argv) == 0
    assert {p.name for p in (work / "sd").iterdir()} == {"checkpoint-2", "checkpoint-3"}
    assert {p.name for p in (work / "sd_finetune").iterdir()} == {"checkpoint-2"}
    report = json.loads((out / "build_report.json").read_text())
    assert report["sd_finetune_final_loss"] > 0
    # the fine-tune phase started from the first phase's EMA weights and what ships is its own EMA
    first_ema = load_file(str(work / "sd" / "checkpoint-3" / "ema_unet.safetensors"))
    tuned_ema = load_file(str(work / "sd_finetune" / "checkpoint-2" / "ema_unet.safetensors"))
    shipped = load_file(str(out / "tiny-sd-shapes" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(shipped[k], tuned_ema[k]) for k in shipped)
    assert any(not torch.equal(first_ema[k], tuned_ema[k]) for k in shipped)
    assert 0 <= report["vae_checker_ceiling"] <= 1
    curve = report["sd_fidelity_curve"]
    assert [point["step"] for point in curve] == [2] and 0 <= curve[0]["heldout_caption_fidelity"] <= 1

    pipe = StableDiffusionPipeline.from_pretrained(out / "tiny-sd-shapes")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a white background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    ids = pipe.tokenizer("a red circle").input_ids
    assert len(ids) == 5  # start, three one-token words, end
    longest = "a red circle, a blue square and a green star on a white background"
    assert len(pipe.tokenizer(longest).input_ids) <= pipe.tokenizer.model_max_length  # no caption is truncated
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 8
    vit = timm.create_model(f"local-dir:{out / 'tiny-vit-shapes'}", pretrained=True)
    assert vit(torch.zeros(1, 3, 64, 64)).shape == (1, 24)
    saved = load_file(str(out / "tiny-vit-shapes" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in vit.state_dict().items())  # the trained weights, not a fresh init

    # a second run resumes from the stage's last checkpoint instead of starting over
    assert build.main(argv[:5] + ["sd", *argv[6:], "--sd_steps", "4", "--sd_finetune_steps", "3", "--resume"]) == 0
    assert (work / "sd" / "checkpoint-4").is_dir() and (work / "sd_finetune" / "checkpoint-3").is_dir()


def test_fine_tune_phase_arguments_are_checked(capsys):
    build = load_script("build_assets")
    assert build.parse_args(["--sd_finetune_steps", "0"]).sd_finetune_steps == 0  # 0 turns the phase off
    for bad in (["--sd_finetune_steps", "-1"], ["--sd_finetune_ema", "1.0"]):
        with pytest.raises(SystemExit):
            build.parse_args(bad)
        assert "--sd_finetune_steps must be >= 0" in capsys.readouterr().err
    assert build.parse_args(["--vae_decoder_steps", "0"]).vae_decoder_steps == 0  # 0 skips the decoder stage
    with pytest.raises(SystemExit):
        build.parse_args(["--vae_decoder_steps", "-5"])
    assert "--vae_decoder_steps must be >= 0" in capsys.readouterr().err


def test_vae_style_mix_and_edge_loss():
    from collections import Counter

    build = load_script("build_assets")
    counts = Counter(build.vae_styles(0.5))
    assert counts["plain"] == 50 and sum(counts.values()) == 100 and len(counts) == 5
    assert max(v for k, v in counts.items() if k != "plain") - min(v for k, v in counts.items() if k != "plain") <= 1
    assert set(build.vae_styles(1.0)) == {"plain"}
    with pytest.raises(ValueError, match="vae_plain_share"):
        build.vae_styles(1.5)

    square = torch.zeros(1, 3, 16, 16)
    square[..., 4:12, 4:12] = 1.0
    blurred = torch.nn.functional.avg_pool2d(square, 3, stride=1, padding=1)
    assert build.gradient_l1(square, square) == 0
    # same mean colour, softer edges: the pixel L1 barely sees it, the gradient loss does
    assert build.gradient_l1(blurred, square) > 2 * torch.nn.functional.l1_loss(blurred, square)


def test_unet_layout_arguments_are_checked(capsys):
    build = load_script("build_assets")
    args = build.parse_args(["--unet_channels", "32,64,128", "--unet_cross_attention", "0,1,1"])
    assert args.unet_widths == (32, 64, 128) and args.unet_attention == (False, True, True)
    assert build.parse_args(["--unet_channels", "64,128"]).unet_attention == (True, True)  # default: every level
    assert build.parse_args([]).unet_attention == (False, True, True)  # the shipped layout: a plain 16x16 level
    for bad in (["--unet_cross_attention", "0,1,1"], ["--unet_cross_attention", "0,0"],
                ["--unet_cross_attention", "1,2"]):
        with pytest.raises(SystemExit):
            build.parse_args(["--unet_channels", "64,128", *bad])
        assert "--unet_cross_attention needs one 0/1 per --unet_channels level" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build.parse_args(["--unet_channels", "64,wide"])
    assert "--unet_channels takes comma-separated integers" in capsys.readouterr().err


@pytest.mark.slow
def test_factor_two_vae_and_plain_top_level_build_a_working_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    build = load_script("build_assets")
    out = tmp_path / "assets"
    argv = ["--output_dir", str(out), "--work_dir", str(tmp_path / "work"), "--stages", "tokenizer,vae,vae_decoder,sd",
            "--num_images", "16", "--vae_steps", "1", "--vae_decoder_steps", "2", "--sd_steps", "1", "--sd_batch_size",
            "2", "--sd_eval_steps", "0", "--vae_factor", "2", "--unet_channels", "32,64", "--unet_cross_attention", "0,1"]
    assert build.main(argv) == 0
    # the decoder stage trained the decoder and left the encoder (so every latent the U-Net saw) untouched
    from_vae_stage = load_file(str(tmp_path / "work" / "vae" / "checkpoint-1" / "vae.safetensors"))
    shipped_vae = load_file(str(out / "tiny-sd-shapes" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert from_vae_stage.keys() == shipped_vae.keys()
    frozen = [k for k in shipped_vae if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(from_vae_stage[k], shipped_vae[k]) for k in frozen)
    assert any(not torch.equal(from_vae_stage[k], shipped_vae[k]) for k in shipped_vae if k.startswith("decoder."))
    report = json.loads((out / "build_report.json").read_text())
    assert report["vae_decoder_final_loss"] > 0 and 0 <= report["vae_checker_ceiling_after_decoder"] <= 1
    pipe = StableDiffusionPipeline.from_pretrained(out / "tiny-sd-shapes")
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    assert list(pipe.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert list(pipe.unet.config.up_block_types) == ["CrossAttnUpBlock2D", "UpBlock2D"]
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a white background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3)
