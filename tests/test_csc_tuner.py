import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import vistune
from vistune.core.config import TunerConfig
from vistune.sites import find_unet_skips
from vistune.testing import SD15_UNET_CONFIG, tiny_unet
from vistune.tuners.csc_tuner import CSCTuner, CSCTunerConfig, get_control, set_control
from vistune.tuners.sc_tuner import SCTunerConfig

from .conftest import randomize, run_unet

PRESETS = Path(__file__).resolve().parents[1] / "tuners"
SMALL = dict(encoder_width_ratio=0.5, condition_channels=32)  # narrower encoder: fast tests, same maths


@pytest.fixture
def unet():
    """The tiny SD-layout U-Net at an 8x8 latent: 64x64 control images (VAE factor 8)."""
    return tiny_unet(seed=0, sample_size=8)


def control_image(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def skip_reads(unet, inputs):
    """The skip half of what every up-block resnet reads, in decoder order."""
    skips = find_unet_skips(unet)
    reads = []
    handles = [r.register_forward_pre_hook(lambda m, a: reads.append(a[0])) for b in unet.up_blocks for r in b.resnets]
    try:
        run_unet(unet, inputs)
    finally:
        for h in handles:
            h.remove()
    return [read[:, -skip.channels :] for read, skip in zip(reads, skips)]


def reference_features(tuner: CSCTuner, image: torch.Tensor) -> list[torch.Tensor]:
    """The condition features written out with F.conv2d: 7 convs with SiLU between, then the chain of skip convs."""
    h = image
    strides = tuner.config.encoder_strides()
    convs = [m for m in tuner.condition_encoder if isinstance(m, torch.nn.Conv2d)]
    for j, conv in enumerate(convs):
        if j:
            h = h * torch.sigmoid(h)
        h = F.conv2d(h, conv.weight, conv.bias, stride=strides[j], padding=1)
    features = []
    for conv in tuner.feature_convs:
        h = F.conv2d(h * torch.sigmoid(h), conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)
        features.append(h)
    return features


def reference_mlp(adapter, x):
    h = torch.einsum("oc,bchw->bohw", adapter.ln1.weight, x) + adapter.ln1.bias[None, :, None, None]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return torch.einsum("oc,bchw->bohw", adapter.ln2.weight, h) + adapter.ln2.bias[None, :, None, None]


@pytest.fixture(scope="module")
def meta_sd15():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


# -- sizes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, expected",
    [
        (CSCTunerConfig(), 99_111_760),
        (CSCTunerConfig(dense_kernel_size=1), 28_824_400),
        (TunerConfig.from_json((PRESETS / "sd15_csc_canny.json").read_text()), 99_111_760),
        (TunerConfig.from_json((PRESETS / "sd15_csc_canny_1x1.json").read_text()), 28_824_400),
    ],
)
def test_parameter_counts_at_sd15(meta_sd15, config, expected):
    unet = meta_sd15
    tuner = vistune.attach(unet, config, name="canny")
    assert isinstance(tuner, CSCTuner)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(tuner) == expected
    assert sum(p.numel() for p in vistune.trainable_parameters(unet)) == expected
    assert count(tuner.condition_encoder) == 348_880
    assert count(tuner.skips) == 19_680_000
    assert count(tuner.feature_convs) == expected - 348_880 - 19_680_000
    vistune.detach(unet)


def test_defaults_are_the_official_widths_and_presets_name_canny():
    config = CSCTunerConfig()
    assert config.encoder_widths() == [16, 16, 32, 32, 96, 96, 256]
    assert config.encoder_strides() == [1, 1, 2, 1, 2, 1, 2]
    assert (config.dense_kernel_size, config.down_ratio, config.vae_scale_factor) == (3, 1.0, 8)
    for name, kernel in [("sd15_csc_canny.json", 3), ("sd15_csc_canny_1x1.json", 1)]:
        preset = TunerConfig.from_json((PRESETS / name).read_text())
        assert isinstance(preset, CSCTunerConfig) and preset.condition == "canny"
        assert preset.dense_kernel_size == kernel
        assert TunerConfig.from_json(preset.to_json()) == preset
    assert CSCTunerConfig(encoder_width_ratio=2.0, condition_channels=320).encoder_widths() == [32, 32, 64, 64, 192, 192, 320]
    assert CSCTunerConfig(vae_scale_factor=2).encoder_strides() == [1, 1, 2, 1, 1, 1, 1]
    for bad in [dict(dense_kernel_size=5), dict(vae_scale_factor=6), dict(encoder_width_ratio=0), dict(down_ratio=-1)]:
        with pytest.raises(vistune.TunerError):
            CSCTunerConfig(**bad)


def test_features_have_the_exact_shape_of_each_encoder_skip(unet, inputs):
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL))
    captured = []
    handles = [unet.conv_in.register_forward_hook(lambda m, a, out: captured.append(out) and None)]
    handles += [b.register_forward_hook(lambda m, a, out: captured.extend(out[1])) for b in unet.down_blocks]
    run_unet(unet, inputs)
    for h in handles:
        h.remove()
    encoder_shapes = [t.shape for t in captured]
    features = tuner.condition_features(control_image())
    assert [f.shape for f in features] == encoder_shapes


# -- maths ---------------------------------------------------------------------------------------------------------


def test_identity_at_init_is_bit_exact(unet, inputs):
    base = run_unet(unet, inputs)
    vistune.attach(unet, CSCTunerConfig())
    assert torch.equal(run_unet(unet, inputs), base)  # no control image: nothing added
    set_control(unet, control_image())
    assert torch.equal(run_unet(unet, inputs), base)  # zero convs and zero Linear_up: still the identity


def test_each_skip_is_x_plus_scale_times_c_plus_mlp_of_x_plus_c(unet, inputs):
    base = skip_reads(unet, inputs)
    tuner = vistune.attach(unet, CSCTunerConfig(encoder_width_ratio=0.5, condition_channels=24, down_ratio=0.5, scale=0.7))
    randomize(tuner, seed=2, std=0.05)
    image = control_image()
    set_control(unet, image)
    tuned = skip_reads(unet, inputs)
    features = reference_features(tuner, image)
    skips = find_unet_skips(unet)
    for skip, x, out in zip(skips, base, tuned):
        c = features[skip.encoder_index]
        ctrl = c + reference_mlp(tuner.skips[str(skip.decoder_index)], x + c)
        torch.testing.assert_close(out, x + 0.7 * ctrl, rtol=1e-5, atol=1e-5)
        assert (out - x).abs().max() > 1e-3  # every skip is actually steered


def test_scale_zero_is_exactly_the_base_and_clearing_the_image_too(unet, inputs):
    base = run_unet(unet, inputs)
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL))
    randomize(tuner)
    set_control(unet, control_image())
    full = run_unet(unet, inputs)
    assert not torch.allclose(full, base)
    vistune.set_scale(unet, 0.0)
    assert torch.equal(run_unet(unet, inputs), base)
    vistune.set_scale(unet, 1.0)
    assert torch.equal(run_unet(unet, inputs), full)
    with vistune.disabled(unet):
        assert torch.equal(run_unet(unet, inputs), base)
    set_control(unet, None)
    assert get_control(unet) is None
    assert torch.equal(run_unet(unet, inputs), base)


def test_two_conditions_add_with_their_weights(unet, inputs):
    base = skip_reads(unet, inputs)
    images = {"canny": control_image(seed=1), "depth": control_image(seed=2)}
    deltas = {}
    for seed, name in enumerate(images):
        tuner = vistune.attach(unet, CSCTunerConfig(**SMALL), name=name)
        randomize(tuner, seed=seed + 5, std=0.05)
        set_control(unet, images[name], name=name)
        deltas[name] = [t - x for t, x in zip(skip_reads(unet, inputs), base)]
        vistune.set_scale(unet, 0.0, name=name)
    vistune.set_scale(unet, 0.6, name="canny")
    vistune.set_scale(unet, 0.3, name="depth")
    both = skip_reads(unet, inputs)
    for m, (x, out) in enumerate(zip(base, both)):
        expected = x + 0.6 * deltas["canny"][m] + 0.3 * deltas["depth"][m]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_composes_with_an_sc_tuner_on_the_same_unet(unet, inputs):
    base = skip_reads(unet, inputs)
    style = vistune.attach(unet, SCTunerConfig(), name="style")
    randomize(style, seed=3, std=0.05)
    sc_only = skip_reads(unet, inputs)
    control = vistune.attach(unet, CSCTunerConfig(**SMALL), name="canny")
    randomize(control, seed=4, std=0.05)
    image = control_image()
    set_control(unet, image)  # the only CSC-Tuner: no name needed
    both = skip_reads(unet, inputs)
    features = reference_features(control, image)
    for skip, x, with_sc, out in zip(find_unet_skips(unet), base, sc_only, both):
        c = features[skip.encoder_index]
        csc_delta = c + reference_mlp(control.skips[str(skip.decoder_index)], x + c)
        torch.testing.assert_close(out, with_sc + csc_delta, rtol=1e-5, atol=1e-5)
    vistune.detach(unet, "canny")
    assert all(torch.equal(a, b) for a, b in zip(skip_reads(unet, inputs), sc_only))


def test_batch_one_broadcasts_and_guidance_doubles_the_image_batch(unet, inputs):
    sample, timestep, context = inputs
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL))
    randomize(tuner, std=0.05)
    image = control_image(batch=2)
    set_control(unet, image)
    paired = run_unet(unet, inputs)
    doubled = (torch.cat([sample, sample]), torch.cat([timestep, timestep]), torch.cat([context, context]))
    out = run_unet(unet, doubled)  # classifier-free guidance: U-Net batch 4, image batch 2
    torch.testing.assert_close(out, torch.cat([paired, paired]), rtol=1e-5, atol=1e-5)
    set_control(unet, image[:1])
    broadcast = run_unet(unet, inputs)
    set_control(unet, image[:1].repeat(2, 1, 1, 1))
    torch.testing.assert_close(broadcast, run_unet(unet, inputs), rtol=1e-5, atol=1e-5)


def test_features_are_computed_once_per_call_and_cached_only_without_grad(unet, inputs):
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL))
    calls = []
    tuner.condition_encoder.register_forward_hook(lambda m, a, out: calls.append(1))
    set_control(unet, control_image())
    run_unet(unet, inputs)
    assert len(calls) == 1  # one encoder pass for all six skips
    run_unet(unet, inputs)
    assert len(calls) == 1  # sampling: cached across calls
    set_control(unet, control_image(seed=3))
    run_unet(unet, inputs)
    assert len(calls) == 2  # a new image invalidates
    with torch.no_grad():
        tuner.feature_convs[0].bias.add_(0.1)  # weights changed in place (an optimizer step, load_state_dict)
    run_unet(unet, inputs)
    assert len(calls) == 3
    sample, timestep, context = inputs
    for _ in range(2):  # training: recomputed every call, since the weights change
        unet(sample, timestep, encoder_hidden_states=context).sample.mean().backward()
    assert len(calls) == 5
    assert tuner.features is None  # released after each call


def test_training_changes_only_csc_parameters_and_reduces_the_loss(unet, inputs):
    sample, timestep, context = inputs
    image = control_image()
    teacher = vistune.attach(unet, CSCTunerConfig(**SMALL), name="teacher")
    randomize(teacher, seed=7, std=0.05)
    set_control(unet, image, name="teacher")
    target = run_unet(unet, inputs)
    vistune.detach(unet, "teacher")
    backbone = {n: p.detach().clone() for n, p in unet.named_parameters()}
    student = vistune.attach(unet, CSCTunerConfig(**SMALL), name="student")
    set_control(unet, image, name="student")
    assert {id(p) for p in vistune.trainable_parameters(unet)} == {id(p) for p in student.parameters()}
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    optimizer = torch.optim.AdamW(vistune.trainable_parameters(unet), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = F.mse_loss(unet(sample, timestep, encoder_hidden_states=context).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    for name, param in unet.named_parameters():
        if not name.startswith("vistune_tuners."):
            assert param.grad is None and torch.equal(param, backbone[name]), name
    unchanged = [n for n, p in student.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []  # the encoder, every zero conv and every MLP trained


def test_pixel_space_unet2dmodel_with_vae_factor_one():
    """UNet2DModel passes skips positionally; a pixel-space U-Net takes control images at its own size."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    sample, timestep = torch.randn(2, 3, 8, 8), torch.tensor([3, 300])
    with torch.no_grad():
        base = unet(sample, timestep).sample
        tuner = vistune.attach(unet, CSCTunerConfig(**SMALL, vae_scale_factor=1))
        set_control(unet, control_image(size=8))
        assert torch.equal(unet(sample, timestep).sample, base)
        randomize(tuner, std=0.05)
        assert not torch.allclose(unet(sample, timestep).sample, base)
        set_control(unet, control_image(size=16))
        with pytest.raises(vistune.TunerError, match=r"16x16.*8x8 latent.*8x8 control images \(vae_scale_factor 1\)"):
            unet(sample, timestep)


# -- lifecycle -----------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path, unet, inputs):
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL, condition="canny", scale=0.8), name="canny")
    randomize(tuner, std=0.05)
    image = control_image()
    set_control(unet, image)
    expected = run_unet(unet, inputs)
    vistune.save_tuners(unet, tmp_path / "canny")
    record = json.loads((tmp_path / "canny" / vistune.CONFIG_NAME).read_text())
    assert record["layout"]["skip_downsample"] == [False, False, False, True, False, False]
    fresh = copy.deepcopy(unet)
    vistune.detach(fresh)
    assert vistune.load_tuners(fresh, tmp_path / "canny") == ["canny"]
    loaded = vistune.get_tuner(fresh, "canny")
    assert loaded.config == tuner.config and loaded.control is None
    set_control(fresh, image)
    assert torch.equal(run_unet(fresh, inputs), expected)


def test_detach_restores_the_unet_and_removes_its_hooks(unet, inputs):
    base = run_unet(unet, inputs)
    hooks_before = (dict(unet._forward_pre_hooks), dict(unet._forward_hooks))
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL))
    randomize(tuner)
    set_control(unet, control_image())
    assert not torch.equal(run_unet(unet, inputs), base)
    vistune.detach(unet)
    assert (dict(unet._forward_pre_hooks), dict(unet._forward_hooks)) == hooks_before
    assert torch.equal(run_unet(unet, inputs), base)


def test_a_deepcopy_carries_its_own_control(unet, inputs):
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL))
    randomize(tuner, std=0.05)
    set_control(unet, control_image(seed=1))
    twin = copy.deepcopy(unet)
    set_control(twin, control_image(seed=2))
    assert not torch.equal(run_unet(unet, inputs), run_unet(twin, inputs))
    set_control(twin, control_image(seed=1))
    assert torch.equal(run_unet(unet, inputs), run_unet(twin, inputs))


# -- bad input -----------------------------------------------------------------------------------------------------


def test_wrong_control_size_names_both_sizes_and_changes_nothing(unet, inputs):
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL))
    randomize(tuner, std=0.05)
    set_control(unet, control_image())
    good = run_unet(unet, inputs)
    set_control(unet, control_image(size=32))
    with pytest.raises(vistune.TunerError, match=r"32x32.*8x8 latent.*64x64"):
        run_unet(unet, inputs)
    assert tuner.features is None
    with pytest.raises(vistune.TunerError, match="multiple of the VAE factor 8"):
        set_control(unet, torch.rand(1, 3, 100, 100))
    assert get_control(unet).shape[-1] == 32  # the failed call kept the previous image
    set_control(unet, control_image())
    assert torch.equal(run_unet(unet, inputs), good)


def test_wrong_control_batch_is_refused(unet, inputs):
    vistune.attach(unet, CSCTunerConfig(**SMALL))
    set_control(unet, control_image(batch=3))
    with pytest.raises(vistune.TunerError, match="batch 3 but the U-Net is called with batch 2"):
        run_unet(unet, inputs)


def test_bad_control_images_are_refused_and_grey_or_rgba_converted(unet, inputs):
    tuner = vistune.attach(unet, CSCTunerConfig(**SMALL))
    randomize(tuner, std=0.05)
    with pytest.raises(vistune.TunerError, match=r"in \[0, 1\]"):
        set_control(unet, control_image() * 2 - 1)
    with pytest.raises(vistune.TunerError, match="channels"):
        set_control(unet, torch.rand(2, 2, 64, 64))
    with pytest.raises(vistune.TunerError, match="dtype"):
        set_control(unet, torch.ones(2, 3, 64, 64, dtype=torch.int64))
    assert get_control(unet) is None
    grey = torch.rand(2, 1, 64, 64)
    set_control(unet, grey)
    from_grey = run_unet(unet, inputs)
    set_control(unet, torch.cat([grey.repeat(1, 3, 1, 1), torch.ones(2, 1, 64, 64)], dim=1))  # RGBA
    assert torch.equal(run_unet(unet, inputs), from_grey)
    set_control(unet, (grey.repeat(1, 3, 1, 1) * 255).round().to(torch.uint8))  # uint8 is scaled by 1/255
    torch.testing.assert_close(run_unet(unet, inputs), from_grey, atol=1e-2, rtol=0)


def test_set_control_needs_a_csc_tuner(unet):
    with pytest.raises(vistune.TunerError, match="no CSC-Tuner"):
        set_control(unet, control_image())
    vistune.attach(unet, SCTunerConfig(), name="style")
    with pytest.raises(vistune.TunerError, match="SCTuner, not a CSC-Tuner"):
        set_control(unet, control_image(), name="style")
    vistune.attach(unet, CSCTunerConfig(**SMALL), name="a")
    vistune.attach(unet, CSCTunerConfig(**SMALL), name="b")
    with pytest.raises(vistune.TunerError, match=r"several CSC-Tuners.*\['a', 'b'\]"):
        set_control(unet, control_image())
    with pytest.raises(vistune.TunerError, match="no tuner named 'c'"):
        set_control(unet, control_image(), name="c")


def test_a_tuner_saved_for_another_layout_is_refused(tmp_path, unet):
    vistune.attach(unet, CSCTunerConfig(**SMALL))
    vistune.save_tuners(unet, tmp_path / "c")
    other = tiny_unet(block_out_channels=(32, 48))
    with pytest.raises(vistune.BackboneMismatchError, match="another UNet2DConditionModel layout"):
        vistune.load_tuners(other, tmp_path / "c")
    assert vistune.list_tuners(other) == {}
