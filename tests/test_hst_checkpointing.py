"""HST under activation checkpointing of the ViT blocks: same loss and gradients as the plain run, hooks that
fire twice do not feed the side network twice, less kept for backward, exact detach, save/load."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vistune
from vistune.tuners.hst import HSTConfig, hst_features

from .conftest import randomize
from .test_hst import SMALL, images, tiny_vit
from .test_vit_site import one_thread  # noqa: F401 (autouse fixture)


def tuned(seed: int = 0, checkpointing: bool = True, **overrides):
    model = tiny_vit(seed, **overrides)
    torch.manual_seed(seed)
    tuner = vistune.attach(model, HSTConfig(**SMALL, num_classes=4, gradient_checkpointing=checkpointing))
    randomize(tuner, seed=seed + 1, std=0.05)  # meta tokens, LayerNorm deltas, side net all away from init
    model.train()
    return model, tuner


def loss_and_grads(model, tuner, x, labels):
    tuner.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tuner.named_parameters() if p.requires_grad}


def test_checkpointed_and_plain_give_the_same_loss_and_gradients():
    # drop path on: the recomputation must replay the same random masks (preserve_rng_state)
    model, tuner = tuned(drop_path_rate=0.2)
    assert model.grad_checkpointing is True
    x, labels = images(batch=4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    loss_ckpt, grads_ckpt = loss_and_grads(model, tuner, x, labels)
    model.set_grad_checkpointing(False)
    torch.manual_seed(5)
    loss_plain, grads_plain = loss_and_grads(model, tuner, x, labels)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    assert {"meta_tokens.0", "norm_weight", "norm_bias", "bridges.0.weight"} <= grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert grads_plain["norm_weight"].abs().sum() > 0 and grads_plain["meta_tokens.3"].abs().sum() > 0


def test_recomputation_does_not_feed_the_side_network_twice():
    model, tuner = tuned()
    x, labels = images(batch=2), torch.tensor([0, 1])
    inputs, outputs = [], []  # tokens in/out of the last block (registered after HST's hooks: what they made)
    model.blocks[-1].register_forward_pre_hook(lambda m, a: inputs.append(a[0].shape[1]))
    model.blocks[-1].register_forward_hook(lambda m, a, o: outputs.append(o.shape[1]))
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute whole blocks: every hook fires twice
        first, grads = loss_and_grads(model, tuner, x, labels)
    # forward + recomputation, the meta token inserted once and dropped once each time (cls + meta + 16 patches)
    assert inputs == [1 + 1 + 16, 1 + 1 + 16] and outputs == [1 + 16, 1 + 16]
    assert tuner._maps == [] and tuner._metas == [] and not tuner._recording  # nothing stale kept after backward
    second, again = loss_and_grads(model, tuner, x, labels)  # early stop on (the default)
    assert torch.equal(first, second)
    for name in grads:
        torch.testing.assert_close(grads[name], again[name], rtol=1e-6, atol=1e-7, msg=name)


def test_training_steps_match_plain_training():
    x, labels = images(batch=4), torch.tensor([0, 1, 2, 3])
    states = []
    for checkpointing in (True, False):
        model, tuner = tuned(checkpointing=checkpointing)
        assert bool(getattr(model, "grad_checkpointing", False)) is checkpointing
        opt = torch.optim.AdamW([p for p in tuner.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            opt.step()
        states.append(tuner.state_dict())
    for name, value in states[1].items():
        torch.testing.assert_close(states[0][name], value, rtol=1e-4, atol=1e-5, msg=name)


def _saved_bytes(model, x):
    total = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total[0]


def test_checkpointing_keeps_less_for_backward():
    model, _ = tuned()
    x = images(batch=4)
    with_ckpt = _saved_bytes(model, x)
    model.set_grad_checkpointing(False)
    plain = _saved_bytes(model, x)
    assert with_ckpt < 0.8 * plain


def test_detach_restores_the_backbone_and_its_checkpointing_setting():
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    vistune.attach(model, HSTConfig(**SMALL, num_classes=4))
    assert model.grad_checkpointing is True
    model.train()
    F.cross_entropy(model(images(batch=2)), torch.tensor([0, 1])).backward()
    vistune.detach(model)
    assert model.grad_checkpointing is False
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # a model the user already checkpoints stays checkpointed; the option off leaves the setting alone
    model.set_grad_checkpointing(True)
    vistune.attach(model, HSTConfig(**SMALL, gradient_checkpointing=False))
    assert model.grad_checkpointing is True
    vistune.detach(model)
    assert model.grad_checkpointing is True
    # backbone_grad=False: backward never enters the ViT, nothing to checkpoint
    plain = tiny_vit()
    vistune.attach(plain, HSTConfig(**SMALL, backbone_grad=False))
    assert plain.grad_checkpointing is False


def test_save_load_round_trip_keeps_the_option(tmp_path):
    model, tuner = tuned()
    vistune.save_tuners(model, tmp_path / "hst")
    fresh = tiny_vit()
    vistune.load_tuners(fresh, tmp_path / "hst")
    assert fresh.grad_checkpointing is True
    model.eval(), fresh.eval()
    x = images(batch=2)
    with torch.no_grad():  # inference with the flag on: a plain forward
        torch.testing.assert_close(model(x), fresh(x))
        feats = hst_features(fresh, x)
    assert [f.shape[1] for f in feats] == SMALL["stage_dims"]
    off = HSTConfig.from_dict({**tuner.config.to_dict(), "gradient_checkpointing": False})
    assert off.gradient_checkpointing is False
    legacy = {k: v for k, v in tuner.config.to_dict().items() if k != "gradient_checkpointing"}
    assert HSTConfig.from_dict(legacy).gradient_checkpointing is True
    with pytest.raises(vistune.TunerError, match="gradient_checkpointing"):
        HSTConfig(gradient_checkpointing="yes")


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpointing_is_refused_with_a_fix():
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    model, _ = tuned()
    previous = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        with pytest.raises(vistune.TunerError, match="set_reentrant_ckpt"):
            model(images(batch=2))
    finally:
        set_reentrant_ckpt(previous)
    assert model(images(batch=2)).shape == (2, 4)


def test_an_adaptformer_next_to_hst_keeps_exact_gradients_under_checkpointing():
    """parallel_mlp deltas of another tuner on the same ViT site are recomputed in backward like HST's hooks."""
    from vistune.tuners.adapter import AdapterConfig

    model, tuner = tuned()
    adapter = vistune.attach(model, AdapterConfig(style="adaptformer", bottleneck=4), name="adapter")
    randomize(adapter, seed=9, std=0.05)
    model.train()
    x, labels = images(batch=2), torch.tensor([0, 1])
    results = []
    for checkpointing in (True, False):
        model.set_grad_checkpointing(checkpointing)
        for module in (tuner, adapter):
            module.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        grads = {f"{t}.{n}": p.grad.clone() for t, m in (("hst", tuner), ("adapter", adapter))
                 for n, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_c, grads_c), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_c, loss_p, rtol=0, atol=1e-6)
    assert grads_c.keys() == grads_p.keys() and any(k.startswith("adapter.") for k in grads_p)
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("vit_ckpt, side_ckpt", [(False, True), (True, True)])
def test_side_checkpointing_gives_the_same_loss_and_gradients(vit_ckpt, side_ckpt):
    model, tuner = tuned(checkpointing=False, drop_path_rate=0.2)
    x, labels = images(batch=4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    loss_plain, grads_plain = loss_and_grads(model, tuner, x, labels)
    plain_bytes = _saved_bytes(model, x)
    tuner.config.side_checkpointing = side_ckpt
    model.set_grad_checkpointing(vit_ckpt)
    torch.manual_seed(5)
    loss_ckpt, grads_ckpt = loss_and_grads(model, tuner, x, labels)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys() and "stages.0.0.mlp.fc1.weight" in grads_plain
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert _saved_bytes(model, x) < 0.8 * plain_bytes
    with torch.no_grad():  # inference: no checkpointing, same output
        model.eval()
        out = model(x)
        tuner.config.side_checkpointing = False
        torch.testing.assert_close(model(x), out)


def test_side_checkpointing_with_backbone_grad_false():
    model = tiny_vit()
    torch.manual_seed(0)
    tuner = vistune.attach(model, HSTConfig(**SMALL, num_classes=4, backbone_grad=False, side_checkpointing=True))
    randomize(tuner, seed=1, std=0.05)
    model.train()
    x, labels = images(batch=2), torch.tensor([0, 1])
    loss_ckpt, grads_ckpt = loss_and_grads(model, tuner, x, labels)
    tuner.config.side_checkpointing = False
    loss_plain, grads_plain = loss_and_grads(model, tuner, x, labels)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)
