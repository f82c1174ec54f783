import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vistune
from vistune.tuners.adapter import AdapterConfig, AdapterTuner, BottleneckAdapter
from vistune.tuners.mosa import MoSAConfig, MoSALinear, MoSATuner, merge_mosa, mosa_consistency_loss, split_assignment

from .conftest import randomize
from .test_adapter import block_io, teacher_targets
from .test_vit_site import all_hooks, images, one_thread, reference_block, tiny_vit  # noqa: F401 (autouse fixture)


def mosa_linears(tuner):
    return [m for m in tuner.modules() if isinstance(m, MoSALinear)]


def train_steps(model, x, steps=4, weight_decay=0.0, lr=1e-2, seed=0):
    target = torch.randn(x.shape[0], 5, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(vistune.trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("mode", ["all", "row", "column"])
def test_masks_are_disjoint_equal_shares_that_tile_the_matrix(mode):
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    assign = split_assignment((6, 10), 4, mode, gen(1))
    masks = torch.stack([assign == i for i in range(4)])
    assert torch.equal(masks.sum(0), torch.ones(6, 10, dtype=torch.long))
    counts = {"all": masks.sum((1, 2)), "row": masks.sum(2), "column": masks.sum(1)}[mode]
    size = {"all": 60, "row": 10, "column": 6}[mode]
    assert set(counts.flatten().tolist()) <= {size // 4, math.ceil(size / 4)}
    assert torch.equal(split_assignment((6, 10), 4, mode, gen(1)), assign)  # seeded
    assert not torch.equal(split_assignment((6, 10), 4, mode, gen(2)), assign)


def test_identity_at_init_and_merge_at_init_is_the_plain_adapter():
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        base = model(x)
    torch.manual_seed(7)
    tuner = vistune.attach(model, MoSAConfig(bottleneck=4), name="m")
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), base)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), base)
    assert tuner.expert_counts() == {f"mlp.{i}": 4 for i in range(4)}
    merged = merge_mosa(model, "m")
    other = tiny_vit()
    torch.manual_seed(7)
    plain = AdapterTuner(AdapterConfig(bottleneck=4), other)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merged.state_dict().items())


def test_training_forward_uses_one_drawn_expert_per_block():
    model = tiny_vit()
    config = MoSAConfig(bottleneck=4, num_experts=3, seed=5)
    tuner = vistune.attach(model, config)
    randomize(tuner, std=0.3)
    replay = torch.Generator()
    replay.set_state(tuner.generator.get_state())
    model.train()
    ios = block_io(model, images())
    model.eval()

    def expert(lin: MoSALinear, i: int):
        mask = lin.assign == i
        return lin.weights[i] * mask + lin.init_weight * ~mask, lin.biases[i]

    with vistune.disabled(model), torch.no_grad():
        for i, (x, out) in enumerate(ios):
            adapter = tuner.mlp[str(i)]
            a = int(torch.randint(3, (1,), generator=replay))
            b = int(torch.randint(3, (1,), generator=replay))
            (wd, bd), (wu, bu) = expert(adapter.down, a), expert(adapter.up, b)

            def parallel(h):
                h = F.layer_norm(h, (32,), adapter.norm.weight, adapter.norm.bias)
                h = h @ wd.T + bd
                h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
                return config.adapter_scale * (h @ wu.T + bu)

            expected = reference_block(model.blocks[i], x, parallel=parallel)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_draws_are_reproducible_and_two_forwards_differ():
    x = images()
    outs = []
    for seed in (1, 1, 2):
        model = tiny_vit()
        tuner = vistune.attach(model, MoSAConfig(bottleneck=4, seed=seed))
        randomize(tuner, std=0.3)  # same values for every seed: only the draws differ
        model.train()
        with torch.no_grad():
            outs.append((model(x), model(x)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[0][1])  # a second forward draws other experts
    assert not torch.equal(outs[0][0], outs[2][0])
    clone = copy.deepcopy(model)  # the clone owns a copy of the generator state
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("share", [None, "down"])
def test_sparse_training_touches_only_masked_entries_even_with_weight_decay(share):
    model = tiny_vit()
    x = images(batch=4)
    tuner = vistune.attach(model, MoSAConfig(bottleneck=4, share=share))
    linears = mosa_linears(tuner)
    assert len(linears) == (4 if share else 8)
    target = torch.randn(4, 5)
    optimizer = torch.optim.AdamW(vistune.trainable_parameters(model), lr=1e-2, weight_decay=0.5)
    model.train()
    for _ in range(6):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        for lin in linears:
            with_grad = [i for i in range(lin.num_experts) if lin.weights[i].grad is not None]
            assert len(with_grad) == 1  # one drawn expert per projection and forward
            i = with_grad[0]
            assert torch.count_nonzero(lin.weights[i].grad[~lin.mask(i)]) == 0
        optimizer.step()
    changed = 0
    for lin in linears:
        for i in range(lin.num_experts):
            weight, mask = lin.expert_weight(i), lin.mask(i)
            assert torch.equal(weight[~mask], lin.init_weight[~mask])
            changed += int(not torch.equal(weight[mask], lin.init_weight[mask]))
    assert changed > len(linears)  # several experts per projection learned


@pytest.mark.parametrize("merge_mode, share", [("add", None), ("joint", None), ("add", "down"), ("joint", "down")])
def test_eval_output_equals_merged_adapter_with_plain_size(merge_mode, share, tmp_path):
    model = tiny_vit()
    x = images()
    config = MoSAConfig(style="houlsby", bottleneck=4, share=share, merge_mode=merge_mode, scale=0.7)
    vistune.attach(model, config, name="m")
    train_steps(model, x)
    with torch.no_grad():
        evaluated = model(x)
    merged = merge_mosa(model, "m")
    assert vistune.get_tuner(model, "m") is merged and type(merged) is AdapterTuner
    assert merged.config.tuner_type == "adapter" and merged.scale == 0.7 and not merged.training
    assert all(isinstance(a, BottleneckAdapter) for a in [*merged.attn.values(), *merged.mlp.values()])
    plain = AdapterTuner(config.adapter_config(), tiny_vit())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in plain.parameters())
    assert {id(p) for p in vistune.trainable_parameters(model)} == {id(p) for p in merged.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), evaluated, rtol=0, atol=1e-6)
    vistune.save_tuners(model, tmp_path / "merged")
    fresh = tiny_vit()
    vistune.load_tuners(fresh, tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_add_and_joint_merges_differ_after_training():
    model = tiny_vit()
    x = images()
    vistune.attach(model, MoSAConfig(bottleneck=4))
    train_steps(model, x)
    tuner = vistune.get_tuner(model)
    add, joint = tuner.merged_adapter_state("add"), tuner.merged_adapter_state("joint")
    lin = tuner.mlp["0"].up
    n = lin.num_experts
    assert torch.allclose(add["mlp.0.up.weight"], sum(lin.expert_weight(i) for i in range(n)) / n, atol=1e-7)
    assert torch.equal(joint["mlp.0.up.weight"], sum(lin.weights[i] * lin.mask(i) for i in range(n)))
    assert not torch.allclose(add["mlp.0.up.weight"], joint["mlp.0.up.weight"])


def test_hierarchical_expert_counts():
    config = MoSAConfig(bottleneck=4, hierarchical=True, min_experts=2, num_experts=4)
    assert config.expert_counts(4) == [2, 3, 3, 4]
    tuner = vistune.attach(tiny_vit(), config)
    assert tuner.expert_counts() == {"mlp.0": 2, "mlp.1": 3, "mlp.2": 3, "mlp.3": 4}
    assert [lin.num_experts for lin in mosa_linears(tuner)] == [2, 2, 3, 3, 3, 3, 4, 4]


def test_consistency_loss():
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    expected = 0.5 * (
        F.kl_div(lb, la, log_target=True, reduction="batchmean")
        + F.kl_div(la, lb, log_target=True, reduction="batchmean")
    )
    torch.testing.assert_close(mosa_consistency_loss(a, b), expected)
    torch.testing.assert_close(mosa_consistency_loss(a, b), mosa_consistency_loss(b, a))
    assert mosa_consistency_loss(a, a) == 0
    with pytest.raises(ValueError, match="differ in shape"):
        mosa_consistency_loss(a, b[:3])


def test_training_with_the_consistency_loss_reduces_the_task_loss():
    """Imitate a randomly set teacher adapter with two-draw training; the merged (eval) model must get close."""
    model = tiny_vit()
    x = images(batch=8)
    target = teacher_targets(model, x)
    vistune.attach(model, MoSAConfig(bottleneck=8, share="down"))
    optimizer = torch.optim.AdamW(vistune.trainable_parameters(model), lr=1e-2)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return F.mse_loss(model(x), target).item()

    before = eval_loss()
    for _ in range(25):
        model.train()
        logits_a, logits_b = model(x), model(x)
        loss = F.mse_loss(logits_a, target) + mosa_consistency_loss(logits_a, logits_b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.2 * before, (before, after)


def test_save_load_round_trip_keeps_experts_and_masks(tmp_path):
    model = tiny_vit()
    x = images()
    vistune.attach(model, MoSAConfig(bottleneck=4, split_mode="row", seed=3))
    train_steps(model, x)
    with torch.no_grad():
        evaluated = model(x)
    vistune.save_tuners(model, tmp_path / "mosa")
    fresh = tiny_vit()
    vistune.load_tuners(fresh, tmp_path / "mosa")
    loaded = vistune.get_tuner(fresh)
    assert isinstance(loaded, MoSATuner) and loaded.config == vistune.get_tuner(model).config
    with torch.no_grad():
        assert torch.equal(fresh(x), evaluated)
    for a, b in zip(mosa_linears(loaded), mosa_linears(vistune.get_tuner(model))):
        assert torch.equal(a.assign, b.assign)


def test_bad_input_is_refused_and_changes_nothing():
    model = tiny_vit()
    x = images()
    with pytest.raises(vistune.TunerError, match="no tuner named 'default'"):
        merge_mosa(model)
    plain = vistune.attach(model, AdapterConfig(bottleneck=4))
    randomize(plain)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(vistune.TunerError, match="no MoSA experts to merge"):
        merge_mosa(model)
    assert vistune.get_tuner(model) is plain
    mosa = vistune.attach(model, MoSAConfig(bottleneck=4), name="m")
    with pytest.raises(vistune.TunerError, match="merge_mosa"):
        vistune.merge_and_unload(model, "m")
    with pytest.raises(vistune.TunerError, match="merge mode"):
        merge_mosa(model, "m", mode="sum")
    assert vistune.get_tuner(model, "m") is mosa
    with torch.no_grad():
        assert torch.equal(model(x), before)
    with pytest.raises(vistune.TunerError, match="non-empty experts"):
        vistune.attach(model, MoSAConfig(bottleneck=2, num_experts=4, split_mode="row"), name="x")
    assert set(vistune.list_tuners(model)) == {"default", "m"}
    for bad in (dict(share="up"), dict(num_experts=0), dict(merge_mode="mean"), dict(split_mode="block"),
                dict(hierarchical=True, min_experts=5)):
        with pytest.raises(vistune.TunerError):
            MoSAConfig(**bad)
    vistune.detach(model)
    assert all_hooks(model) == 0


def test_a_trained_head_keeps_its_flag_after_merging():
    model = tiny_vit()
    vistune.attach(model, MoSAConfig(bottleneck=4))
    model.head.requires_grad_(True)
    merged = merge_mosa(model)
    assert model.head.weight.requires_grad and not model.blocks[0].mlp.fc1.weight.requires_grad
    assert all(p.requires_grad for p in merged.parameters())
