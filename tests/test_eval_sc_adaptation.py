"""scripts/eval_sc_adaptation.py: trains through the training script, loads the result the user's way, measures."""

import json

import numpy as np
import pytest

from tests.conftest import load_script
from vistune.assets import asset_path
from vistune.demo import generate


@pytest.mark.slow
def test_sc_run_is_trained_loaded_and_measured(tmp_path):
    script = load_script("eval_sc_adaptation")
    results = tmp_path / "results"
    assert script.main(["--methods", "sc", "--steps", "3", "--batch_size", "4", "--num_train_images", "16",
                        "--images_per_prompt", "1", "--work_dir", str(tmp_path / "work"),
                        "--output_dir", str(results)]) == 0
    record = json.loads((results / "sc_adaptation_pastel.json").read_text())
    base, sc = record["rows"]
    assert (base["method"], sc["method"]) == ("base", "sc")
    assert sc["trainable_params"] == 99_328  # SC-Tuner, ratio 1.0, on the shipped U-Net
    gap = (sc["style_statistic"] - base["style_statistic"]) / (record["meta"]["style_target"] - base["style_statistic"])
    assert sc["style_gap_closed"] == pytest.approx(gap)
    assert "| sc | 99,328 |" in (results / "sc_adaptation_pastel.md").read_text()
    # the trained tuner really is what gets measured: it changes the base model's images
    base_pipe = script.load_pipeline(asset_path("tiny-sd-shapes"))
    tuned_pipe = script.load_pipeline(asset_path("tiny-sd-shapes"), "sc", tmp_path / "work" / "sc")
    a, b = generate(base_pipe, ["a red circle on a white background"], 0, 1), generate(tuned_pipe, ["a red circle on a white background"], 0, 1)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
