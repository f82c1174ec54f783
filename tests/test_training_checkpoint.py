import pytest
import torch

from vistune import CheckpointError
from vistune.training import (
    checkpoint_extra,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    resume_training,
    save_checkpoint,
)


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, optimizer, steps):
    for _ in range(steps):
        x = torch.randn(16, 4)  # draws from the global RNG, which the checkpoint restores
        loss = (model(x) - x.sum(1, keepdim=True)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_resume_matches_an_uninterrupted_run(tmp_path):
    model, optimizer = make()
    train(model, optimizer, 10)
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer = make()
    train(model, optimizer, 4)
    save_checkpoint(tmp_path, 4, {"model": model}, optimizer, extra={"note": "x"})
    train(model, optimizer, 3)  # work after the checkpoint is lost when the run is killed
    model, optimizer = make()
    state = load_checkpoint(latest_checkpoint(tmp_path), {"model": model}, optimizer)
    assert state == {"step": 4, "extra": {"note": "x"}}
    train(model, optimizer, 6)
    for got, want in zip(model.parameters(), expected):
        assert torch.equal(got, want)
    assert {f.suffix for f in (tmp_path / "checkpoint-4").iterdir()} == {".safetensors", ".json"}



def test_resume_training_restores_the_schedule_and_returns_the_next_step(tmp_path):
    model, optimizer = make()
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    assert resume_training(None, {"model": model}, optimizer, schedule) == 0  # a fresh run starts at step 0
    for _ in range(5):
        train(model, optimizer, 1)
        schedule.step()
    save_checkpoint(tmp_path, 5, {"model": model}, optimizer, extra={"lr_scheduler": schedule.state_dict()})

    model, optimizer = make()
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    logged = []
    assert resume_training(tmp_path / "checkpoint-5", {"model": model}, optimizer, schedule, logged.append) == 5
    assert schedule.last_epoch == 5 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert logged == [f"resumed from {tmp_path / 'checkpoint-5'} at step 5"]


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    model, optimizer = make()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": model}, optimizer, total_limit=2)
    (tmp_path / ".checkpoint-4.tmp").mkdir()  # a write that was killed half-way
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / ".checkpoint-4.tmp", {"model": model})
    assert latest_checkpoint(tmp_path / "missing") is None


def test_resolve_checkpoint_names_latest_relative_and_absolute_folders(tmp_path):
    model, optimizer = make()
    for step in (2, 10):
        save_checkpoint(tmp_path, step, {"model": model}, optimizer)
    assert resolve_checkpoint(tmp_path, None) is None
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"  # by step, not by name
    assert resolve_checkpoint(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    assert resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-2")) == tmp_path / "checkpoint-2"
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(FileNotFoundError, match="checkpoint-2, checkpoint-10|'checkpoint-2', 'checkpoint-10'"):
        resolve_checkpoint(tmp_path, "checkpoint-7")


def test_checkpoint_extra_reads_the_record_and_a_corrupt_one_is_a_clear_error(tmp_path):
    model, optimizer = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path, 3, {"model": model}, optimizer, extra={"seed": 7, "flags": {"method": "sc"}})
    assert checkpoint_extra(path) == {"seed": 7, "flags": {"method": "sc"}}
    state = path / "state.json"
    state.write_text(state.read_text()[:20])  # truncated
    for read in (lambda: checkpoint_extra(path), lambda: load_checkpoint(path, {"model": model}, optimizer)):
        with pytest.raises(CheckpointError, match="state.json is corrupt"):
            read()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        checkpoint_extra(tmp_path / "missing")
