import json

from vistune.cli import main


def test_info_lists_registered_tuners(capsys):
    assert main(["info"]) == 0
    assert "sc_tuner (SCTunerConfig)" in capsys.readouterr().out


def test_demo_runs_and_reports_measured_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--steps", "30"]) == 0
    assert (out / "before.png").is_file() and (out / "after.png").is_file()
    report = (out / "report.md").read_text()
    assert "randomly initialised" in report and "| saved tuner reloaded into a fresh pipeline reproduces the images exactly | yes |" in report
    record = json.loads((out / "tuner" / "tuner_config.json").read_text())
    assert record["name"] == "stripes" and record["tuner_type"] == "sc_tuner"
    assert "no pretrained model ships yet" in capsys.readouterr().out
    assert main(["info", str(out / "tuner")]) == 0
    assert "stripes [sc_tuner] 25,088 params" in capsys.readouterr().out
