import json

import pytest
import torch
import torch.nn.functional as F

import vistune
from vistune.tuners.adapter import AdapterConfig, AdapterTuner
from vistune.tuners.mosa import MoSAConfig
from vistune.tuners.pear import (
    PearConfig,
    PearTuner,
    accumulate_importance,
    importance_scores,
    plan_sharing,
    prune_and_share,
    reset_importance,
)

from .conftest import randomize
from .test_adapter import block_io, imitate, reference_adapter, teacher_targets
from .test_vit_site import all_hooks, images, one_thread, reference_block, tiny_vit  # noqa: F401 (autouse fixture)

SCORES = {"mlp.0": 4.0, "mlp.1": 1.0, "mlp.2": 3.0, "mlp.3": 2.0}


def tuned_vit(style: str = "adaptformer", depth: int = 4):
    model = tiny_vit(depth=depth)
    tuner = vistune.attach(model, AdapterConfig(style=style, bottleneck=4))
    randomize(tuner, std=0.2)
    return model, tuner


def test_importance_is_first_order_taylor_accumulated_over_batches():
    model, tuner = tuned_vit()
    expected = {f"mlp.{i}": 0.0 for i in range(4)}
    for seed in (0, 1):
        model.zero_grad()
        model(images(seed=seed)).square().mean().backward()
        for i in range(4):
            score = sum((p * p.grad).sum() for p in tuner.mlp[str(i)].parameters())
            expected[f"mlp.{i}"] += abs(score.item())
        totals = accumulate_importance(model)
    assert totals.keys() == expected.keys()
    for key in expected:
        assert totals[key] == pytest.approx(expected[key], rel=1e-5)
    assert importance_scores(model) == totals
    reset_importance(model)
    assert importance_scores(model) == {}
    model.zero_grad(set_to_none=True)
    with pytest.raises(vistune.TunerError, match="after loss.backward"):
        accumulate_importance(model)


def test_sharing_rule_nearest_retained_then_most_important():
    scores = {f"mlp.{i}": v for i, v in enumerate([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])}
    # prunes the 3 least important (3, 1, 5); 1 sits between 0 and 2 -> 0 (more important); 3 between 2 and 4 -> 2
    assert plan_sharing(scores, list(range(6)), "mlp", 0.5) == {"mlp.1": "mlp.0", "mlp.3": "mlp.2", "mlp.5": "mlp.4"}
    assert plan_sharing(scores, list(range(6)), "mlp", 0.2) == {"mlp.3": "mlp.2"}  # floor(1.2 + 0.5) = 1


@pytest.mark.parametrize("knowledge_checkpoint", [True, False])
def test_pruned_positions_run_the_shared_adapter(knowledge_checkpoint):
    model, tuner = tuned_vit()
    old = {k: v.clone() for k, v in tuner.state_dict().items()}
    full_count = sum(p.numel() for p in tuner.parameters())
    pear = prune_and_share(model, 0.5, importance=SCORES, knowledge_checkpoint=knowledge_checkpoint)
    assert vistune.get_tuner(model) is pear and isinstance(pear, PearTuner)
    assert pear.config.shared == {"mlp.1": "mlp.0", "mlp.3": "mlp.2"}
    assert pear.adapter_at("mlp", 1) is pear.mlp["0"] and pear.adapter_at("mlp", 3) is pear.mlp["2"]
    assert sorted(pear.mlp.keys()) == ["0", "2"]
    assert sum(p.numel() for p in pear.parameters()) * 2 == full_count
    assert {id(p) for p in vistune.trainable_parameters(model)} == {id(p) for p in pear.parameters()}
    for key, value in pear.state_dict().items():  # the knowledge checkpoint: importance-weighted mean
        retained = int(key.split(".")[1])
        pruned, (w_r, w_p) = (1, (4.0, 1.0)) if retained == 0 else (3, (3.0, 2.0))
        if knowledge_checkpoint:
            expected = (w_r * old[key] + w_p * old[key.replace(f"mlp.{retained}.", f"mlp.{pruned}.")]) / (w_r + w_p)
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, old[key])
    ios = block_io(model, images())
    s = pear.config.adapter_scale
    with vistune.disabled(model), torch.no_grad():
        for i, (x, out) in enumerate(ios):
            adapter = pear.mlp["0" if i < 2 else "2"]
            expected = reference_block(model.blocks[i], x, parallel=lambda h: s * reference_adapter(adapter, h, "gelu"))
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_storage_shrinks_and_save_load_round_trips(tmp_path):
    model, _ = tuned_vit()
    x = images()
    vistune.save_tuners(model, tmp_path / "full")
    prune_and_share(model, 0.5, importance=SCORES)
    with torch.no_grad():
        pruned_out = model(x)
    vistune.save_tuners(model, tmp_path / "pear")
    full_bytes = (tmp_path / "full" / vistune.WEIGHTS_NAME).stat().st_size
    pear_bytes = (tmp_path / "pear" / vistune.WEIGHTS_NAME).stat().st_size
    assert pear_bytes < 0.55 * full_bytes, (pear_bytes, full_bytes)
    record = json.loads((tmp_path / "pear" / vistune.CONFIG_NAME).read_text())
    assert record["config"]["shared"] == {"mlp.1": "mlp.0", "mlp.3": "mlp.2"} and record["tuner_type"] == "pear"
    fresh = tiny_vit()
    vistune.load_tuners(fresh, tmp_path / "pear")
    loaded = vistune.get_tuner(fresh)
    assert isinstance(loaded, PearTuner) and loaded.config == vistune.get_tuner(model).config
    assert loaded.adapter_at("mlp", 3) is loaded.mlp["2"]
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned_out)


@pytest.mark.parametrize(
    "depth, message", [(6, "depth: saved for 4, this backbone has 6"), (2, r"positions \['mlp.2', 'mlp.3'\]")]
)
def test_loading_into_another_depth_is_refused(tmp_path, depth, message):
    model, _ = tuned_vit()
    prune_and_share(model, 0.5, importance=SCORES)
    vistune.save_tuners(model, tmp_path / "pear")
    other = tiny_vit(depth=depth)
    with pytest.raises(vistune.BackboneMismatchError, match=message):
        vistune.load_tuners(other, tmp_path / "pear")
    assert not hasattr(other, "vistune_tuners") and all_hooks(other) == 0


def test_houlsby_prunes_each_kind_and_keeps_training():
    model = tiny_vit()
    x = images(batch=8)
    target = teacher_targets(model, x)
    tuner = vistune.attach(model, AdapterConfig(style="houlsby", bottleneck=4))
    optimizer = torch.optim.AdamW(vistune.trainable_parameters(model), lr=1e-2)
    for _ in range(5):  # a few steps to score the adapters
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        accumulate_importance(model)
        optimizer.step()
    assert set(importance_scores(model)) == {f"{k}.{i}" for k in ("attn", "mlp") for i in range(4)}
    pear = prune_and_share(model, 0.5)
    assert len(pear.config.shared) == 4  # half of each kind
    assert all(k.split(".")[0] == v.split(".")[0] for k, v in pear.config.shared.items())
    assert len(pear.attn) == 2 and len(pear.mlp) == 2
    assert tuner not in vistune.list_tuners(model).values()
    losses = imitate(model, x, target, steps=25)
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize(
    "ratio, message",
    [
        *[(r, r"in \(0, 1\)") for r in (0.0, 1.0, -0.2, 1.5)],
        (float("nan"), "finite"),
        (0.1, "would prune 0 of the 4"),
        (0.9, "would prune 4 of the 4"),
    ],
)
def test_bad_ratios_change_nothing(ratio, message):
    model, tuner = tuned_vit()
    x = images()
    with torch.no_grad():
        before = model(x)
    with pytest.raises(vistune.TunerError, match=message):
        prune_and_share(model, ratio, importance=SCORES)
    assert vistune.get_tuner(model) is tuner and type(tuner) is AdapterTuner
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_other_bad_input():
    model, tuner = tuned_vit()
    with pytest.raises(vistune.TunerError, match="no importance score"):
        prune_and_share(model, 0.5)
    with pytest.raises(vistune.TunerError, match="non-negative"):
        prune_and_share(model, 0.5, importance={**SCORES, "mlp.0": -1.0})
    vistune.attach(model, MoSAConfig(bottleneck=4), name="m")
    with pytest.raises(vistune.TunerError, match="merge_mosa first"):
        prune_and_share(model, 0.5, "m", importance=SCORES)
    prune_and_share(model, 0.5, importance=SCORES)
    with pytest.raises(vistune.TunerError, match="needs a plain adapter tuner"):
        prune_and_share(model, 0.5, importance={"mlp.0": 1.0, "mlp.2": 2.0})
    assert vistune.get_tuner(model) is not tuner and set(vistune.list_tuners(model)) == {"default", "m"}
    for shared in ({"mlp.1": "attn.0"}, {"mlp.x": "mlp.0"}, {"mlp.1": "mlp.2", "mlp.2": "mlp.0"}):
        with pytest.raises(vistune.TunerError):
            PearConfig(shared=shared)
    with pytest.raises(vistune.TunerError, match="style 'adaptformer' has only"):
        PearConfig(shared={"attn.1": "attn.0"})


def test_a_trained_head_keeps_training_after_pruning():
    """VTAB-style tuning trains the task head with the adapters; pruning mid-training must not freeze it."""
    model, _ = tuned_vit()
    model.head.requires_grad_(True)
    prune_and_share(model, 0.5, importance=SCORES)
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    assert not model.blocks[0].attn.qkv.weight.requires_grad
    vistune.detach(model)  # the flags from before the first attach come back
    assert all(p.requires_grad for p in model.parameters())
