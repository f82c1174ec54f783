"""scripts/eval_csc.py's measurement: edge F1, mIoU and colour-layout error of generated images against the
ground truth of the scenes, pairs of conditions combined at inference, and the report."""

import argparse

import numpy as np
import pytest
import torch

from .conftest import load_script, randomize


@pytest.fixture(scope="module")
def script():
    return load_script("eval_csc")


def _args(script, *extra):
    return script.parse_args(["--num_eval_scenes", "12", *extra])


def test_clean_scenes_score_high_edge_f1_and_blank_images_zero(script):
    args = argparse.Namespace(num_eval_scenes=6, seed=0)
    prompts, controls = script.eval_scenes(args, 32)
    assert len(prompts) == 6 and controls.shape == (6, 3, 32, 32)
    assert all(len(p.split()) <= 11 for p in prompts)  # at most two shapes
    data = script.ConditionedDataset(script.ShapesDataset(6, seed=10_000, size=32, num_shapes=(1, 2)), "canny")
    clean = np.stack([data.dataset.scene(i).image for i in range(6)]).astype(np.float32) / 255
    good = script.measure(clean, prompts, controls)
    assert good["edge_f1"] > 0.7, good
    blank = script.measure(np.full_like(clean, 0.5), prompts, controls)
    assert blank["edge_f1"] == 0.0 and blank["caption_fidelity"] == 0.0


def test_every_metric_is_best_on_the_real_scenes_and_worse_on_shuffled_or_blank_images(script):
    args = _args(script)
    truth = script.eval_truth(args, 32)
    assert truth["masks"].shape == (12, 32, 32) and truth["layouts"].shape == (12, 3, 32, 32)
    assert truth["color_cell"] == 4  # an 8 x 8 grid at 32 px
    # the default cell is the condition's own: the layouts are the colour condition maps the tuner is given
    assert torch.equal(truth["layouts"], script.eval_scenes(args, 32, "color")[1])
    coarse = script.eval_truth(_args(script, "--color_cell", "16"), 32)["layouts"]
    assert len(torch.unique(coarse[0].reshape(3, -1), dim=1).T) <= 4 < len(torch.unique(truth["layouts"][0].reshape(3, -1), dim=1).T)
    real = script.real_images(args, 32)
    good = script.measure(real, truth["prompts"], truth=truth)
    assert good["edge_f1"] > 0.7 and good["miou"] > 0.9 and good["color_error"] == 0.0, good
    shuffled = script.measure(np.roll(real, 1, axis=0), truth["prompts"], truth=truth)
    assert shuffled["miou"] < good["miou"] - 0.3 and shuffled["color_error"] > 20, shuffled
    assert shuffled["edge_f1"] < good["edge_f1"] - 0.3
    blank = script.measure(np.full_like(real, 0.5), truth["prompts"], truth=truth)
    assert blank["miou"] < 0.5 and blank["color_error"] > 20 and blank["edge_f1"] == 0.0, blank


def test_cli_conditions_pairs_and_the_runs_they_need(script, tmp_path):
    args = script.parse_args([])  # the canny-only default keeps working
    assert args.conditions == ["canny"] and args.pairs == [] and script.runs(args) == [("canny", "csc"),
                                                                                    ("canny", "controlnet")]
    assert script.run_dir(tmp_path, "canny", "csc") == tmp_path / "csc"  # where earlier runs put it
    args = script.parse_args(["--conditions", "canny", "segmentation", "color", "--pairs", "canny+color",
                              "--methods", "csc", "controlnet"])
    assert args.pairs == [("canny", "color")]
    assert script.runs(args) == [("canny", "csc"), ("canny", "controlnet"), ("segmentation", "csc"),
                                 ("segmentation", "controlnet"), ("color", "csc")]  # no ControlNet on colour
    args = script.parse_args(["--methods", "controlnet", "--pairs", "segmentation+color"])
    assert script.runs(args) == [("canny", "controlnet"), ("segmentation", "csc"), ("color", "csc")]
    assert args.control_scales == [1.0]
    assert script.parse_args(["--control_scales", "1", "2.5"]).control_scales == [1.0, 2.5]
    for bad in (["--control_scales", "0"], ["--control_scales", "1", "-1"], ["--pairs", "canny"],
                ["--pairs", "canny+canny"], ["--pairs", "canny+depth"],
                ["--pairs", "canny+color", "--pair_weights", "1.0"], ["--conditions", "depth"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_a_pair_of_condition_tuners_combines_at_inference_and_gets_both_metrics(script, tmp_path, monkeypatch):
    import vistune
    from vistune import CSCTunerConfig
    from vistune.assets import asset_path
    from vistune.conditions import vae_scale_factor

    monkeypatch.setattr(script, "SAMPLING_STEPS", 4)  # the measurement path, not the quality

    base = asset_path("tiny-sd-shapes")
    pipe = script.load_pipeline(base, None, None)
    paths = []
    for seed, condition in enumerate(("canny", "color")):
        vistune.attach(pipe.unet, CSCTunerConfig(condition_channels=16, encoder_width_ratio=0.25,
                                                 condition=condition, vae_scale_factor=vae_scale_factor(pipe.vae)),
                       name=condition)
        randomize(vistune.get_tuner(pipe.unet, condition), seed=seed + 1, std=0.02)  # no longer the identity
        paths.append(tmp_path / condition)
        vistune.save_tuners(pipe.unet, paths[-1], name=condition)
        vistune.detach(pipe.unet, [condition])
    args = _args(script, "--num_eval_scenes", "2")
    truth = script.eval_truth(args, 32)
    controls = [script.eval_scenes(args, 32, c)[1] for c in ("canny", "color")]
    paired = script.load_pipeline(base, "csc", paths)
    assert paired.controlnet.condition_names == ["canny", "color"]
    images = script.generate(paired, truth["prompts"], controls, 0, conditions=["canny", "color"], weights=[1.0, 0.5])
    assert images.shape == (2, 32, 32, 3)
    plain = script.generate(script.load_pipeline(base, None, None), truth["prompts"], None, 0)
    one = script.load_pipeline(base, "csc", paths[:1])
    single = script.generate(one, truth["prompts"], controls[0], 0)
    assert not np.allclose(images, single, atol=1e-4) and not np.allclose(single, plain, atol=1e-4)
    assert np.allclose(script.generate(one, truth["prompts"], controls[0], 0, weights=[0.0]), plain, atol=1e-5)
    row = script.measure(images, truth["prompts"], truth=truth)
    assert set(row) == {"edge_f1", "miou", "color_error", "caption_fidelity"}


def test_control_scale_reaches_both_pipelines_and_zero_is_the_uncontrolled_model(script, tmp_path, monkeypatch):
    from diffusers import ControlNetModel

    from vistune.assets import asset_path
    from vistune.conditions import vae_scale_factor
    from vistune.sd_training import controlnet_embedding_channels

    monkeypatch.setattr(script, "SAMPLING_STEPS", 3)
    base = asset_path("tiny-sd-shapes")
    pipe = script.load_pipeline(base, None, None)
    controlnet = ControlNetModel.from_unet(
        pipe.unet, conditioning_embedding_out_channels=controlnet_embedding_channels(vae_scale_factor(pipe.vae)))
    for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        randomize(block, seed=3, std=0.05)  # the zero convs: no longer the identity
    controlnet.save_pretrained(tmp_path / "controlnet")
    args = _args(script, "--num_eval_scenes", "2")
    prompts, controls = script.eval_scenes(args, 32, "canny")
    plain = script.generate(pipe, prompts, None, 0)
    controlled = script.load_pipeline(base, "controlnet", tmp_path)
    off = script.generate(controlled, prompts, controls, 0, weights=[0.0])
    one = script.generate(controlled, prompts, controls, 0, weights=[1.0])
    assert np.allclose(off, plain, atol=1e-5) and not np.allclose(one, plain, atol=1e-3)
    assert np.allclose(script.generate(controlled, prompts, controls, 0), one)  # the default scale is 1


def test_csc_width_flags_reach_the_csc_runs_only_and_the_report(script, tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(script.subprocess, "run", lambda command, check: commands.append(command))
    args = script.parse_args(["--csc_encoder_width_ratio", "2", "--csc_down_ratio", "4", "--csc_condition_channels",
                              "512", "--learning_rate", "3e-3", "--controlnet_learning_rate", "1e-3"])
    for method in ("csc", "controlnet"):
        script.train(args, method, tmp_path, tmp_path / method, 32)
    csc, controlnet = commands
    assert csc[csc.index("--encoder_width_ratio") + 1] == "2.0" and csc[csc.index("--down_ratio") + 1] == "4.0"
    assert csc[csc.index("--condition_channels") + 1] == "512"
    assert not {"--encoder_width_ratio", "--down_ratio", "--condition_channels"} & set(controlnet)
    assert csc[csc.index("--learning_rate") + 1] == "0.003"
    assert controlnet[controlnet.index("--learning_rate") + 1] == "0.001"
    commands.clear()
    script.train(script.parse_args(["--learning_rate", "3e-3"]), "controlnet", tmp_path, tmp_path / "c", 32)
    script.train(script.parse_args([]), "csc", tmp_path, tmp_path / "csc", 32)
    assert commands[0][commands[0].index("--learning_rate") + 1] == "0.003"  # one rate for all unless told
    assert not {"--encoder_width_ratio", "--down_ratio", "--condition_channels"} & set(commands[1])  # the defaults


def test_snr_gamma_and_ema_reach_every_run_and_the_report_header(script, tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(script.subprocess, "run", lambda command, check: commands.append(command))
    for method in ("csc", "controlnet"):
        script.train(script.parse_args(["--snr_gamma", "5", "--use_ema", "--ema_decay", "0.99"]), method, tmp_path,
                     tmp_path / method, 32)
    script.train(script.parse_args([]), "csc", tmp_path, tmp_path / "plain", 32)
    assert [c[c.index("--snr_gamma") + 1] for c in commands[:2]] == ["5", "5"]
    assert [c[c.index("--use_ema") + 1:][:2] for c in commands[:2]] == [["--ema_decay", "0.99"]] * 2
    assert "--snr_gamma" not in commands[2] and "--use_ema" not in commands[2]  # plain MSE, no EMA unless asked
    meta = dict(steps=10, batch_size=4, learning_rate=1e-3, conditioning_dropout=0.1, seed=0, train_images=16,
                eval_scenes=4, pair_weights=None, timestep_sampling="uniform")
    rows = [{"condition": "-", "method": "uncontrolled", "trainable_params": 0, "edge_f1": 0.2, "miou": 0.4,
             "color_error": 30.0, "caption_fidelity": 0.5}]
    assert "uniform timesteps, Min-SNR-5 loss weights, caption" in script.markdown(rows, {**meta, "snr_gamma": 5.0})
    assert "uniform timesteps, caption" in script.markdown(rows, meta)
    assert "Min-SNR-5 loss weights, the moving average of the weights saved (EMA, decay cap 0.99), caption" in (
        script.markdown(rows, {**meta, "snr_gamma": 5.0, "use_ema": True, "ema_decay": 0.99}))


def test_report_has_every_row_and_the_pair_verdicts(script):
    metrics = dict(edge_f1=0.2, miou=0.4, color_error=30.0, caption_fidelity=0.5)
    rows = [
        {"condition": "-", "method": "uncontrolled", "trainable_params": 0, **metrics},
        {"condition": "canny", "method": "csc", "trainable_params": 10, **{**metrics, "edge_f1": 0.5}},
        {"condition": "canny", "method": "controlnet", "trainable_params": 99, **{**metrics, "edge_f1": 0.45}},
        {"condition": "segmentation", "method": "csc", "trainable_params": 10, **{**metrics, "miou": 0.8}},
        {"condition": "color", "method": "csc", "trainable_params": 10, **{**metrics, "color_error": 10.0}},
        {"condition": "canny+color", "method": "csc", "trainable_params": 20,
         **{**metrics, "edge_f1": 0.55, "color_error": 12.0}},
        {"condition": "-", "method": "real scenes (upper bound)", "trainable_params": 0,
         **{**metrics, "edge_f1": 0.9, "miou": 0.95, "color_error": 0.0}},
    ]
    meta = dict(steps=10, batch_size=4, learning_rate=1e-3, conditioning_dropout=0.1, seed=0, train_images=16,
                eval_scenes=4, pair_weights=None, csc_widths=["encoder width ratio 2"])
    table = script.markdown(rows, meta)
    assert "CSC-Tuners (official: 1, 256, 1x): encoder width ratio 2." in table
    assert "AdamW constant lr 0.001, " in table
    assert "AdamW constant lr 0.003 (ControlNet 0.001), " in script.markdown(rows, {**meta, "learning_rate": 3e-3,
                                                                                    "controlnet_learning_rate": 1e-3})
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(body) == len(rows)
    assert "| canny | csc | 10 | 0.500 | 2.50x | 0.400 | 1.00x | 30.0 | 50.0% | +0.0 pts |" in table
    assert "| segmentation | csc | 10 | 0.200 | 1.00x | 0.800 | 2.00x |" in table
    assert "Method xS" not in table  # no scaled rows, no note
    scaled = [*rows[:4], {**rows[3], "control_scale": 2.0, "miou": 0.9}, *rows[4:]]
    table = script.markdown(scaled, meta)
    assert "| segmentation | csc x2 | 10 | 0.200 | 1.00x | 0.900 | 2.25x |" in table and "Method xS" in table
    assert "| segmentation | csc | 10 | 0.200 | 1.00x | 0.800 | 2.00x |" in table
    assert script.pair_verdicts(scaled) == script.pair_verdicts(rows)  # pairs compare with the scale-1 rows
    assert "canny+color on edge_f1: 0.550 vs alone canny 0.500, color 0.200 -> beats both" in table
    assert "canny+color on color_error: 12.000 vs alone canny 30.000, color 10.000 -> does NOT beat both" in table


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_the_table_json_and_grid(script, tmp_path):
    import json

    torch.manual_seed(0)
    code = script.main(["--steps", "1", "--batch_size", "2", "--num_train_images", "4", "--num_eval_scenes", "2",
                        "--methods", "csc", "controlnet", "--conditions", "canny", "segmentation", "color",
                        "--controlnet_conditions", "segmentation",
                        "--pairs", "canny+color", "--csc_encoder_width_ratio", "0.5", "--work_dir", str(tmp_path / "work"),
                        "--output_dir", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "csc_fidelity.json").read_text())
    names = [(r["condition"], r["method"]) for r in result["rows"]]
    assert names == [("-", "uncontrolled"), ("canny", "csc"), ("segmentation", "csc"),
                     ("segmentation", "controlnet"), ("color", "csc"), ("canny+color", "csc"),
                     ("-", "real scenes through the VAE (ceiling)"), ("-", "real scenes (upper bound)")]
    assert all({"edge_f1", "miou", "color_error", "caption_fidelity"} <= set(r) for r in result["rows"])
    ceiling, real = result["rows"][-2:]
    assert real["edge_f1"] > 0.95 and real["color_error"] == 0
    # the VAE is lossy, but its reconstructions keep the scenes' layout far better than an uncontrolled sample
    assert 0 < ceiling["color_error"] < result["rows"][0]["color_error"]
    report = (tmp_path / "out" / "csc_fidelity.md").read_text()
    assert "canny+color on edge_f1" in report
    widths = "CSC-Tuners (official: 1, 256, 1x): encoder width ratio 0.5, output width 256, skip-MLP width 1x."
    assert widths in report
    assert (tmp_path / "out" / "csc_fidelity.png").stat().st_size > 0

    # --skip_training re-measures the saved runs: same numbers, and each run's recorded train time comes back
    assert script.main(["--skip_training", "--num_eval_scenes", "2", "--methods", "csc", "controlnet",
                        "--conditions", "canny", "--controlnet_conditions", "segmentation",
                        "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "csc_fidelity.json").read_text())["rows"]
    first = {(r["condition"], r["method"]): r for r in result["rows"]}
    reused = [r for r in again if r["condition"] == "canny"]
    assert len(reused) == 1 and reused[0]["train_seconds"] == first[("canny", "csc")]["train_seconds"] > 0
    assert reused[0]["edge_f1"] == pytest.approx(first[("canny", "csc")]["edge_f1"])
    assert widths in (tmp_path / "again" / "csc_fidelity.md").read_text()  # read from the saved tuners, not flags


def test_grid_has_one_labelled_row_per_entry(script, tmp_path):
    from PIL import Image

    grids = {"control canny": np.zeros((3, 32, 32, 3)), "uncontrolled": np.ones((3, 32, 32, 3))}
    script.save_grid(grids, tmp_path / "grid.png", columns=2, zoom=3)
    image = np.asarray(Image.open(tmp_path / "grid.png"))
    assert image.shape == (2 * 96, 170 + 2 * 96, 3) and not list(tmp_path.glob("*.partial*"))
    assert (image[:96, 170:] == 0).all() and (image[96:, 170:] == 255).all()
    assert (image[:, :170] < 128).any()  # the labels are written

    grids = {"csc": np.zeros((1, 32, 32, 3)), "controlnet segmentation x1.5": np.zeros((1, 32, 32, 3))}
    script.save_grid(grids, tmp_path / "long.png", columns=1, zoom=3)
    label = np.asarray(Image.open(tmp_path / "long.png"))[:, :170].min(axis=(1, 2)) < 128
    short, long = np.flatnonzero(label[:96]), np.flatnonzero(label[96:])
    assert np.ptp(long) > np.ptp(short) + 8  # a name too long for one line takes two, nothing cut off
