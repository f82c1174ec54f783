"""The watermark benchmark end to end on the shipped tiny SD with a tiny extractor and a few training steps."""

import json

import pytest

from vistune.bench import watermark as bench
from vistune.bench import watermark_pas as pas_bench

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
                              "--video_watermarked", str(tmp_path / "wm"), "--num_clips", "2", "--num_frames", "3",
                              "--output-dir", str(tmp_path / "results")])
    results = bench.run_from_args(args)
    video = results["video"]["per_folder"][str(tmp_path / "wm")]
    assert video["flicker_watermarked"] > 0 and results["video"]["flicker_source"] == 0  # static by ground truth
    assert video["temporal_loss"] is None and set(video["attacks"]) == set(bench.VIDEO_REPORT_ATTACKS)
    assert video["train_attacks"] == "none"
    from vistune.tuners.watermark.attacks import format_attack_spec, parse_attack_spec

    assert format_attack_spec(*parse_attack_spec("identity,brightness:4")) == "identity,brightness:4"
    assert format_attack_spec(["identity", "crop"]) == "identity,crop" and format_attack_spec([]) == "none"
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


def _pas_rows(curves: dict[float, list[tuple[float, float]]]) -> list[dict]:
    return [{"fraction": f, "noise": None if f == 0 else "absolute", "lambda_i": i, "psnr": psnr, "ssim": 0.9, "bit_acc_none": 1.0, "tpr_none": 1.0,
             "bit_acc_attacks": {a: acc for a in pas_bench.TARGET_ATTACKS}, "acc": acc}
            for f, points in curves.items() for i, (acc, psnr) in enumerate(points)]


def test_pas_bench_compares_curves_at_equal_bit_accuracy():
    import argparse

    parser = argparse.ArgumentParser()
    pas_bench.add_arguments(parser)
    args = parser.parse_args(["--fractions", "0,0.25", "--lambda_i", "1,2"])
    assert pas_bench.variants(args) == [(0.0, None), (0.25, "absolute"), (0.25, "relative")]
    assert pas_bench.run_dir(args, 0.25, "absolute", 2.0).name == "frac0.25-absolute-li2"
    assert pas_bench.run_dir(args, 0.0, None, 2.0).name == "frac0-li2"
    with pytest.raises(ValueError, match="pas_noise"):
        pas_bench.variants(parser.parse_args(["--pas_noise", "gaussian"]))
    whole = [(0.95, 30.0), (0.85, 34.0)]  # PSNR falls by 4 dB per 0.1 of bit accuracy
    assert pas_bench._interpolate([{"acc": a, "psnr": p} for a, p in whole], 0.9) == pytest.approx(32.0)
    assert pas_bench._interpolate([{"acc": a, "psnr": p} for a, p in whole], 0.97) is None  # no extrapolation
    table = pas_bench.format_table(_pas_rows({0.0: whole, 0.25: [(0.93, 31.8), (0.88, 33.5)]}), args)
    gains = [line for line in table.splitlines() if line.startswith("| PAS 0.25 (absolute) | 0.")]
    # PAS at 0.93: 31.8 vs 30.8 interpolated (+1.00); at 0.88: 33.5 vs 32.8 (+0.70); whole's points lie outside PAS's range
    assert [g.split("|")[-2].strip() for g in gains] == ["+0.70", "+1.00"]
    worse = pas_bench.format_table(_pas_rows({0.0: whole, 0.25: [(0.93, 30.0), (0.88, 32.0)]}), args)
    assert "| -0.80 |" in worse
    with pytest.raises(argparse.ArgumentTypeError):
        pas_bench._floats("0,x")


@pytest.mark.slow
def test_pas_bench_trains_missing_runs_and_evaluates(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    pas_bench.add_arguments(parser)
    args = parser.parse_args(["--runs_dir", str(tmp_path / "runs"), "--fractions", "0,0.5", "--lambda_i", "1",
                              "--pas_noise", "absolute",
                              "--max_train_steps", "2", "--num_train_images", "16", "--num_images", "2",
                              "--steps", "2", "--output-dir", str(tmp_path / "results")])
    rows = pas_bench.run_from_args(args)["rows"]
    assert [(r["fraction"], r["noise"], r["lambda_i"]) for r in rows] == [(0.0, None, 1.0), (0.5, "absolute", 1.0)]
    assert all(0 <= r["acc"] <= 1 and r["psnr"] > 20 for r in rows)
    report = json.loads((tmp_path / "runs" / "frac0.5-absolute-li1" / "train_report.json").read_text())
    assert len(report["frozen_layers"]) > 0 and report["args"]["pas_noise"] == "absolute"
    stamp = (tmp_path / "runs" / "frac0-li1" / "key.json").stat().st_mtime_ns
    pas_bench.run_from_args(args)  # finished runs are reused, not retrained
    assert (tmp_path / "runs" / "frac0-li1" / "key.json").stat().st_mtime_ns == stamp
    assert "| PAS 0.5 (absolute) | 1 |" in (tmp_path / "results" / "watermark_pas.md").read_text()
