"""A tuned U-Net inside an unmodified diffusers StableDiffusionPipeline (tiny components built in the test)."""

import numpy as np
import pytest
import torch

import vistune
from vistune import SCTunerConfig
from vistune.testing import tiny_sd_pipeline

from .conftest import randomize


def generate(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        ["a red circle", "a blue star on a white background"],
        num_inference_steps=3,
        height=32,
        width=32,
        generator=generator,
        output_type="np",
    ).images


@pytest.fixture
def fresh_pipe():
    return tiny_sd_pipeline(seed=0)


def test_tuned_unet_generates_in_stock_pipeline_and_scale_zero_and_detach_restore_base(fresh_pipe):
    base = generate(fresh_pipe)
    tuner = vistune.attach(fresh_pipe.unet, SCTunerConfig(), name="style")
    assert np.array_equal(generate(fresh_pipe), base)  # identity at init
    randomize(tuner, std=0.2)
    tuned = generate(fresh_pipe)
    assert tuned.shape == base.shape and np.isfinite(tuned).all()
    assert np.abs(tuned - base).max() > 1e-3
    vistune.set_scale(fresh_pipe.unet, 0.0)
    assert np.array_equal(generate(fresh_pipe), base)
    vistune.set_scale(fresh_pipe.unet, 1.0)
    assert np.array_equal(generate(fresh_pipe), tuned)
    vistune.detach(fresh_pipe.unet)
    assert np.array_equal(generate(fresh_pipe), base)


def test_saved_tuner_loads_into_a_fresh_pipeline_and_reproduces_images(fresh_pipe, tmp_path):
    randomize(vistune.attach(fresh_pipe.unet, SCTunerConfig(down_ratio=0.5)), std=0.2)
    tuned = generate(fresh_pipe)
    vistune.save_tuners(fresh_pipe.unet, tmp_path / "style")
    other = tiny_sd_pipeline(seed=0)
    vistune.load_tuners(other.unet, tmp_path / "style")
    assert np.array_equal(generate(other), tuned)
