import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vistune.bench import adapters as bench

from .conftest import load_script


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_schedule_and_batches():
    lrs = [bench.lr_at(s, 20, 1.0) for s in range(20)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # 2 warm-up steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.01
    batches = bench.batch_schedule(10, 7, 4, seed=3)
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)
    assert sorted(torch.cat(batches[:2]).tolist() + batches[2][:2].tolist()) == list(range(10))  # an epoch each
    assert all(torch.equal(a, b) for a, b in zip(batches, bench.batch_schedule(10, 7, 4, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, bench.batch_schedule(10, 7, 4, seed=4)))


@pytest.mark.slow
def test_quick_run_table_and_what_it_measures(tmp_path):
    """The --quick suite end to end through the script: every method has a row, the files are written, and the
    measured numbers relate as they must (Pear stores less with a higher ratio, merged MoSA stores exactly the
    adapter's bytes, full fine-tuning trains every weight)."""
    load_script("bench_adapters").main(["--quick", "--tasks", "color", "--steps", "6", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "adapters_quick.json").read_text())
    table = (tmp_path / "adapters_quick.md").read_text()
    summary = {s["method"]: s for s in data["summary"]}
    assert list(summary) == ["linear", "full", "lora", "adapter", "pear-0.5", "pear-0.75", "mosa"]
    assert "| method | color (natu) | mean acc" in table and "Targets (issue 8)" in table
    assert all(f"| {m} |" in table for m in summary)
    assert {r["task"] for r in data["rows"]} == {"color"} and data["meta"]["task_info"][0]["train_size"] == 96
    for row in data["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["step_seconds"] > 0 and row["inference_ms_per_image"] > 0
    vit_params = sum(p.numel() for p in bench.load_model(None).parameters()) - 24 * 129  # the 24-class head goes
    head = 128 * 6 + 6
    assert summary["linear"]["trainable_params"] == head
    assert summary["full"]["trainable_params"] == vit_params + head
    adapter = 8 * (2 * 128 + (128 * 16 + 16) + (16 * 128 + 128))  # LayerNorm, Down, Up per block
    assert summary["adapter"]["trainable_params"] == adapter + head
    assert summary["pear-0.5"]["trainable_params"] == adapter // 2 + head  # the head keeps training after pruning
    stored = {m: s["stored_bytes"] for m, s in summary.items()}
    assert stored["pear-0.75"] < stored["pear-0.5"] <= 0.55 * stored["adapter"] < stored["lora"] < stored["full"]
    assert stored["mosa"] == stored["adapter"]
    assert data["meta"]["targets"]["pear50_bytes_ok"] is True
    assert data["meta"]["targets"]["mosa_stored_equals_adapter"] is True


def test_linear_probe_beats_chance_on_an_easy_task(tmp_path):
    """The frozen tiny ViT knows colours: a linear probe on its features must be far above chance (1/6)."""
    out = bench.run(tasks=["color"], seeds=[0], steps=40, batch_size=32, methods=["linear"], train_size=160,
                    val_size=16, test_size=96, output_dir=str(tmp_path), log=lambda s: None)
    (row,) = out["rows"]
    assert row["accuracy"] > 0.6, row
    chance = bench.run(tasks=["color"], seeds=[0], steps=1, batch_size=2, methods=["linear"], train_size=160,
                       val_size=16, test_size=96, lrs={"linear": 1e-9}, output_dir=str(tmp_path), log=lambda s: None)
    assert chance["rows"][0]["accuracy"] < 0.3  # an untrained (zero) head predicts one class
    assert "on trainval (160+16 images), evaluated on test (96 images)" in (tmp_path / "adapters.md").read_text()
    bench.run(tasks=["color"], seeds=[0], steps=1, batch_size=2, methods=["linear"], train_size=160, val_size=16,
              test_size=96, fit_split="train", eval_split="val", output_dir=str(tmp_path), log=lambda s: None)
    assert "on train (160 images), evaluated on val (16 images)" in (tmp_path / "adapters.md").read_text()


def test_user_imagefolder_task_runs_in_the_same_protocol(tmp_path):
    rng = np.random.default_rng(0)
    for k, name in enumerate(["dark", "light"]):
        (tmp_path / "task" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.full((64, 64, 3), 60 + 120 * k, np.uint8) + rng.integers(0, 30, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "task" / name / f"{i}.png")
    args = ["--imagefolder", str(tmp_path / "task"), "--methods", "linear", "adapter", "--seeds", "0", "--steps", "3",
            "--batch-size", "4", "--output-dir", str(tmp_path / "out")]
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    parsed = parser.parse_args(args)
    kwargs = dict(tasks=[], imagefolders=parsed.imagefolder, seeds=parsed.seeds, steps=parsed.steps,
                  batch_size=parsed.batch_size, methods=parsed.methods, train_size=12, val_size=2,
                  output_dir=parsed.output_dir, log=lambda s: None)
    out = bench.run(**kwargs)
    assert [r["method"] for r in out["rows"]] == ["linear", "adapter"]
    assert out["meta"]["task_info"] == [{"name": "task", "kind": "natural", "num_classes": 2, "train_size": 12,
                                         "val_size": 2, "test_size": 6}]
    assert (tmp_path / "out" / "adapters.md").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        bench.run(tasks=["color"], methods=["prompt"], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no tasks"):
        bench.run(tasks=[], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="pear_warmup"):
        bench.run(tasks=["color"], pear_warmup=1.0, output_dir=str(tmp_path))
    for ratio in (0.0, 1.0, 1.5):  # refused before any model is loaded or trained
        with pytest.raises(ValueError, match="prune ratios must lie in"):
            bench.run(tasks=["color"], methods=["pear"], pear_ratios=[0.5, ratio], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown cost methods"):
        bench.run_cost(methods=["hst"], output_dir=str(tmp_path))
    assert bench._parse_lrs(["adapter=0.03", "full=1e-3"]) == {"adapter": 0.03, "full": 1e-3}
    with pytest.raises(ValueError, match="unknown method"):
        bench._parse_lrs(["vpt=0.1"])
    with pytest.raises(ValueError, match="METHOD=LR"):
        bench._parse_lrs(["adapter"])


def test_cost_cases_run_each_method(monkeypatch):
    """The ViT-B/16 cost case, on a small ViT of the same family so the test stays fast."""
    def small_vit(device):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=224, patch_size=32, embed_dim=32,
                                 depth=4, num_heads=2, num_classes=1000).to(device)

    monkeypatch.setattr(bench, "_build_vit_b16", small_vit)
    rows = {m: bench.run_cost_case({"method": m, "batch_size": 2, "steps": 1, "warmup": 0, "bottleneck": 4})
            for m in bench.COST_METHODS}
    params = {m: r["trainable_params"] for m, r in rows.items()}
    head = 32 * 1000 + 1000
    adapter = 4 * (2 * 32 + (32 * 4 + 4) + (4 * 32 + 32))
    assert params["adapter"] == adapter + head and params["pear"] == adapter // 2 + head
    assert params["mosa"] == params["mosa_kl"] > params["adapter"] and params["full"] > params["mosa"]
    up = 4 * 32 + 32  # Up is split into one copy per expert (Down shared)
    assert params["mosa"] == params["adapter"] + 4 * up * (bench.DEFAULT_MOSA_EXPERTS - 1)
    four = bench.run_cost_case({"method": "mosa", "batch_size": 2, "steps": 1, "warmup": 0, "bottleneck": 4,
                                "mosa_experts": 4})
    assert four["trainable_params"] == params["adapter"] + 4 * up * 3
    assert all(r["step_seconds"] > 0 and r["peak_memory_mb"] >= 0 for r in rows.values())


def test_runs_split_by_task_merge_into_one_table(tmp_path):
    """Two processes each run some tasks; --merge makes the table one run of every task would have made, and
    refuses parts that cannot be combined."""
    common = dict(seeds=[0], steps=5, batch_size=8, methods=["linear"], train_size=32, val_size=8, test_size=16,
                  output_dir=str(tmp_path), log=lambda s: None)
    color = bench.run(tasks=["color"], name="part_color", **common)
    count = bench.run(tasks=["count"], name="part_count", **common)
    paths = [str(tmp_path / "part_color.json"), str(tmp_path / "part_count.json")]
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bench.run_from_args(parser.parse_args(["--merge", *paths, "--output-dir", str(tmp_path), "--name", "merged"]))
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["rows"] == color["rows"] + count["rows"]
    assert merged["summary"] == bench.summarize(color["rows"] + count["rows"])
    assert merged["meta"]["tasks"] == ["color", "count"] and merged["meta"]["parts"] == 2
    assert "| method | color (natu) | count (stru) |" in (tmp_path / "merged.md").read_text()
    assert "(the longest of 2 parts;" in (tmp_path / "merged.md").read_text()
    assert merged["meta"]["part_wall_seconds"] == [color["meta"]["wall_seconds"], count["meta"]["wall_seconds"]]

    with pytest.raises(ValueError, match="measures .* again"):
        bench.merge_results([paths[0], paths[0]], str(tmp_path), "bad")
    bench.run(tasks=["count"], name="other_steps", **{**common, "steps": 6})
    with pytest.raises(ValueError, match="another steps"):
        bench.merge_results([paths[0], str(tmp_path / "other_steps.json")], str(tmp_path), "bad")
    partial = json.loads(Path(paths[1]).read_text())
    partial["meta"]["complete"] = False  # an interrupted run: the tasks it finished hold every seed and method
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    logged: list[str] = []
    again = bench.merge_results([paths[0], str(tmp_path / "partial.json")], str(tmp_path), "again", log=logged.append)
    assert again["rows"] == merged["rows"] and again["meta"]["complete"]
    assert any("a partial run; merging its 1 finished task(s) (count)" in line for line in logged)
    with pytest.raises(ValueError, match="at least two"):
        bench.merge_results(paths[:1], str(tmp_path), "bad")
    assert not (tmp_path / "bad.json").exists()


def test_runs_split_by_method_merge_into_the_joint_run(tmp_path):
    """A Pear ratio or a method measured in a later run merges with the first into the rows one joint run makes
    (same seeds, same batches: the same accuracies), and the merged settings list every method and ratio."""
    common = dict(tasks=["color"], seeds=[0], steps=6, batch_size=8, train_size=32, val_size=8, test_size=16,
                  output_dir=str(tmp_path), log=lambda s: None)
    joint = bench.run(methods=["linear", "adapter", "pear"], pear_ratios=[0.5, 0.75], name="joint", **common)
    bench.run(methods=["adapter", "pear"], pear_ratios=[0.5], name="first", **common)
    bench.run(methods=["pear"], pear_ratios=[0.75], name="later", **common)  # stops the adapter at the warm-up
    bench.run(methods=["linear"], name="linear", **common)
    parts = [str(tmp_path / f"{n}.json") for n in ("first", "later", "linear")]
    merged = bench.merge_results(parts, str(tmp_path), "merged", log=lambda s: None)

    def measured(rows):
        return {(r["task"], r["method"], r["seed"]): (r["accuracy"], r["stored_bytes"], r["trainable_params"])
                for r in rows}

    assert measured(merged["rows"]) == measured(joint["rows"])
    assert merged["meta"]["settings"]["methods"] == ["linear", "adapter", "pear"]
    assert merged["meta"]["settings"]["pear_ratios"] == [0.5, 0.75] and merged["meta"]["parts"] == 3
    assert merged["meta"]["settings"]["lrs"] == {m: bench.DEFAULT_LRS[m] for m in ("linear", "adapter", "pear")}
    # learning rates are compared per method: a method re-run at another rate merges with parts that lack it ...
    bench.run(methods=["linear"], name="other_lr", lrs={"linear": 0.5, "mosa": 0.1}, **common)
    other = bench.merge_results([parts[0], str(tmp_path / "other_lr.json")], str(tmp_path), "ok", log=lambda s: None)
    assert other["meta"]["settings"]["lrs"]["linear"] == 0.5 and "mosa" not in other["meta"]["settings"]["lrs"]
    # ... but not with a part whose rows of that method used the old rate (Pear's warm-up is the adapter's run)
    with pytest.raises(ValueError, match="trains linear at another learning rate"):
        bench.merge_results([parts[2], str(tmp_path / "other_lr.json")], str(tmp_path), "bad")
    # a method measured on fewer tasks than the table has: '-' cells, a mean that says so, the holes listed on top
    bench.run(methods=["linear"], name="linear_count", **{**common, "tasks": ["count"]})
    holes = bench.merge_results([parts[0], str(tmp_path / "linear_count.json")], str(tmp_path), "holes",
                                log=lambda s: None)
    text = (tmp_path / "holes.md").read_text()
    assert not holes["meta"]["complete"] and text.startswith("INCOMPLETE: 3 (method, task) cells")
    assert "linear on color" in text and "adapter on count" in text and "pear-0.5 on count" in text
    assert text.count("(1 of 2 tasks)") == 3
    bench.run(methods=["pear"], name="other_adapter_lr", lrs={"adapter": 0.5}, **common)
    with pytest.raises(ValueError, match="trains adapter at another learning rate"):
        bench.merge_results([parts[0], str(tmp_path / "other_adapter_lr.json")], str(tmp_path), "bad")
    assert not (tmp_path / "bad.json").exists()


def test_merge_refuses_files_that_are_not_results(tmp_path):
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"meta": {}}))
    for bad in ("junk.json", "other.json", "missing.json"):
        with pytest.raises(ValueError, match="not a result file"):
            bench.merge_results([str(tmp_path / bad), str(tmp_path / "other.json")], str(tmp_path), "bad")
