"""scripts/train_csc_tuner.py on a tiny SD folder: the CSC output loads as a tuner and into the CSC pipeline and
lowers the loss given the control map, the ControlNet output loads with from_pretrained, resume is exact, and bad
input fails before anything is written."""

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import vistune
from vistune.data import ShapesDataset
from vistune.pipelines.csc_control import CSCControlModel, StableDiffusionCSCControlPipeline
from vistune.sd_training import (
    ConditionedDataset,
    denoising_loss,
    encode_images,
    encode_prompts,
    load_sd_components,
    make_control_batch,
)
from vistune.testing import tiny_sd_pipeline

from .conftest import kill_after, load_script

SMALL = ["--condition_channels", "32", "--encoder_width_ratio", "0.5"]


@pytest.fixture(scope="module")
def script():
    return load_script("train_csc_tuner")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return folder


def args_for(sd_folder, out, *extra):
    return ["--pretrained_model_name_or_path", str(sd_folder), "--shapes_domain", "plain", "--num_train_images", "16",
            "--resolution", "32", "--train_batch_size", "2", "--seed", "0", "--report_to", "none",
            "--output_dir", str(out), *extra]


def controlled_loss(unet, components, name="canny", seed=123):
    """The denoising loss on a fixed batch of unseen scenes with their canny ground truth and fixed noise."""
    data = ConditionedDataset(ShapesDataset(8, seed=seed, size=32), "canny")
    generator = torch.Generator().manual_seed(seed)
    pixels, captions, control = make_control_batch(data, range(8))
    vistune.set_control(unet, control, name=name)
    try:
        with torch.no_grad():
            latents = encode_images(components.vae, pixels, generator)
            context = encode_prompts(components.tokenizer, components.text_encoder, captions)
            return denoising_loss(unet, components.noise_scheduler, latents, context, generator).item()
    finally:
        vistune.set_control(unet, None, name=name)


def test_csc_lowers_controlled_loss_and_loads_into_the_pipeline(script, sd_folder, tmp_path):
    out = tmp_path / "csc"
    argv = args_for(sd_folder, out, *SMALL, "--max_train_steps", "8", "--learning_rate", "3e-3",
                    "--train_batch_size", "4", "--checkpointing_steps", "4", "--checkpoints_total_limit", "1",
                    "--validation_prompt", "a red circle", "--validation_steps", "8", "--num_validation_images", "1",
                    "--validation_inference_steps", "2")
    assert script.main(argv) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]
    assert (out / "validation" / "step-000008-0.png").is_file() and (out / "validation" / "final-0.png").is_file()
    assert not list(out.glob(".staging-*"))

    components = load_sd_components(sd_folder)
    assert vistune.load_tuners(components.unet, out) == ["canny"]
    tuner = vistune.get_tuner(components.unet, "canny")
    assert tuner.config.condition == "canny" and tuner.config.vae_scale_factor == 2  # read from the tiny VAE
    with vistune.disabled(components.unet):
        before = controlled_loss(components.unet, components)
    after = controlled_loss(components.unet, components)
    assert after < before, (before, after)

    pipe = tiny_sd_pipeline(seed=0)
    controlnet = CSCControlModel.from_tuners(pipe.unet, [out])
    pipe = StableDiffusionCSCControlPipeline(controlnet=controlnet, **pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = ShapesDataset(1, seed=5, size=32).scene(0).image
    images = pipe("a red circle", control_image=image, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_controlnet_output_loads_with_from_pretrained(script, sd_folder, tmp_path):
    from diffusers import ControlNetModel

    out = tmp_path / "controlnet"
    assert script.main(args_for(sd_folder, out, "--method", "controlnet", "--max_train_steps", "2",
                                "--learning_rate", "1e-3", "--condition", "segmentation", "--timestep_sampling", "cubic")) == 0
    controlnet = ControlNetModel.from_pretrained(out, subfolder="controlnet")
    assert list(controlnet.config.conditioning_embedding_out_channels) == [16, 32]  # one downsample: the tiny VAE's 2
    assert any(block.weight.abs().sum() > 0 for block in controlnet.controlnet_down_blocks)  # zero convs trained


def test_use_ema_saves_the_controlnets_moving_average(script, sd_folder, tmp_path):
    from diffusers import ControlNetModel

    out = tmp_path / "controlnet-ema"
    assert script.main(args_for(sd_folder, out, "--method", "controlnet", "--max_train_steps", "2",
                                "--checkpointing_steps", "1", "--learning_rate", "1e-3", "--use_ema")) == 0
    steps = [safetensors.torch.load_file(out / f"checkpoint-{n}" / "trainable.safetensors") for n in (1, 2)]
    ema = safetensors.torch.load_file(out / "checkpoint-2" / "ema.safetensors")
    decay = 2 / 11  # diffusers' EMAModel warm-up at its 2nd step; its 1st copies
    saved = dict(ControlNetModel.from_pretrained(out, subfolder="controlnet").named_parameters())
    assert steps[1].keys() == saved.keys() and any(not torch.equal(steps[0][k], steps[1][k]) for k in saved)
    for key, value in saved.items():
        expected = decay * steps[0][key] + (1 - decay) * steps[1][key]
        torch.testing.assert_close(ema[key], expected)
        torch.testing.assert_close(value.detach(), expected)


def test_killed_run_resumes_to_the_same_weights(script, sd_folder, tmp_path, monkeypatch):
    common = [*SMALL, "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-2",
              "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--random_flip", "--conditioning_dropout", "0.3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert script.main(args_for(sd_folder, straight, *common)) == 0

    kill_after(script, monkeypatch, args_for(sd_folder, killed, *common), 2)  # dies in step 3
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (killed / vistune.WEIGHTS_NAME).exists()

    assert script.main(args_for(sd_folder, killed, *common, "--resume_from_checkpoint", "latest")) == 0
    expected = safetensors.torch.load_file(straight / vistune.WEIGHTS_NAME)
    resumed = safetensors.torch.load_file(killed / vistune.WEIGHTS_NAME)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert any(v.abs().sum() > 0 for k, v in resumed.items() if k.startswith("feature_convs"))  # it did train


def test_bad_input_fails_before_writing(script, sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        script.main(args_for(sd_folder, out, "--condition", "depth"))
    assert "invalid choice: 'depth'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(args_for(sd_folder, out, "--method", "controlnet", "--dense_kernel_size", "1"))
    assert "need --method csc" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--csc_config .*nope.json: no such file"):
        script.main(args_for(sd_folder, out, "--csc_config", str(tmp_path / "nope.json")))
    bad = tmp_path / "bad.json"
    bad.write_text('{"tuner_type": "csc_tuner", "dense_kernel_size": 5}')
    with pytest.raises(vistune.TunerError, match="dense_kernel_size"):
        script.main(args_for(sd_folder, out, "--csc_config", str(bad)))
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        script.main(args_for(tmp_path / "nowhere", out))
    with pytest.raises(ValueError, match="not a multiple of the VAE factor 2"):
        script.main(args_for(sd_folder, out, "--resolution", "33"))
    assert not out.exists()


def test_resume_with_another_condition_is_refused(script, sd_folder, tmp_path):
    out = tmp_path / "run"
    assert script.main(args_for(sd_folder, out, *SMALL, "--max_train_steps", "1", "--checkpointing_steps", "1")) == 0
    with pytest.raises(ValueError, match="--condition canny, not --condition color"):
        script.main(args_for(sd_folder, out, *SMALL, "--condition", "color", "--resume_from_checkpoint", "latest"))
    with pytest.raises(ValueError, match="--conditioning_dropout 0.0, not --conditioning_dropout 0.1"):
        script.main(args_for(sd_folder, out, *SMALL, "--conditioning_dropout", "0.1", "--resume_from_checkpoint",
                             "latest"))


def test_cubic_timestep_samplings_favour_high_or_low_noise():
    from vistune.sd_training import sample_timesteps

    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(1000, 20000, g, "uniform")
    cubic = sample_timesteps(1000, 20000, g, "cubic")
    assert 0 <= int(cubic.min()) and int(cubic.max()) <= 999
    # P(t >= T/2) is 1/2 for uniform timesteps; for (1 - u^3) T it is P(u^3 <= 1/2) = 0.5^(1/3) = 0.794
    assert abs((uniform >= 500).float().mean().item() - 0.5) < 0.02
    assert abs((cubic >= 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.02
    low = sample_timesteps(1000, 20000, g, "cubic_low")  # the mirror: u^3 T, biased to low noise
    assert 0 <= int(low.min()) and int(low.max()) <= 999
    assert abs((low < 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.02
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_timesteps(1000, 4, g, "beta")


@pytest.mark.parametrize("sampling", ["uniform", "cubic", "cubic_low"])
def test_max_timestep_keeps_every_sampling_below_it_and_spread_over_it(sampling):
    from vistune.sd_training import sample_timesteps

    t = sample_timesteps(1000, 20000, torch.Generator().manual_seed(0), sampling, max_timestep=500)
    assert int(t.min()) == 0 and int(t.max()) == 499  # the whole of [0, 500), nothing above
    # the same shape of distribution on [0, 500) as on [0, 1000): P(t >= top / 2) as in the test above
    share = {"uniform": 0.5, "cubic": 0.5 ** (1 / 3), "cubic_low": 1 - 0.5 ** (1 / 3)}[sampling]
    assert abs((t >= 250).float().mean().item() - share) < 0.02
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"max_timestep must lie in \[1, 1000\]"):
            sample_timesteps(1000, 4, None, sampling, max_timestep=bad)
