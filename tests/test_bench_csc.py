"""vistune.bench.csc: CSC-Tuner vs ControlNet cost cases (tiny U-Net config here; SD1.5 counts on the meta device)."""

import json

import pytest
import torch

import vistune
from vistune.bench import csc


@pytest.mark.slow
def test_sd15_parameter_counts_of_the_compared_methods():
    from diffusers import ControlNetModel, UNet2DConditionModel

    from vistune.testing import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    assert sum(p.numel() for p in controlnet.parameters()) == 361_279_120
    for kernel, expected in ((3, 99_111_760), (1, 28_824_400)):
        tuner = vistune.attach(unet, vistune.CSCTunerConfig(dense_kernel_size=kernel), name="c")
        assert sum(p.numel() for p in tuner.parameters()) == expected
        vistune.detach(unet)


@pytest.mark.parametrize("method", csc.METHODS)
def test_each_case_measures_a_training_step(method):
    row = csc.run_one({"method": method, "batch_size": 2, "latent": 8, "steps": 1, "warmup": 0, "config": "tiny"})
    assert row["trainable_params"] > 0 and row["step_seconds"] > 0 and row["peak_memory_mb"] >= 0


@pytest.mark.slow  # two fresh subprocesses
def test_run_writes_ratios_to_controlnet_and_target_checks(tmp_path):
    rows = csc.run(batch_sizes=(1,), steps=1, warmup=0, latent=8, config="tiny", methods=("controlnet", "csc_1x1"),
                   output_dir=tmp_path, log=lambda *a: None)
    assert [r["method"] for r in rows] == ["controlnet", "csc_1x1"]
    assert rows[0]["params_vs_controlnet"] == 1.0
    assert rows[1]["params_vs_controlnet"] == rows[1]["trainable_params"] / rows[0]["trainable_params"]
    saved = json.loads((tmp_path / "csc.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["meta"]["config"] == "tiny"
    table = (tmp_path / "csc.md").read_text()
    assert "| csc_1x1 | 1 |" in table and "Targets:" in table and "csc_1x1: params" in table
