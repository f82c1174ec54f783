"""The CSC-Tuner as a diffusers pipeline component and the controllable SD pipeline (tiny components, no download)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

import vistune
from vistune import BackboneMismatchError, CSCTunerConfig, SCTunerConfig
from vistune.conditions import canny, color
from vistune.pipelines.csc_control import CSCControlModel, ControlInputError, StableDiffusionCSCControlPipeline
from vistune.testing import tiny_sd_components, tiny_unet

from .conftest import randomize

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vae_scale_factor=2, encoder_width_ratio=0.5, condition_channels=32)  # the tiny VAE's factor is 2


def scene(seed=0, size=(40, 48)) -> np.ndarray:
    """A test image of another size than the output: two coloured rectangles on grey."""
    rng = np.random.RandomState(seed)
    image = np.full((*size, 3), 128, np.uint8)
    for _ in range(2):
        y, x = rng.randint(0, size[0] - 12), rng.randint(0, size[1] - 12)
        image[y : y + 12, x : x + 12] = rng.randint(0, 255, 3)
    return image


def make_pipe(conditions=("canny",), randomized=True):
    components = tiny_sd_components(seed=0)
    controlnet = CSCControlModel.from_unet(components["unet"], list(conditions), **SMALL)
    if randomized:
        randomize(controlnet, std=0.1)
    pipe = StableDiffusionCSCControlPipeline(controlnet=controlnet, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs) -> np.ndarray:
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    return pipe(
        ["a red circle", "a blue square"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type="np", **kwargs,
    ).images


@pytest.fixture(scope="module")
def pipe():
    return make_pipe(("canny", "color"))


@pytest.fixture(scope="module")
def base(pipe):
    return generate(pipe)


def manual(pipe, maps: dict, scales: dict) -> np.ndarray:
    """The same generation through a stock StableDiffusionPipeline with the tuners attached by hand."""
    stock = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"})
    stock.set_progress_bar_config(disable=True)
    with pipe.controlnet.attached(stock.unet, list(maps)):
        for name, image in maps.items():
            vistune.set_control(stock.unet, image, name=name)
            vistune.set_scale(stock.unet, scales[name], name=name)
        return generate(stock)


def test_identity_at_init_and_unet_left_stock():
    pipe = make_pipe(randomized=False)
    plain = generate(pipe)
    assert np.array_equal(generate(pipe, control_image=scene()), plain)
    assert vistune.list_tuners(pipe.unet) == {}


def test_pipeline_equals_tuners_attached_by_hand_with_preprocessing_resize_and_weights(pipe, base):
    image = scene()
    out = generate(pipe, control_image=[image, image], controlnet_conditioning_scale=[0.7, 0.4], control_scale=0.5)
    expected = manual(pipe, {"canny": canny(image, (32, 32)), "color": color(image, (32, 32))}, {"canny": 0.35, "color": 0.2})
    assert np.array_equal(out, expected)
    assert np.abs(out - base).max() > 1e-3
    assert vistune.list_tuners(pipe.unet) == {}
    assert pipe.controlnet.tuners["canny"].scale == 1.0  # the run-time weights do not stick


def test_one_condition_by_name_weight_zero_and_default_size(pipe, base):
    image = scene()
    only_color = generate(pipe, control_image=image, condition="color")
    assert np.array_equal(only_color, manual(pipe, {"color": color(image, (32, 32))}, {"color": 1.0}))
    both_color_only = generate(pipe, control_image=[image, image], controlnet_conditioning_scale=[0.0, 1.0])
    assert np.array_equal(both_color_only, only_color)
    assert np.array_equal(generate(pipe, control_image=[image, image], control_scale=0.0), base)
    big = pipe("a red circle", control_image=scene(size=(44, 37)), num_inference_steps=1, output_type="np").images
    assert big.shape == (1, 40, 32, 3)  # output size from the control image, rounded down to a multiple of 8


def test_control_guidance_window_limits_the_steps_with_control(pipe, base):
    image = scene()
    full = generate(pipe, control_image=[image, image])
    first_half = generate(pipe, control_image=[image, image], control_guidance_end=0.5)
    assert not np.array_equal(first_half, full) and not np.array_equal(first_half, base)
    seen = []
    generate(pipe, control_image=[image, image], callback_on_step_end=lambda p, i, t, kw: seen.append(i) or {})
    assert seen == [0, 1]  # the user's callback still runs


def test_grayscale_and_rgba_inputs_are_converted(pipe):
    rgb = Image.fromarray(scene())
    out = generate(pipe, control_image=[rgb, rgb])
    rgba = rgb.convert("RGBA")
    assert np.array_equal(generate(pipe, control_image=[rgba, rgba]), out)
    gray = rgb.convert("L")
    as_rgb = gray.convert("RGB")
    assert np.array_equal(generate(pipe, control_image=[gray, gray]), generate(pipe, control_image=[as_rgb, as_rgb]))


def test_prompt_batch_of_control_images_and_num_images_per_prompt(pipe):
    images = [scene(0), scene(1)]
    out = pipe(
        ["a red circle", "a blue square"], control_image=[np.stack(images), np.stack(images)], height=32, width=32,
        num_inference_steps=1, num_images_per_prompt=2, output_type="np", generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (4, 32, 32, 3) and np.isfinite(out).all()


def test_bad_input_errors(pipe):
    image = scene()
    with pytest.raises(ControlInputError, match=r"3 control images .* only 2 condition"):
        generate(pipe, control_image=[image, image, image])
    with pytest.raises(ControlInputError, match=r"'depth' does not exist.*loaded conditions: \['canny', 'color'\].*known"):
        generate(pipe, control_image=image, condition="depth")
    with pytest.raises(ControlInputError, match="weight"):
        generate(pipe, control_image=[image, image], controlnet_conditioning_scale=[1.0])
    with pytest.raises(ControlInputError, match="batch 3"):
        generate(pipe, control_image=[np.stack([image] * 3), image])
    with pytest.raises(ControlInputError, match="control_guidance"):
        generate(pipe, control_image=image, control_guidance_start=0.6, control_guidance_end=0.5)
    assert vistune.list_tuners(pipe.unet) == {}


def test_tuner_for_another_unet_layout_or_vae_is_a_clear_error():
    components = tiny_sd_components(seed=0)
    other = CSCControlModel.from_unet(tiny_unet(block_out_channels=(32, 32)), "canny", **SMALL)
    pipe = StableDiffusionCSCControlPipeline(controlnet=other, **components)
    with pytest.raises(BackboneMismatchError, match="skips"):
        generate(pipe, control_image=scene())
    assert vistune.list_tuners(pipe.unet) == {}
    wrong_vae = CSCControlModel.from_unet(components["unet"], "canny", encoder_width_ratio=0.5, condition_channels=32)
    pipe = StableDiffusionCSCControlPipeline(controlnet=wrong_vae, **components)
    with pytest.raises(ControlInputError, match="VAE factor of 8 .* has 2"):
        generate(pipe, control_image=scene())


def test_pipeline_folder_round_trips_including_custom_pipeline(pipe, tmp_path):
    image = scene()
    expected = generate(pipe, control_image=[image, image])
    pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe" / "controlnet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"
    ]
    loaded = StableDiffusionCSCControlPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    saved_state = pipe.controlnet.state_dict()
    assert all(torch.equal(v, saved_state[k]) for k, v in loaded.controlnet.state_dict().items())
    assert loaded.controlnet.state_dict().keys() == saved_state.keys()
    np.testing.assert_allclose(generate(loaded, control_image=[image, image]), expected, atol=1e-5)
    community = DiffusionPipeline.from_pretrained(
        tmp_path / "pipe", custom_pipeline=str(ROOT / "pipelines" / "csc_control"), trust_remote_code=True
    )
    community.set_progress_bar_config(disable=True)
    assert type(community).__name__ == "StableDiffusionCSCControlPipeline"
    assert community.controlnet.condition_names == ["canny", "color"]
    np.testing.assert_allclose(generate(community, control_image=[image, image]), expected, atol=1e-5)


def test_each_condition_saves_alone_and_combines_with_weights(pipe, tmp_path):
    image = scene()
    expected = generate(pipe, control_image=[image, image], controlnet_conditioning_scale=[0.8, 0.3])
    for name in ("canny", "color"):
        pipe.controlnet.save_condition(name, tmp_path / name, pipe.unet)
    assert vistune.list_tuners(pipe.unet) == {}
    # a condition folder is an ordinary vistune tuner: it loads onto a bare U-Net
    unet = tiny_unet(seed=0)
    assert vistune.load_tuners(unet, tmp_path / "canny") == ["canny"]
    assert isinstance(vistune.get_tuner(unet, "canny"), vistune.CSCTuner)
    combined = CSCControlModel.from_tuners(pipe.unet, [tmp_path / "canny", tmp_path / "color"])
    again = StableDiffusionCSCControlPipeline(
        controlnet=combined, **{k: v for k, v in pipe.components.items() if k != "controlnet"}
    )
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(again, control_image=[image, image], controlnet_conditioning_scale=[0.8, 0.3]), expected)
    with pytest.raises(BackboneMismatchError, match="layout"):
        CSCControlModel.from_tuners(tiny_unet(block_out_channels=(32, 32)), {"canny": tmp_path / "canny"})


def test_composes_with_a_style_sc_tuner_on_the_same_unet():
    pipe = make_pipe()
    image = scene()
    controlled = generate(pipe, control_image=image)
    style = vistune.attach(pipe.unet, SCTunerConfig(down_ratio=0.25), name="style", trainable=False)
    randomize(style, std=0.2)
    styled = generate(pipe)
    both = generate(pipe, control_image=image)
    assert not np.array_equal(both, styled) and not np.array_equal(both, controlled)
    assert list(vistune.list_tuners(pipe.unet)) == ["style"]


def test_from_unet_config_presets_and_errors():
    unet = tiny_unet(seed=0)
    model = CSCControlModel.from_unet(unet, {"edges": CSCTunerConfig(condition="canny", dense_kernel_size=1, **SMALL)})
    assert model.condition_names == ["edges"] and model.tuners["edges"].config.dense_kernel_size == 1
    with pytest.raises(vistune.TunerError, match="either config"):
        CSCControlModel.from_unet(unet, "canny", config=CSCTunerConfig(), vae_scale_factor=2)
    with pytest.raises(vistune.TunerError, match="at least one"):
        CSCControlModel.from_unet(unet, [])
