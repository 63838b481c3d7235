"""Training checkpoints round-trip through safetensors with no pickle involved."""
from __future__ import annotations

import pytest
import torch

from core.engine.checkpoint import TrainingCheckpoint, load_training_checkpoint, save_training_checkpoint, save_weights
from core.errors import InvalidModelFile


def _optimiser_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_restores_every_part(tmp_path) -> None:
    model, opt, sched = _optimiser_state()
    gen = torch.Generator().manual_seed(7)
    torch.rand(5, generator=gen)
    ckpt = TrainingCheckpoint(
        epoch=3, model_state=model.state_dict(), best_model_state={k: v * 2 for k, v in model.state_dict().items()},
        optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
        rng_state={"generator": gen.get_state()}, extra={"history": [{"epoch": 1, "w2": 0.5}], "upsilon_ema": 1.5},
        metrics={"w2_robust_accuracy": 0.5}, is_best=True, total_epochs=10)
    path = tmp_path / "state.safetensors"
    save_training_checkpoint(ckpt, path)
    assert path.read_bytes()[:1] != b"\x80" and b"PK\x03\x04" not in path.read_bytes()[:4]
    back = load_training_checkpoint(path)
    assert back.epoch == 3 and back.is_best and back.total_epochs == 10
    assert back.extra == ckpt.extra and back.metrics == ckpt.metrics
    for k, v in model.state_dict().items():
        assert torch.equal(back.model_state[k], v) and torch.equal(back.best_model_state[k], v * 2)
    # the optimiser and scheduler continue exactly as the originals would
    _, opt2, sched2 = _optimiser_state()
    opt2.load_state_dict(back.optimizer_state)
    sched2.load_state_dict(back.scheduler_state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for group_a, group_b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    gen2 = torch.Generator()
    gen2.set_state(back.rng_state["generator"])
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=gen2))


def test_damaged_or_foreign_files_are_refused(tmp_path) -> None:
    model, opt, sched = _optimiser_state()
    good = tmp_path / "good.safetensors"
    save_training_checkpoint(TrainingCheckpoint(1, model.state_dict(), model.state_dict(), opt.state_dict(),
                                                sched.state_dict(), {}), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(InvalidModelFile, match="not a readable safetensors"):
        load_training_checkpoint(truncated)
    weights_only = tmp_path / "weights.safetensors"
    save_weights(model.state_dict(), weights_only)
    with pytest.raises(InvalidModelFile, match="not a robustify training checkpoint"):
        load_training_checkpoint(weights_only)
    pickled = tmp_path / "pickled.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(InvalidModelFile):
        load_training_checkpoint(pickled)
