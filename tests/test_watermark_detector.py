"""Watermark keys, the extractor (whitening, save/load, input rule), WatermarkDetector and `vistune detect`."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.core.errors import CheckpointError
from vistune.tuners.watermark import (
    ExtractorConfig, HiddenEncoder, HiddenExtractor, WatermarkDetector, WatermarkKey, load_extractor, load_image,
    match_threshold, save_extractor, whiten,
)
from vistune.tuners.watermark import cli


def test_threshold_and_p_value_follow_the_binomial_tail():
    assert match_threshold(48, 1e-6) == 41
    assert match_threshold(48, 1e-10) == 45
    tail = sum(math.comb(48, k) for k in range(41, 49)) / 2**48
    assert abs(tail - 3.1e-7) < 0.05e-7
    with pytest.raises(ValueError):
        match_threshold(48, 0)


def test_key_round_trip_and_bad_files(tmp_path):
    key = WatermarkKey.random(48, seed=1)
    assert key == WatermarkKey.random(48, seed=1) and key.num_bits == 48
    path = key.save(tmp_path / "key.json")
    assert WatermarkKey.load(path, num_bits=48) == key
    with pytest.raises(ValueError, match="32 bits"):
        WatermarkKey.load(path, num_bits=32)
    bad = tmp_path / "bad.json"
    bad.write_text('{"bits": "0102"}')
    with pytest.raises(ValueError, match="0/1"):
        WatermarkKey.load(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="JSON"):
        WatermarkKey.load(bad)
    with pytest.raises(FileNotFoundError):
        WatermarkKey.load(tmp_path / "missing.json")
    with pytest.raises(ValueError):
        WatermarkKey((0, 2))


def extractor(bits=48, seed=0):
    torch.manual_seed(seed)
    return HiddenExtractor(ExtractorConfig(num_bits=bits, channels=8, depth=2)).eval()


def test_whitening_centres_and_decorrelates():
    ext = extractor(bits=8)
    x = torch.rand(400, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whiten(ext, x)
    with torch.no_grad():
        y = ext(x).double()
    torch.testing.assert_close(y.mean(0), torch.zeros(8, dtype=torch.float64), atol=5e-3, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(8, dtype=torch.float64), atol=2e-2, rtol=0)


def test_extractor_input_rule_and_save_load(tmp_path):
    ext = extractor()
    with pytest.raises(ValueError, match="smaller than the extractor's minimum"):
        ext(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="3 channels"):
        ext(torch.rand(1, 1, 32, 32))
    with pytest.raises(TypeError):
        ext(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert ext(torch.rand(2, 3, 13, 29)).shape == (2, 48)  # any size above the minimum
    whiten(ext, torch.rand(100, 3, 16, 16))
    save_extractor(ext, tmp_path / "ext")
    back = load_extractor(tmp_path / "ext")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ext(x))
    with pytest.raises(CheckpointError):
        load_extractor(tmp_path)


def test_encoder_checks_message_shape():
    enc = HiddenEncoder(num_bits=8, channels=8, depth=1, scaling=0.05)
    x = torch.rand(2, 3, 16, 16)
    xw = enc(x, torch.ones(2, 8))
    assert xw.shape == x.shape and (xw - x).abs().max() <= 0.05 + 1e-6
    with pytest.raises(ValueError, match="bits of shape"):
        enc(x, torch.ones(2, 7))


def constant_extractor(key: WatermarkKey, flip: int = 0) -> HiddenExtractor:
    """An extractor that reads ``key`` with its first ``flip`` bits wrong from any image."""
    ext = extractor(bits=key.num_bits)
    with torch.no_grad():
        ext.linear.weight.zero_()
        signs = key.tensor() * 2 - 1
        signs[:flip] *= -1
        ext.linear.bias.copy_(signs)
    return ext


def test_detector_decides_at_the_fpr_threshold():
    key = WatermarkKey.random(48, seed=2)
    x = torch.rand(2, 3, 32, 32)
    for flip, detected in [(0, True), (7, True), (8, False)]:
        result = WatermarkDetector(key, constant_extractor(key, flip)).detect(x)[0]
        assert result.matches == 48 - flip and result.detected is detected
        assert result.p_value == pytest.approx(sum(math.comb(48, k) for k in range(48 - flip, 49)) / 2**48)
    with pytest.raises(ValueError, match="32 bits but the extractor reads 48"):
        WatermarkDetector(WatermarkKey.random(32, seed=0), constant_extractor(key))


def test_video_detection_votes_over_frames():
    key = WatermarkKey.random(48, seed=2)
    detector = WatermarkDetector(key, constant_extractor(key, flip=10))
    frames = torch.rand(4, 3, 32, 32)
    assert detector.detect_video(frames).matches == 38
    with pytest.raises(ValueError, match="at least 2 frames"):
        detector.detect_video(frames[:1])


def save_png(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


def test_load_image_refuses_grayscale_and_transparency(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert torch.equal(load_image(save_png(tmp_path / "a.png", rgb)), torch.from_numpy(rgb).permute(2, 0, 1) / 255)
    with pytest.raises(ValueError, match="grayscale"):
        load_image(save_png(tmp_path / "g.png", rgb[..., 0]))
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 255, np.uint8)], -1)
    assert load_image(save_png(tmp_path / "o.png", rgba)).shape == (3, 16, 16)
    rgba[0, 0, 3] = 10
    with pytest.raises(ValueError, match="transparent"):
        load_image(save_png(tmp_path / "t.png", rgba))
    (tmp_path / "junk.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "junk.png")


def test_detect_cli(tmp_path, capsys):
    key = WatermarkKey.random(48, seed=4)
    save_extractor(constant_extractor(key), tmp_path / "ext")
    key.save(tmp_path / "key.json")
    WatermarkKey.random(32, seed=0).save(tmp_path / "key32.json")
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a, b = save_png(tmp_path / "a.png", rgb), save_png(tmp_path / "b.png", rgb)
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    run = lambda *argv: cli.run(parser.parse_args([*map(str, argv), "--extractor", str(tmp_path / "ext")]))
    assert run(a, b, "--key", tmp_path / "key.json", "--json") == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["matches"] for l in lines] == [48, 48] and all(l["detected"] for l in lines)
    assert run(a, b, "--key", tmp_path / "key.json", "--video") == 0
    assert "WATERMARKED" in capsys.readouterr().out
    assert run(a, "--key", tmp_path / "key32.json") == 2
    assert "32-bit key" in capsys.readouterr().err
    tiny = save_png(tmp_path / "tiny.png", rgb[:4, :4])
    assert run(tiny, "--key", tmp_path / "key.json") == 2
    assert "minimum" in capsys.readouterr().err
    save_extractor(constant_extractor(WatermarkKey(tuple(1 - b for b in key.bits))), tmp_path / "ext")
    assert run(a, "--key", tmp_path / "key.json") == 1
    assert "not detected" in capsys.readouterr().out


def test_flatten_head_resizes_to_its_input_size():
    torch.manual_seed(0)
    ext = HiddenExtractor(ExtractorConfig(num_bits=8, channels=8, depth=3, head="flatten", input_size=16)).eval()
    x = torch.rand(2, 3, 32, 32)
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(ext(x), ext(small))
        assert ext(torch.rand(1, 3, 9, 40)).shape == (1, 8)
    with pytest.raises(ValueError, match="minimum"):
        ext(torch.rand(1, 3, 7, 32))
    with pytest.raises(ValueError, match="multiple of 8"):
        ExtractorConfig(head="flatten", input_size=20)
    with pytest.raises(ValueError, match="head"):
        ExtractorConfig(head="mean")


def test_train_watermark_extractor_script_resumes_exactly(tmp_path):
    from .conftest import load_script

    script = load_script("train_watermark_extractor")
    common = ["--max_train_steps", "2", "--num_train_images", "32", "--num_whitening_images", "64", "--seed", "3",
              "--channels", "8", "--encoder_channels", "8", "--train_batch_size", "4", "--checkpointing_steps", "1"]
    assert script.main(["--output_dir", str(tmp_path / "a"), *common]) == 0
    (tmp_path / "b").mkdir()
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")
    assert script.main(["--output_dir", str(tmp_path / "b"), *common, "--resume_from_checkpoint", "latest"]) == 0
    a, b = load_extractor(tmp_path / "a"), load_extractor(tmp_path / "b")
    assert a.config.head == "flatten" and a.num_bits == 48
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)
    assert (tmp_path / "a" / "encoder.safetensors").is_file()
    with pytest.raises(SystemExit):
        script.main(["--output_dir", str(tmp_path / "c"), "--num_whitening_images", "10"])


def test_shipped_extractor_is_whitened_and_small():
    from vistune.assets import asset_path, load_tiny_sd
    from vistune.tuners.watermark.data import clean_images

    folder = asset_path("watermark-extractor")
    assert sum(f.stat().st_size for f in folder.iterdir()) < 2 * 2**20
    ext = load_extractor()
    assert ext.num_bits == 48 and not ext.training
    x = clean_images(120, seed=777, size=32, vae=load_tiny_sd().vae)  # unseen, unwatermarked
    detector = WatermarkDetector(WatermarkKey.random(48, seed=0), ext)
    bits = (detector.logits(x) > 0).float()
    assert 0.3 < bits.mean() < 0.7 and bits.mean(0).min() > 0.2 and bits.mean(0).max() < 0.8
    keys = [WatermarkKey.random(48, seed=s).tensor() for s in range(10)]
    assert max(int((bits == k).sum(1).max()) for k in keys) < detector.threshold  # no false positive


def test_clean_images_of_any_count():
    from vistune.assets import load_tiny_sd
    from vistune.tuners.watermark.data import clean_images

    vae = load_tiny_sd().vae
    assert clean_images(0, vae=vae).shape == (0, 3, 32, 32)  # the benchmark asks for none when it has enough
    one, three = clean_images(1, seed=3, vae=vae), clean_images(3, seed=3, vae=vae)
    torch.testing.assert_close(one, three[:1])  # item i depends on (seed, i) only; even items are raw scenes
    assert not torch.equal(three[1], clean_images(3, seed=3)[1])  # odd items are VAE reconstructions
    with pytest.raises(ValueError, match="count must be >= 0"):
        clean_images(-1)


class PatchReader(HiddenExtractor):
    """A 'flatten' extractor that reads ``key`` when the top-left pixel is at least mid-grey and its complement
    when it is dark: a stand-in whose readings differ between a dark crop and the same crop on a grey canvas."""

    def __init__(self, key: WatermarkKey):
        super().__init__(ExtractorConfig(num_bits=key.num_bits, channels=8, depth=3, head="flatten", input_size=16))
        self.signs = key.tensor() * 2 - 1

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        bright = (x[:, :, 0, 0].mean(1) > 0.4).float()[:, None] * 2 - 1
        return bright * self.signs


def test_crops_are_read_twice_with_a_bonferroni_correction():
    from vistune.tuners.watermark.attacks import CANVAS_FILL, center_crop

    key = WatermarkKey.random(48, seed=3)
    detector = WatermarkDetector(key, PatchReader(key))
    x = torch.zeros(2, 3, 16, 16)
    x[:, :, 4:12, 4:12] = 1.0  # a bright centre; the corner of the image itself is dark
    crop = center_crop(x, 0.25)  # 8x8, all bright
    full, = detector.readings(x)
    assert torch.equal(full, x)
    as_is, on_canvas = detector.readings(crop)
    assert torch.equal(as_is, crop)
    assert torch.equal(on_canvas[..., 4:12, 4:12], crop) and (on_canvas[..., :4, :] == CANVAS_FILL).all()
    result = detector.detect(crop)[0]
    assert result.readings == 2 and result.matches == 48 and result.detected
    assert result.threshold == match_threshold(48, 1e-6 / 2)
    assert result.p_value == pytest.approx(2 / 2**48)
    # a dark crop: read as it is, the complement (0 matches); on the canvas its corner is grey, the key (48)
    dark = 1 - crop
    assert detector.detect(dark)[0].matches == 48 and detector.detect_video(dark).matches == 48
    detector_one = WatermarkDetector(key, PatchReader(key), output_size=0)
    assert detector_one.detect(dark)[0].matches == 0 and detector_one.detect(dark)[0].readings == 1
    # a full-size image is read once, as it is (its corner is dark)
    assert detector.detect(x)[0].readings == 1 and detector.detect(x)[0].matches == 0
    # one reading where a crop cannot be told from a resize: 'pool' heads, larger images, output_size=0
    assert len(detector_one.readings(crop)) == 1
    assert len(detector.readings(torch.rand(1, 3, 20, 12))) == 1
    assert len(WatermarkDetector(key, constant_extractor(key)).readings(crop)) == 1
    with pytest.raises(ValueError, match="output_size"):
        WatermarkDetector(key, PatchReader(key), output_size=-1)


def test_best_reading_is_chosen_per_image():
    key = WatermarkKey.random(8, seed=0)
    detector = WatermarkDetector(key, constant_extractor(key))
    k = key.tensor()
    first = torch.stack([k, 1 - k])
    second = torch.stack([1 - k, k])
    assert torch.equal(detector._best([first, second]), torch.stack([k, k]))
