"""The watermark benchmark end to end on the shipped tiny SD with a tiny extractor and a few training steps."""

import json

import pytest

from vistune.bench import watermark as bench

from .conftest import load_script


@pytest.mark.slow
def test_bench_watermark_runs_and_writes_results(tmp_path):
    load_script("train_watermark_extractor").main([
        "--output_dir", str(tmp_path / "ext"), "--max_train_steps", "3", "--num_train_images", "64",
        "--num_whitening_images", "64", "--seed", "0", "--channels", "16"])
    assert load_script("train_watermark").main([
        "--pretrained_model_name_or_path", "assets/tiny-sd-shapes", "--extractor", str(tmp_path / "ext"),
        "--output_dir", str(tmp_path / "wm"), "--max_train_steps", "2", "--num_train_images", "16", "--seed", "0"]) == 0
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--watermarked", str(tmp_path / "wm"), "--extractor", str(tmp_path / "ext"),
                              "--num_images", "3", "--num_clean", "60", "--steps", "2", "--timing_images", "2",
                              "--output-dir", str(tmp_path / "results")])
    results = bench.run_from_args(args)
    entry = results["per_folder"][str(tmp_path / "wm")]
    assert set(entry["attacks"]) == set(bench.REPORT_ATTACKS) and results["num_clean"] == 60
    assert 0 <= entry["attacks"]["none"]["bit_acc"] <= 1 and entry["psnr"] > 20
    assert set(results["timing_s_per_image"]) == {"base", "watermarked_decoder", "base_plus_posthoc_hidden"}
    assert set(results["decode_ms_per_image"]) == set(results["timing_s_per_image"])
    assert all(v > 0 for v in results["decode_ms_per_image"].values())
    saved = json.loads((tmp_path / "results" / "watermark.json").read_text())
    assert saved["rows"][0]["num_images"] == 3
    assert "| none |" in (tmp_path / "results" / "watermark.md").read_text()
    assert "| latents -> image |" in (tmp_path / "results" / "watermark.md").read_text()
    with pytest.raises(FileNotFoundError, match="not an output of scripts/train_watermark.py"):
        bench.run_from_args(parser.parse_args(["--watermarked", str(tmp_path)]))
