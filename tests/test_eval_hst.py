"""scripts/eval_hst.py: summary statistics, issue-7 targets, the markdown table, --skip_training reuse, and one
tiny real run through scripts/train_hst.py."""

import json
import statistics

import pytest

from .conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("eval_hst")


METRIC = {"classify": "accuracy", "segment": "miou", "detect": "ap50"}
PARAMS = {"hst": 1000, "linear": 10, "lora": 100, "full": 5000}
# hand-made per-seed values (seeds 0, 1, 2)
VALUES = {
    ("classify", "hst"): [0.52, 0.585, 0.53],
    ("classify", "full"): [0.515, 0.59, 0.535],
    ("segment", "hst"): [0.43, 0.44, 0.42],
    ("segment", "linear"): [0.33, 0.45, 0.34],   # HST wins on the mean but loses seed 1
    ("segment", "lora"): [0.41, 0.41, 0.41],
    ("detect", "hst"): [0.30, 0.30, 0.30],
    ("detect", "linear"): [0.20, 0.20, 0.20],
    ("detect", "lora"): [0.50, 0.10, 0.40],      # mean 0.333 > HST 0.30: not met, 1/3 seeds
}


def hand_runs():
    return [{"task": t, "method": m, "steps": 5, "seed": s, "trainable_parameters": PARAMS[m], METRIC[t]: v,
             "lr": 0.002, "seconds": 1.5}
            for s in range(3) for (t, m), values in VALUES.items() for v in [values[s]]]


def test_summary_is_mean_and_sample_std_per_task_and_method(script):
    summary = script.summarize(hand_runs())
    assert [(s["task"], s["method"]) for s in summary] == list(VALUES)
    for s in summary:
        values = VALUES[(s["task"], s["method"])]
        assert s["metric"] == METRIC[s["task"]] and s["n"] == 3 and s["params"] == PARAMS[s["method"]]
        assert s["mean"] == pytest.approx(sum(values) / 3)
        assert s["std"] == pytest.approx(statistics.stdev(values))
    # the committed classify/hst row: 0.52, 0.585, 0.53 -> 0.545 ± 0.035 (ddof 1)
    assert summary[0]["mean"] == pytest.approx(0.545) and summary[0]["std"] == pytest.approx(0.035)
    one = script.summarize([hand_runs()[0]])
    assert one[0]["std"] == 0.0 and one[0]["n"] == 1


def test_targets_on_the_mean_with_per_seed_counts(script):
    runs = hand_runs()
    checks = {c["target"]: c for c in script.targets(runs, script.summarize(runs))}
    assert set(checks) == {"segment: HST > linear", "segment: HST > lora", "detect: HST > linear",
                           "detect: HST > lora", "classify: |HST - full| <= 2 points"}
    assert checks["segment: HST > linear"]["met"] and checks["segment: HST > linear"]["seed_wins"] == 2
    assert checks["segment: HST > lora"]["met"] and checks["segment: HST > lora"]["seed_wins"] == 3
    assert checks["detect: HST > linear"]["seed_wins"] == 3
    lora = checks["detect: HST > lora"]
    assert not lora["met"] and lora["seed_wins"] == 1 and lora["seeds"] == 3
    assert lora["difference"] == pytest.approx(0.30 - 1.0 / 3)
    classify = checks["classify: |HST - full| <= 2 points"]
    assert classify["met"] and classify["seed_wins"] == 3
    assert classify["difference"] == pytest.approx(0.545 - 0.5466666667)
    # a target is only reported when both methods ran
    only = [r for r in runs if r["method"] in ("hst", "linear")]
    assert [c["target"] for c in script.targets(only, script.summarize(only))] == [
        "segment: HST > linear", "detect: HST > linear"]


def test_markdown_has_the_table_per_seed_rows_and_targets(script):
    runs = hand_runs()
    protocol = {"steps": 5, "batch": 4, "lora_rank": 8}
    text = script.markdown(protocol, runs, script.summarize(runs))
    assert "| task (metric) | hst | full | linear | lora |" in text
    assert "| classify (accuracy) | 54.5 ± 3.5 (n=3, 1,000 p) | 54.7 ± 3.9 (n=3, 5,000 p) | — | — |" in text
    assert "| segment | linear | 1 | 45.0 | 10 | 2 |" in text
    assert sum(line.startswith(("| classify |", "| segment |", "| detect |")) for line in text.splitlines()) == 24
    assert "- detect: HST > lora: NOT met (difference -3.3 points; 1/3 seeds)" in text
    assert "- segment: HST > linear: met (difference +5.7 points; 2/3 seeds)" in text
    assert "- classify: |HST - full| <= 2 points: met (difference -0.2 points; 3/3 seeds)" in text


def test_train_command_carries_the_protocol(script):
    args = script.parse_args(["--detect_steps", "7", "--steps", "3"])
    command = script.train_command(args, "detect", "full", 2, script.run_dir("w", "detect", "full", 2))
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--max_train_steps"] == "7" and flags["--learning_rate"] == "0.0002" and flags["--seed"] == "2"
    assert flags["--train_batch_size"] == "16" and flags["--lr_warmup_steps"] == "10"
    assert flags["--num_train_images"] == "4000" and flags["--num_eval_images"] == "200"
    assert flags["--output_dir"].endswith("detect/full/seed-2")
    assert script.task_steps(args, "classify") == 3
    assert script.protocol_of(args)["steps"] == {"classify": 3, "segment": 3, "detect": 7}
    default = script.protocol_of(script.parse_args([]))
    assert default["steps"] == 120 and default["lr"] == {"hst": 0.002, "linear": 0.002, "lora": 0.002, "full": 0.0002}
    assert default["optimizer"] == "AdamW wd 5e-4, cosine, 10 warm-up steps, grad clip 1.0"
    assert default["eval"] == "200 held-out scenes (seed s + 1000003)"
    with pytest.raises(SystemExit):
        script.parse_args(["--seeds", "0", "0"])


def fake_run(work, task, method, seed, steps, value):
    out = work / task / method / f"seed-{seed}"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"task": task, "method": method, "steps": steps, "seed": seed,
                                                  "trainable_parameters": PARAMS[method], METRIC[task]: value}))
    (out / "eval_hst_run.json").write_text(json.dumps({"seconds": 12.0}))


def test_skip_training_reuses_metrics_json(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "train", lambda *a: pytest.fail("--skip_training must not train"))
    work, results = tmp_path / "work", tmp_path / "results"
    for seed, (h, lin) in enumerate([(0.6, 0.5), (0.7, 0.8)]):
        fake_run(work, "segment", "hst", seed, 9, h)
        fake_run(work, "segment", "linear", seed, 9, lin)
    argv = ["--tasks", "segment", "--methods", "hst", "linear", "--seeds", "0", "1", "--steps", "9",
            "--work_dir", str(work), "--output_dir", str(results), "--skip_training"]
    assert script.main(argv) == 0
    record = json.loads((results / "vit.quality.json").read_text())
    assert set(record) >= {"protocol", "runs", "summary"}
    assert [(r["method"], r["seed"], r["miou"], r["seconds"], r["lr"]) for r in record["runs"]] == [
        ("hst", 0, 0.6, 12.0, 0.002), ("linear", 0, 0.5, 12.0, 0.002),
        ("hst", 1, 0.7, 12.0, 0.002), ("linear", 1, 0.8, 12.0, 0.002)]
    assert record["summary"][0]["mean"] == pytest.approx(0.65)
    assert record["targets"][0]["seed_wins"] == 1
    assert "| segment (miou) | 65.0 ± 7.1 (n=2, 1,000 p) | 65.0 ± 21.2 (n=2, 10 p) |" in (
        results / "vit.quality.md").read_text()
    # a run trained with other settings is refused, not silently mixed in
    with pytest.raises(ValueError, match="expected"):
        script.main([*argv, "--steps", "10"])
    with pytest.raises(FileNotFoundError, match="missing"):
        script.main([*argv, "--seeds", "3"])


def test_tiny_end_to_end_run_matches_train_hst(script, tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--tasks", "classify", "--methods", "linear", "--seeds", "0", "--steps", "2", "--batch_size", "2",
            "--num_train_images", "8", "--num_eval_images", "4", "--work_dir", str(work),
            "--output_dir", str(results)]
    assert script.main(argv) == 0
    record = json.loads((results / "vit.quality.json").read_text())
    (run,) = record["runs"]
    metrics = json.loads((work / "classify" / "linear" / "seed-0" / "metrics.json").read_text())
    assert run["accuracy"] == metrics["accuracy"] and run["trainable_parameters"] == 3096 == metrics[
        "trainable_parameters"]
    assert run["seconds"] > 0 and run["lr"] == 0.002
    assert record["protocol"]["train"] == "8 shapes-world scenes (seed s)"
    # rerunning from the outputs gives the same record
    assert script.main([*argv, "--skip_training"]) == 0
    again = json.loads((results / "vit.quality.json").read_text())
    assert again["runs"] == record["runs"]
