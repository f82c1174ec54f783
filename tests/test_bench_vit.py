"""vistune.bench.vit: one case measures what it says in process; ratios and targets; a tiny end-to-end run."""

import json

import pytest

from vistune.bench import vit as bench

from .test_vit_site import one_thread  # noqa: F401 (autouse fixture)


def case(method):
    return {"method": method, "batch_size": 2, "image_size": 32, "steps": 1, "warmup": 0, "model": "vit_tiny",
            "num_classes": 10, "threads": 1}


def test_one_case_per_method_counts_the_trainable_parameters():
    rows = {m: bench.run_one(case(m)) for m in bench.METHODS if m != "lora"}
    params = {m: r["trainable_params"] for m, r in rows.items()}
    assert params["full_ckpt"] == params["full"]  # checkpointing: same maths, same parameters
    assert params["hst"] == params["hst_nockpt"] == params["hst_sideckpt"] == params["hst_allckpt"]
    assert params["linear"] == 192 * 10 + 10  # the head of vit_tiny (width 192)
    assert params["hst"] > params["hst_nograd"] > params["linear"]
    assert params["hst"] - params["hst_nograd"] == 12 * 192 + 12 * 2 * 2 * 192 + 2 * (3 * 32 + 3 * 48 + 3 * 64 + 3 * 72)
    assert all(r["step_seconds"] > 0 and r["peak_memory_mb"] >= 0 for r in rows.values())


def test_ratios_targets_and_table():
    rows = [
        {"method": "full", "batch_size": 2, "trainable_params": 100, "peak_memory_mb": 1000.0, "step_seconds": 2.0},
        {"method": "hst", "batch_size": 2, "trainable_params": 1, "peak_memory_mb": 500.0, "step_seconds": 1.0},
        {"method": "hst_nograd", "batch_size": 2, "trainable_params": 1, "peak_memory_mb": 400.0, "step_seconds": 0.5},
    ]
    rows = bench.ratios(rows)
    assert rows[1]["memory_vs_full"] == 0.5 and rows[1]["meets_target"] is True
    assert rows[2]["memory_vs_full"] == 0.4 and rows[2]["meets_target"] is False and rows[2]["time_vs_full"] == 0.25
    meta = {"model": "vit_b16", "image_size": 224, "num_classes": 100, "steps": 3, "warmup": 1,
            "env": {"device": "cpu", "threads": 1}}
    table = bench.markdown(rows, meta)
    assert "vit_base_patch16_224" in table and "<= 0.35: MISSED" in table and "<= 0.60: met" in table
    assert "- `hst`: HST, default config" in table and "hst_nockpt`:" not in table  # legend of the rows shown


@pytest.mark.slow
def test_end_to_end_in_subprocesses(tmp_path):
    rows = bench.run(batch_sizes=(2,), steps=1, warmup=0, image_size=32, model="vit_tiny", num_classes=10,
                     methods=("full", "hst_nograd"), output_dir=str(tmp_path), threads=1, log=lambda *a: None)
    saved = json.loads((tmp_path / "vit.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["full", "hst_nograd"] and rows[1]["memory_vs_full"] >= 0
    assert (tmp_path / "vit.md").read_text().startswith("HST vs full fine-tuning")
