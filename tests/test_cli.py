import json

import pytest
import torch

from vistune.cli import main
from vistune.sites import find_unet_skips
from vistune.testing import tiny_unet


def test_info_lists_registered_tuners(capsys):
    assert main(["info"]) == 0
    assert "sc_tuner (SCTunerConfig)" in capsys.readouterr().out


def test_demo_runs_on_the_shipped_model_and_reports_measured_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--steps", "100", "--style", "pastel", "--images-per-prompt", "2"]) == 0
    assert (out / "before.png").is_file() and (out / "after.png").is_file()
    report = (out / "report.md").read_text()
    assert "(8 prompts x 2 images," in report
    assert "assets/tiny-sd-shapes" in report and "'pastel' style statistic" in report
    assert "| the checker on real scenes of the same style through this VAE (plain / pastel) |" in report
    for check in ("(identity at init)", "scale 0 reproduces the base images exactly",
                  "saved tuner reloaded into a fresh pipeline reproduces the images exactly"):
        assert f"{check} | yes |" in report
    record = json.loads((out / "tuner" / "tuner_config.json").read_text())
    assert record["name"] == "pastel" and record["tuner_type"] == "sc_tuner"
    assert "caption fidelity" in capsys.readouterr().out
    channels = record["layout"]["skip_channels"]
    assert main(["info", str(out / "tuner")]) == 0
    assert record["config"]["target_skips"] == [-4, -3, -2, -1]  # the four shallowest skips, hidden width 4c
    expected = sum(8 * c * c + 5 * c for c in channels[-4:])  # Linear(c, 4c) + Linear(4c, c) per skip
    assert f"pastel [sc_tuner] {expected:,d} params" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--steps", "--images-per-prompt"])
def test_demo_rejects_counts_below_one_before_loading_anything(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", flag, "0"])
    assert exit_info.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err


def test_demo_without_the_shipped_model_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISTUNE_ASSETS", str(tmp_path / "nowhere"))
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 2
    assert "scripts/build_assets.py" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_sc_runs_each_method_in_a_subprocess_and_writes_results(tmp_path, capsys):
    assert main(["bench", "sc", "--config", "tiny", "--batch-sizes", "1", "--steps", "1", "--warmup", "0",
                 "--latent", "8", "--output-dir", str(tmp_path), "--name", "sc_tiny"]) == 0
    data = json.loads((tmp_path / "sc_tiny.json").read_text())
    assert data["meta"]["frozen_dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"full", "lora", "sc", "sc_shallow"}
    assert rows["sc"]["trainable_params"] == 25_088  # SC-Tuner on the tiny U-Net's six skips
    shallow = [s.channels for s in find_unet_skips(tiny_unet())[-4:]]  # hidden 4c: 4c*c + 4c + c*4c + c each
    assert rows["sc_shallow"]["trainable_params"] == sum(8 * c * c + 5 * c for c in shallow)
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in tiny_unet().parameters())
    assert rows["lora"]["memory_vs_lora"] == 1.0 and rows["sc"]["peak_memory_mb"] > 0
    assert "| sc | 1 | 25,088 |" in (tmp_path / "sc_tiny.md").read_text()
