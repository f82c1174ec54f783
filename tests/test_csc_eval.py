"""scripts/eval_csc.py's measurement: edge F1 of generated images against the ground-truth control edges."""

import argparse

import numpy as np

from .conftest import load_script


def test_clean_scenes_score_high_edge_f1_and_blank_images_zero():
    script = load_script("eval_csc")
    args = argparse.Namespace(num_eval_scenes=6, seed=0)
    prompts, controls = script.eval_scenes(args, 32)
    assert len(prompts) == 6 and controls.shape == (6, 3, 32, 32)
    assert all(len(p.split()) <= 14 for p in prompts)  # fits the tiny tokenizer's 16 tokens with BOS/EOS
    data = script.ConditionedDataset(script.ShapesDataset(6, seed=10_000, size=32, num_shapes=(1, 2)), "canny")
    clean = np.stack([data.dataset.scene(i).image for i in range(6)]).astype(np.float32) / 255
    good = script.measure(clean, prompts, controls)
    assert good["edge_f1"] > 0.7, good
    blank = script.measure(np.full_like(clean, 0.5), prompts, controls)
    assert blank["edge_f1"] == 0.0 and blank["caption_fidelity"] == 0.0
