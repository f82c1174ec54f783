"""scripts/train_sc_tuner.py on a tiny SD folder: each method's output loads the standard way, resume is exact,
bad input fails before anything is written, and the script runs under ``accelerate launch`` with 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vistune
from vistune.data import ShapesDataset
from vistune.sd_training import (
    denoising_loss, drop_captions, encode_images, encode_prompts, load_sd_components, make_batch,
)
from vistune.testing import tiny_sd_pipeline

from .conftest import kill_after, load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_sc_tuner.py"


@pytest.fixture(scope="module")
def script():
    return load_script("train_sc_tuner")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return folder


def args_for(sd_folder, out, *extra):
    return ["--pretrained_model_name_or_path", str(sd_folder), "--shapes_domain", "striped", "--num_train_images", "16",
            "--resolution", "32", "--train_batch_size", "2", "--seed", "0", "--report_to", "none",
            "--output_dir", str(out), *extra]


def domain_loss(unet, components, seed=123):
    """The denoising loss on a fixed batch of unseen striped scenes with fixed noise."""
    data = ShapesDataset(8, seed=seed, size=32, style="striped")
    generator = torch.Generator().manual_seed(seed)
    pixels, captions = make_batch(data, range(8))
    with torch.no_grad():
        latents = encode_images(components.vae, pixels, generator)
        context = encode_prompts(components.tokenizer, components.text_encoder, captions)
        return denoising_loss(unet, components.noise_scheduler, latents, context, generator).item()


def test_sc_lowers_domain_loss_and_loads(script, sd_folder, tmp_path):
    out = tmp_path / "sc"
    argv = args_for(sd_folder, out, "--max_train_steps", "8", "--learning_rate", "3e-3", "--train_batch_size", "4",
                    "--checkpointing_steps", "4", "--checkpoints_total_limit", "1", "--validation_prompt",
                    "a red circle", "--validation_steps", "8", "--num_validation_images", "1",
                    "--validation_inference_steps", "2")
    assert script.main(argv) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]  # total limit 1
    assert (out / "validation" / "step-000008-0.png").is_file() and (out / "validation" / "final-0.png").is_file()
    assert not list(out.glob(".staging-*"))

    components = load_sd_components(sd_folder)
    assert vistune.load_tuners(components.unet, out) == ["default"]
    with vistune.disabled(components.unet):
        before = domain_loss(components.unet, components)
    after = domain_loss(components.unet, components)
    assert after < before, (before, after)


def test_sc_target_skips_tunes_only_those_skips(script, sd_folder, tmp_path):
    out = tmp_path / "sc-skips"
    argv = args_for(sd_folder, out, "--max_train_steps", "1", "--sc_target_skips", "2,0")
    assert script.main(argv) == 0
    components = load_sd_components(sd_folder)
    assert vistune.load_tuners(components.unet, out) == ["default"]
    tuner = vistune.core.list_tuners(components.unet)["default"]
    assert tuner.config.target_skips == [0, 2] and sorted(tuner.skips) == ["0", "2"]
    with pytest.raises(SystemExit):  # not a list of indices: an argparse error before anything is written
        script.main(args_for(sd_folder, tmp_path / "bad", "--sc_target_skips", "1,x"))
    assert not (tmp_path / "bad").exists()


def test_lora_output_loads_with_load_lora_weights(script, sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    argv = args_for(sd_folder, out, "--method", "lora", "--lora_rank", "4", "--max_train_steps", "2",
                    "--learning_rate", "1e-2")
    assert script.main(argv) == 0
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    components = load_sd_components(sd_folder)
    base = domain_loss(pipe.unet, components)
    pipe.load_lora_weights(out)
    assert domain_loss(pipe.unet, components) != base


def test_full_output_loads_with_from_pretrained(script, sd_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "full"
    assert script.main(args_for(sd_folder, out, "--method", "full", "--max_train_steps", "1")) == 0
    trained = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters())]
    assert any(changed)


def test_killed_run_resumes_to_the_same_weights(script, sd_folder, tmp_path, monkeypatch):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-2",
              "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert script.main(args_for(sd_folder, straight, *common)) == 0

    kill_after(script, monkeypatch, args_for(sd_folder, killed, *common), 4)  # 2 steps x 2 micro-batches, then dies
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (killed / vistune.WEIGHTS_NAME).exists()  # no final output from a killed run

    assert script.main(args_for(sd_folder, killed, *common, "--resume_from_checkpoint", "latest")) == 0
    expected = safetensors.torch.load_file(straight / vistune.WEIGHTS_NAME)
    resumed = safetensors.torch.load_file(killed / vistune.WEIGHTS_NAME)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert any(v.abs().sum() > 0 for k, v in resumed.items() if "ln2.weight" in k)  # it did train


def test_resume_with_other_optimisation_flags_is_refused(script, sd_folder, tmp_path):
    out = tmp_path / "run"
    first = ["--max_train_steps", "1", "--checkpointing_steps", "1", "--snr_gamma", "5",
             "--proportion_empty_prompts", "0.2"]
    assert script.main(args_for(sd_folder, out, *first, "--max_train_timestep", "500")) == 0
    state = json.loads((out / "checkpoint-1" / "state.json").read_text())
    assert state["extra"]["flags"]["snr_gamma"] == 5.0 and state["extra"]["flags"]["learning_rate"] == 1e-4
    assert state["extra"]["flags"]["max_train_timestep"] == 500
    assert state["extra"]["flags"]["proportion_empty_prompts"] == 0.2
    with pytest.raises(ValueError, match="--proportion_empty_prompts 0.2, not --proportion_empty_prompts 0.0"):
        script.main(args_for(sd_folder, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest",
                             "--max_train_timestep", "500", "--snr_gamma", "5"))
    more = ["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--proportion_empty_prompts", "0.2",
            "--max_train_timestep", "500"]
    with pytest.raises(ValueError, match="--max_train_timestep 500, not --max_train_timestep None"):
        script.main(args_for(sd_folder, out, *more[:-2], "--snr_gamma", "5"))
    with pytest.raises(ValueError, match="--snr_gamma 5.0, not --snr_gamma None; resume with"):
        script.main(args_for(sd_folder, out, *more))
    with pytest.raises(ValueError, match="--learning_rate 0.0001, not --learning_rate 0.001"):
        script.main(args_for(sd_folder, out, *more, "--snr_gamma", "5", "--learning_rate", "1e-3"))
    with pytest.raises(ValueError, match="--method sc, not --method lora"):
        script.main(args_for(sd_folder, out, *more, "--snr_gamma", "5", "--method", "lora"))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]  # nothing ran
    assert script.main(args_for(sd_folder, out, *more, "--snr_gamma", "5")) == 0  # the same flags continue


def test_drop_captions_follows_its_draws_and_draws_nothing_at_zero():
    captions = [f"caption {i}" for i in range(1000)]
    generator = torch.Generator().manual_seed(3)
    assert drop_captions(captions, 0.0, generator) == captions
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())  # the stream is untouched
    dropped = drop_captions(captions, 0.3, generator)
    draws = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    assert dropped == ["" if u < 0.3 else c for c, u in zip(captions, draws.tolist())]
    assert 250 < dropped.count("") < 350


def test_caption_dropout_trains_that_share_with_the_empty_caption(script, sd_folder, tmp_path, monkeypatch):
    seen = []
    encode = script.encode_prompts
    monkeypatch.setattr(script, "encode_prompts", lambda tok, enc, captions: seen.append(list(captions)) or
                        encode(tok, enc, captions))
    common = ["--max_train_steps", "6", "--train_batch_size", "4", "--checkpointing_steps", "100"]
    assert script.main(args_for(sd_folder, tmp_path / "kept", *common)) == 0
    kept, seen[:] = sum(seen, []), []
    assert script.main(args_for(sd_folder, tmp_path / "dropped", *common, "--proportion_empty_prompts", "0.5")) == 0
    dropped = sum(seen, [])
    assert len(dropped) == len(kept) == 24 and all(kept)
    assert all(d in ("", k) for d, k in zip(dropped, kept))  # the same examples, some with the empty caption
    assert 6 <= dropped.count("") <= 18  # about half of 24


@pytest.mark.parametrize("share", ["-0.1", "1"])
def test_caption_dropout_share_is_checked(script, share, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--shapes_domain", "plain",
                           "--proportion_empty_prompts", share])
    assert "--proportion_empty_prompts must lie in [0, 1)" in capsys.readouterr().err


def test_bad_input_fails_before_writing(script, sd_folder, tmp_path):
    out = tmp_path / "out"
    not_sd = tmp_path / "not-sd"
    (not_sd / "unet").mkdir(parents=True)
    (not_sd / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a diffusers Stable Diffusion folder: missing unet/config.json, vae/"):
        script.main(args_for(not_sd, out, "--max_train_steps", "1"))
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        script.main(args_for(tmp_path / "nowhere", out, "--max_train_steps", "1"))
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .*checkpoint-7: no checkpoint"):
        script.main(args_for(sd_folder, out, "--resume_from_checkpoint", "checkpoint-7"))
    with pytest.raises(ValueError, match="--max_train_timestep 1001: the scheduler of .* trains on 1000 timesteps"):
        script.main(args_for(sd_folder, out, "--max_train_timestep", "1001"))
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = args_for(sd_folder, out)
    argv[argv.index("--shapes_domain"):argv.index("--shapes_domain") + 2] = ["--train_data_dir", str(empty)]
    with pytest.raises(ValueError, match="holds no usable training image"):
        script.main(argv)
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(sd_folder, tmp_path):
    out = tmp_path / "ddp"
    # accelerate's --cpu flag runs a single process; two CPU processes (gloo) are torchrun's multi-process
    # launch with ACCELERATE_USE_CPU, which makes the Accelerator pick MULTI_CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           *args_for(sd_folder, out, "--max_train_steps", "2", "--checkpointing_steps", "2")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout + result.stderr
    components = load_sd_components(sd_folder)
    assert vistune.load_tuners(components.unet, out) == ["default"]
    assert (out / "checkpoint-2" / "state.json").is_file()


def test_use_ema_saves_the_moving_average_of_the_trained_weights(script, sd_folder, tmp_path):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "1", "--learning_rate", "1e-2"]
    raw, averaged = tmp_path / "raw", tmp_path / "ema"
    assert script.main(args_for(sd_folder, raw, *common)) == 0
    assert script.main(args_for(sd_folder, averaged, *common, "--use_ema", "--ema_decay", "0.5")) == 0
    # the average does not change training: the same trajectory, and diffusers' EMAModel formula over it
    steps = [safetensors.torch.load_file(raw / f"checkpoint-{n}" / "trainable.safetensors") for n in range(1, 5)]
    assert all(torch.equal(a, b) for a, b in zip(
        steps[-1].values(), safetensors.torch.load_file(averaged / "checkpoint-4" / "trainable.safetensors").values()))
    expected = dict(steps[0])  # step 1: decay 0, a copy
    for n, state in enumerate(steps[1:], start=1):
        decay = min((1 + n) / (10 + n), 0.5)
        expected = {k: expected[k] - (1 - decay) * (expected[k] - state[k]) for k in state}
    ema = safetensors.torch.load_file(averaged / "checkpoint-4" / "ema.safetensors")
    assert int(ema.pop("ema.optimization_step")) == 4
    assert ema.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(ema[key], expected[key])
    # what is saved (and loads with load_tuners) is the average, not the last step
    components = load_sd_components(sd_folder)
    vistune.load_tuners(components.unet, averaged)
    loaded = dict(components.unet.named_parameters())
    moved = [k for k in expected if not torch.equal(expected[k], steps[-1][k])]
    assert moved and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_killed_run_with_ema_resumes_to_the_same_average(script, sd_folder, tmp_path, monkeypatch):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-2", "--use_ema",
              "--ema_decay", "0.9"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert script.main(args_for(sd_folder, straight, *common)) == 0
    kill_after(script, monkeypatch, args_for(sd_folder, killed, *common), 2)  # dies in step 3
    with pytest.raises(ValueError, match="--use_ema True, not --use_ema False"):
        script.main(args_for(sd_folder, killed, *common[:-3], "--resume_from_checkpoint", "latest"))
    assert script.main(args_for(sd_folder, killed, *common, "--resume_from_checkpoint", "latest")) == 0
    expected = safetensors.torch.load_file(straight / vistune.WEIGHTS_NAME)
    resumed = safetensors.torch.load_file(killed / vistune.WEIGHTS_NAME)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
