import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from vistune import BackboneMismatchError
from vistune.sites import find_unet_skips, unet_skip_site
from vistune.testing import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

from .conftest import run_unet


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_sd15_layout_has_twelve_skips_in_decoder_order():
    skips = find_unet_skips(meta_unet(SD15_UNET_CONFIG))
    assert [s.channels for s in skips] == [1280] * 5 + [640] * 3 + [320] * 4
    assert [s.decoder_index for s in skips] == list(range(12))
    assert [s.encoder_index for s in skips] == list(range(11, -1, -1))  # deepest first
    downsample = [False, False, False, True, False, False, True, False, False, True, False, False]
    assert [s.downsample for s in reversed(skips)] == downsample  # encoder order, as SCEdit's _input_down_flag
    assert [s.stride for s in reversed(skips)] == [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8]


def test_sdxl_layout_has_nine_skips():
    skips = find_unet_skips(meta_unet(SDXL_UNET_CONFIG))
    assert [s.channels for s in skips] == [1280, 1280, 640, 640, 640, 320, 320, 320, 320]


def test_decoder_index_follows_the_order_resnets_read_skips(unet, inputs):
    """The k-th up-block resnet to run must read the skip with decoder index k."""
    skips = find_unet_skips(unet)
    encoder_outputs = []

    def capture_down(module, args, output):
        encoder_outputs.extend(output[1])

    reads = []

    def capture_resnet(module, args):
        reads.append(args[0])

    handles = [unet.conv_in.register_forward_hook(lambda m, a, out: encoder_outputs.append(out))]
    handles += [block.register_forward_hook(capture_down) for block in unet.down_blocks]
    handles += [r.register_forward_pre_hook(capture_resnet) for block in unet.up_blocks for r in block.resnets]
    run_unet(unet, inputs)
    for h in handles:
        h.remove()
    assert len(encoder_outputs) == len(skips) == len(reads)
    for k, read in enumerate(reads):
        skip = skips[k]
        assert read.shape[1] > skip.channels
        torch.testing.assert_close(read[:, -skip.channels :], encoder_outputs[skip.encoder_index], rtol=0, atol=0)


def test_site_hooks_exist_only_while_editors_are_registered(unet, inputs):
    base = run_unet(unet, inputs)
    site = unet_skip_site(unet)
    seen = []

    def editor(skip, x):
        seen.append(skip.decoder_index)
        return torch.ones_like(x) if skip.decoder_index == 0 else None

    site.add_editor(unet, "probe", editor)
    assert all(len(block._forward_pre_hooks) == 1 for block in unet.up_blocks)
    changed = run_unet(unet, inputs)
    assert sorted(seen) == list(range(6))
    assert not torch.equal(changed, base)
    with pytest.raises(KeyError):
        site.add_editor(unet, "probe", editor)
    site.remove_editor(unet, "probe")
    assert not hasattr(unet, "_vistune_unet_skip_site")
    assert all(len(block._forward_pre_hooks) == 0 for block in unet.up_blocks)
    assert torch.equal(run_unet(unet, inputs), base)


def test_unet2dmodel_positional_skips_are_found_and_edited():
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    skips = find_unet_skips(model)
    assert [s.channels for s in skips] == [64, 32, 32, 32]
    x = torch.randn(1, 3, 16, 16)
    base = model(x, 5).sample
    site = unet_skip_site(model)
    calls = []
    site.add_editor(model, "probe", lambda skip, t: calls.append(skip.decoder_index) or torch.zeros_like(t) + 0.5)
    assert not torch.equal(model(x, 5).sample, base)
    assert sorted(calls) == [0, 1, 2, 3]
    site.remove_editor(model, "probe")
    assert torch.equal(model(x, 5).sample, base)


@pytest.mark.parametrize("model", [torch.nn.Linear(3, 3), torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))])
def test_models_without_skips_get_a_clear_error(model):
    with pytest.raises(BackboneMismatchError, match="no U-Net skip connections"):
        find_unet_skips(model)
