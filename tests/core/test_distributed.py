"""Data parallelism computes what one process computes: 2 gloo ranks on the CPU against 1 process.

Each rank holds half of the set (W-PGD) or half of every global batch (W-TRADES); the whole-set
quantities (normaliser, projection radius, Υ_B, δ_B, accuracies) are all-reduced. Tolerances:
the float32 forward/backward passes see other batch shapes on a rank than in one process, and
sums are added in another order, so values agree to float32 rounding (about 1e-6 relative), not
bit for bit; accuracies, counts of whole images, agree exactly.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from core.engine.attacks.wpgd import allocate_budget, w_pgd
from core.engine.config import FinetuneConfig
from core.engine.data.datasets import load_dataset
from core.engine.distributed import SINGLE, World, init_world, shutdown_world
from core.engine.recipes.finetune import finetune
from core.engine.recipes.standard import train_standard
from core.engine.threats import Threat
from core.engine.zoo import create_model
from tests.core.conftest import TinyCNN

THREAT = Threat("w2-linf", 0.1)
WTRADES = dict(threat_model={"kind": "w2-linf", "delta": 0.1}, epochs=1, batch_size=64, lr=0.003, beta=3.0,
               attack_steps=3, augment="crop_flip", train_examples=512, budget_subset=256, validation_examples=200,
               test_examples=200, eval_wpgd_steps=5, eval_pgd_steps=3, test_wpgd_steps=5, test_pgd_steps=3, amp="off",
               evaluation="quick", seed=0)

# fast W-TRADES: the second epoch starts from the first epoch's perturbations (gathered from both ranks)
WTRADES_MEMORY = {**WTRADES, "epochs": 2, "attack_schedule": "memory", "train_examples": 320,
                  "validation_examples": 64, "test_examples": 64}

# fast W-TRADES by budget allocation: the global batch's images compete for one budget, across ranks
WTRADES_ALLOCATE = {**WTRADES, "attack_schedule": "allocate", "attack_overshoot": 1.5, "augment": "none"}


# ------------------------------------------------------------------------------ the ranks
def _rank(rank: int, size: int, work: str, task: str, inputs: dict) -> None:
    torch.set_num_threads(1)
    world = init_world(rank, size, str(Path(work) / "rendezvous"), backend="gloo")
    try:
        torch.save(_run(task, inputs, world), Path(work) / f"rank{rank}.pt")
    finally:
        shutdown_world(world)


def _run(task: str, inputs: dict, world: World) -> dict:
    if task == "allocate-budget":
        return {"sizes": allocate_budget(world.shard(inputs["wanted"]), inputs["delta"], THREAT.across(world))}
    if task == "wpgd":
        model = TinyCNN()
        model.load_state_dict(inputs["state"])
        model.eval()
        x, y = world.shard(inputs["x"]), world.shard(inputs["y"])
        res = w_pgd(model, x, y, THREAT.across(world), steps=10, batch_size=64, keep_final=True)
        return {"result": dict(res.to_dict()), "x_final": res.x_final}
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict(inputs["state"])
    fields = {"wtrades-memory": WTRADES_MEMORY, "wtrades-allocate": WTRADES_ALLOCATE}.get(task, WTRADES)
    config = FinetuneConfig(**fields)
    res = finetune(config, model, inputs["data"], device="cpu", world=world)
    return {"weights": res.last_model_state, "epoch": res.history[0], "history": res.history,
            "memory": res.provenance.get("perturbation_memory")}


def _two_ranks(tmp_path: Path, task: str, inputs: dict) -> list[dict]:
    # fork: the ranks inherit the imported modules and the inputs (no CUDA here, one thread each);
    # the worker starts its ranks as fresh processes instead (worker/ddp.py)
    mp.start_processes(_rank, args=(2, str(tmp_path), task, inputs), nprocs=2, join=True, start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


# ------------------------------------------------------------------------------ W-PGD
def test_wpgd_on_two_ranks_follows_the_single_process_trajectory(trained_tiny, digits, tmp_path):
    _, _, x_test, y_test = digits
    x, y = x_test[:200].contiguous(), y_test[:200].contiguous()
    one = w_pgd(trained_tiny, x, y, THREAT, steps=10, batch_size=64, keep_final=True)
    ranks = _two_ranks(tmp_path, "wpgd", {"state": trained_tiny.state_dict(), "x": x, "y": y})

    for r in ranks:  # every rank reports the whole set's numbers
        got = r["result"]
        assert got["accuracy_trajectory"] == one.accuracy_trajectory
        assert got["robust_accuracy"] == one.robust_accuracy < one.clean_accuracy
        assert got["loss_trajectory"] == pytest.approx(one.loss_trajectory, rel=1e-5)
        assert got["sensitivity"] == pytest.approx(one.sensitivity, rel=1e-6)
        assert got["final_distance"] == pytest.approx(one.final_distance, rel=1e-5)
        assert got["final_distance"] <= THREAT.delta * (1 + 1e-6)  # projected onto the global ball
    x_final = torch.cat([r["x_final"] for r in ranks])
    assert (x_final - one.x_final).abs().max() < 1e-5
    # per-rank normalisation would be a different attack: its projection would put each half on the ball
    local = [w_pgd(trained_tiny, half_x, half_y, THREAT, steps=10, batch_size=64, keep_final=True)
             for half_x, half_y in ((x[:100], y[:100]), (x[100:], y[100:]))]
    assert (torch.cat([r.x_final for r in local]) - one.x_final).abs().max() > 1e-3


# ------------------------------------------------------------------------------ W-TRADES
@pytest.fixture(scope="module")
def digits_start(tmp_path_factory) -> tuple:
    """Digits and the weights of a small CNN trained normally on it: where both W-TRADES runs start."""
    data = load_dataset("digits", data_dir=tmp_path_factory.mktemp("data"))
    torch.manual_seed(0)
    base = train_standard(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8), data,
                          epochs=3, seed=0)
    return data, {k: v.clone() for k, v in base.state_dict().items()}


def _single(state: dict) -> torch.nn.Module:
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict(state)
    return model


def test_wtrades_first_epoch_on_two_ranks_matches_one_process(digits_start, tmp_path):
    data, state = digits_start
    single = _single(state)
    one = finetune(FinetuneConfig(**WTRADES), single, data, device="cpu", world=SINGLE)
    ranks = _two_ranks(tmp_path, "wtrades", {"state": state, "data": data})

    moved = max((one.last_model_state[k] - state[k]).abs().max().item() for k in state)
    assert moved > 1e-3  # the epoch changed the weights ...
    for r in ranks:
        for k, w in one.last_model_state.items():  # ... and both ranks changed them as one process did
            assert (r["weights"][k] - w).abs().max().item() < 1e-5 * max(1.0, w.abs().max().item()), k
        epoch, ref = r["epoch"], one.history[0]
        assert epoch["clean_accuracy"] == ref["clean_accuracy"]
        assert epoch["w2_robust_accuracy"] == ref["w2_robust_accuracy"]
        assert epoch["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        # δ_B over the global batch
        assert epoch["mean_batch_delta"] == pytest.approx(ref["mean_batch_delta"], rel=1e-5)
        assert epoch["upsilon_ema"] == pytest.approx(ref["upsilon_ema"], rel=1e-5)            # from global Υ_B
        # the validation's l∞ PGD starts at the clean images (no random start): the same on two ranks
        assert epoch["linf_robust_accuracy"] == ref["linf_robust_accuracy"]


def test_memory_schedule_on_two_ranks_matches_one_process(digits_start, tmp_path):
    data, state = digits_start
    single = _single(state)
    one = finetune(FinetuneConfig(**WTRADES_MEMORY), single, data, device="cpu", world=SINGLE)
    ranks = _two_ranks(tmp_path, "wtrades-memory", {"state": state, "data": data})

    remembered = one.provenance["perturbation_memory"]["images_remembered"]
    assert remembered >= 20   # (crop-and-flipped 8×8 digits are mostly misclassified: ReDLR leaves those unmoved)
    for r in ranks:  # each rank holds the whole memory: its shard's perturbations and the other rank's
        assert r["memory"]["images_remembered"] == remembered
        for k, w in one.last_model_state.items():   # so the second epoch starts where one process starts it
            assert (r["weights"][k] - w).abs().max().item() < 1e-4 * max(1.0, w.abs().max().item()), k
        for got, ref in zip(r["history"], one.history, strict=True):
            assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
            assert got["mean_batch_delta"] == pytest.approx(ref["mean_batch_delta"], rel=1e-4)


def test_allocate_schedule_on_two_ranks_matches_one_process(digits_start, tmp_path):
    data, state = digits_start
    one = finetune(FinetuneConfig(**WTRADES_ALLOCATE), _single(state), data, device="cpu", world=SINGLE)
    ranks = _two_ranks(tmp_path, "wtrades-allocate", {"state": state, "data": data})

    moved = max((one.last_model_state[k] - state[k]).abs().max().item() for k in state)
    assert moved > 1e-3
    for r in ranks:   # one global allocation: per-shard budgets would give other perturbations and weights
        for k, w in one.last_model_state.items():
            assert (r["weights"][k] - w).abs().max().item() < 1e-4 * max(1.0, w.abs().max().item()), k
        got, ref = r["epoch"], one.history[0]
        assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
        assert got["mean_batch_delta"] == pytest.approx(ref["mean_batch_delta"], rel=1e-4)


def test_allocate_budget_on_two_ranks_is_one_global_allocation(tmp_path):
    """Shards of different sizes (4 and 5 of 9): the cheapest points of the whole batch come first."""
    wanted = torch.tensor([0.3, 0.01, float("inf"), 0.05, 0.2, 0.02, 0.15, 0.04, 0.5], dtype=torch.float64)
    delta = torch.tensor(0.1, dtype=torch.float64)
    one = allocate_budget(wanted, delta, THREAT)
    ranks = _two_ranks(tmp_path, "allocate-budget", {"wanted": wanted, "delta": delta})
    assert torch.equal(torch.cat([r["sizes"] for r in ranks]), one)
    assert [r["sizes"].numel() for r in ranks] == [4, 5]
    assert 0 < int((one == wanted).sum()) < 8          # some points served whole, the dearest not at all
