"""Fast W-TRADES (attack_schedule "memory"): each image's perturbation carried across epochs,
re-projected into the batch's budget δ_B, and a short inner attack."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from cli.local import _config, namespace
from core.engine.attacks.common import input_gradient
from core.engine.attacks.wpgd import allocate_budget, attack_batch
from core.engine.config import FinetuneConfig
from core.engine.data.datasets import augment_crop_flip, crop_flip_draw, to_unit_float
from core.engine.device import Compute
from core.engine.losses import attack_loss
from core.engine.recipes.finetune import PerturbationMemory, RandomWeightPerturbation, finetune, w_trades_step
from core.engine.threats import Threat
from core.engine.zoo import create_model

DELTA = 0.1
CPU = Compute.resolve("cpu", amp="off")
THREAT = Threat("w2-linf", DELTA)


@pytest.fixture(scope="module")
def setup(digits_small_cnn):
    return digits_small_cnn


def _budget(ratio: float):
    """A W-PGD-Budget stand-in that gives δ_B = ratio·δ whatever Υ_B is."""
    return lambda upsilon_b: torch.full_like(upsilon_b, ratio * DELTA)


# ------------------------------------------------------------------ the schedule's pieces
def test_crop_flip_draw_is_the_augmentation_and_undo_returns_what_the_crop_showed() -> None:
    x = torch.rand(6, 1, 8, 8)
    plain = augment_crop_flip(x, generator=torch.Generator().manual_seed(3))
    drawn = crop_flip_draw(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(augment_crop_flip(x, draw=drawn), plain)   # the same random stream, bit for bit

    before = torch.full_like(x, -1.0)
    back = drawn.undo(plain, into=before)
    shown = drawn.undo(torch.ones_like(plain), into=torch.zeros_like(x)).bool()   # pixels the crop kept
    assert torch.equal(back[shown], x[shown])            # every pixel the crop showed comes back in place
    assert (back[~shown] == -1.0).all()                  # the ones it cut away keep their old value
    assert shown.sum(dim=(1, 2, 3)).min() >= 4 * 4       # (a shift of at most 4 on 8×8 keeps ≥ 4×4)
    assert torch.equal(drawn.apply(back), plain)         # and cropping again gives the augmented batch


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.5])
def test_a_remembered_start_is_reprojected_into_the_batch_ball(setup, ratio: float) -> None:
    model, data = setup
    x, y = to_unit_float(data.train_x[:64], "cpu"), data.train_y[:64]
    # a stored perturbation twice the size of the largest possible batch budget
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 6 * DELTA
    adv = attack_batch(model.eval(), x, y, THREAT, loss_fn=attack_loss("redlr"), steps=1, step_ratio=1.0,
                       compute=CPU, budget=_budget(ratio), start=e)
    delta_b = ratio * DELTA
    assert float(adv.delta) == pytest.approx(delta_b)
    expected = THREAT.project((x + e).clamp(0, 1), x, torch.tensor(delta_b))
    assert torch.equal(adv.x_start, expected)
    for point in (adv.x_start, adv.x_adv):      # the start and the attack's output lie in the δ_B ball
        assert THREAT.distance(point, x) <= delta_b * (1 + 1e-5)
        assert point.min() >= 0 and point.max() <= 1
    assert THREAT.distance(adv.x_start, x) == pytest.approx(delta_b, rel=1e-4)   # it was outside: now on the sphere

    inside = (adv.x_adv - x) * 0.5          # a start already inside the ball is left as it is
    again = attack_batch(model, x, y, THREAT, loss_fn=attack_loss("redlr"), steps=1, step_ratio=1.0,
                         compute=CPU, budget=_budget(ratio), start=inside)
    assert (again.x_start - (x + inside).clamp(0, 1)).abs().max() < 1e-6


def test_memory_persists_across_epochs_in_the_unaugmented_frame(setup) -> None:
    model, data = setup
    x_all, y_all = to_unit_float(data.train_x[:96], "cpu"), data.train_y[:96]
    memory = PerturbationMemory(96, (1, 8, 8), torch.device("cpu"))
    assert memory.nbytes == 96 * 64 * 2 and memory.remembered() == 0
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_schedule="memory",
                            weight_perturbation=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    idx = torch.tensor([5, 90, 17, 33, 64, 2, 71, 48] * 4)[:32].unique()
    generator = torch.Generator().manual_seed(0)
    stored = []
    for epoch in range(2):
        crop = crop_flip_draw(idx.numel(), generator=generator)
        x = augment_crop_flip(x_all[idx], draw=crop)
        start = memory.recall(idx, crop)
        if epoch == 0:
            assert not start.any()          # nothing remembered yet: the attack starts at the clean images
        else:                               # the stored perturbation, moved with this epoch's crop and flip
            assert torch.equal(start, crop.apply(stored[0].float()))
        _, adv, _ = w_trades_step(model, optimizer, x, y_all[idx], threat=THREAT, config=config, compute=CPU,
                                  perturbation=RandomWeightPerturbation(model, 0.0), generator=generator,
                                  upsilon_ema=torch.tensor(0.0, dtype=torch.float64), start=start)
        if epoch == 1:                      # re-projected into this batch's ball before the step
            expected = THREAT.project((x + start).clamp(0, 1), x, adv.delta.float())
            assert (adv.x_start - expected).abs().max() < 1e-6
            assert THREAT.distance(adv.x_start, x) <= float(adv.delta) * (1 + 1e-5)
        memory.store(idx, adv.x_adv - x, crop)
        stored.append(memory.table[idx].clone())
        assert memory.remembered() > 0      # (an image the crop pushed off its own frame may be misclassified
                                            # at the clean point: ReDLR gives it no gradient and no perturbation)
    # float16 storage: within its rounding of the float32 perturbation on the pixels the crop showed
    shown = crop.undo(torch.ones_like(x), into=torch.zeros(idx.numel(), 1, 8, 8)).bool()
    back = crop.undo(adv.x_adv - x, into=torch.zeros(idx.numel(), 1, 8, 8))
    assert (stored[1].float() - back)[shown].abs().max() <= 1e-3 * DELTA * 3


def test_forward_backward_passes_per_image_per_step(setup) -> None:
    """K attack passes (eval mode, input gradient) + 1 outer step (x and x' forward, one backward)."""
    model, data = setup
    x, y = to_unit_float(data.train_x[:64], "cpu"), data.train_y[:64]
    counts = {"attack": 0, "outer": 0}

    def count(module, inputs, output):
        counts["outer" if module.training else "attack"] += inputs[0].shape[0]

    handle = model.register_forward_hook(count)
    try:
        for schedule, steps, passes in (("standard", None, 11), ("memory", None, 2), ("memory", 2, 3),
                                        ("allocate", None, 2)):
            counts.update(attack=0, outer=0)
            extra = {} if steps is None else {"attack_steps": steps}
            config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_schedule=schedule,
                                    weight_perturbation=0.0, **extra)
            start = torch.zeros_like(x) if schedule == "memory" else None
            w_trades_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, threat=THREAT, config=config,
                          compute=CPU, perturbation=RandomWeightPerturbation(model, 0.0),
                          generator=torch.Generator().manual_seed(0), upsilon_ema=None, start=start)
            assert counts["attack"] / 64 == config.attack_steps == passes - 1
            assert counts["outer"] / 64 == 2          # p(x) and p(x′) in one outer forward/backward
    finally:
        handle.remove()
        model.eval()


def test_standard_schedule_is_the_previous_attack_bit_for_bit(setup) -> None:
    """attack_batch without a start runs exactly the loop it ran before the memory existed."""
    model, data = setup
    x, y = to_unit_float(data.train_x[:64], "cpu"), data.train_y[:64]
    loss_fn = attack_loss("redlr")
    adv = attack_batch(model.eval(), x, y, THREAT, loss_fn=loss_fn, steps=4, step_ratio=2.0, compute=CPU,
                       budget=_budget(1.3))
    ref, delta_b = x, None
    for t in range(4):
        g, _, _ = input_gradient(model, ref, y, loss_fn, CPU)
        dual = THREAT.dual_norms(g)
        if t == 0:
            delta_b = _budget(1.3)(THREAT.sensitivity(dual))
        scale = (2.0 * delta_b / 4 / THREAT.normaliser(dual).clamp_min(1e-30)).to(x.dtype)
        ref = THREAT.project(ref + THREAT.raw_direction(g, dual) * scale, x, delta_b.to(x.dtype))
    assert torch.equal(adv.x_adv, ref) and adv.x_start is None
    assert FinetuneConfig().attack_schedule == "standard" and FinetuneConfig().attack_steps == 10


# ------------------------------------------------------------------ the option
def test_schedule_option_defaults_and_invalid_combinations() -> None:
    assert FinetuneConfig(attack_schedule="memory").attack_steps == 1          # its own default
    assert FinetuneConfig(attack_schedule="memory", attack_steps=2).attack_steps == 2
    again = FinetuneConfig.model_validate(FinetuneConfig(attack_schedule="memory").model_dump(mode="json"))
    assert again.attack_steps == 1                                              # a stored job reads the same
    with pytest.raises(ValidationError, match="needs epochs >= 2"):
        FinetuneConfig(attack_schedule="memory", epochs=1)
    with pytest.raises(ValidationError, match="attack_schedule"):
        FinetuneConfig(attack_schedule="atta")
    args = namespace("finetune", ["--out", "x", "--set", "attack_schedule=memory", "--set", "epochs=3"])
    config = _config(args, FinetuneConfig)
    assert (config.attack_schedule, config.attack_steps, config.epochs) == ("memory", 1, 3)


def test_a_small_memory_finetune_on_digits_improves_w2_robustness(setup) -> None:
    model, data = setup
    start = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    start.load_state_dict(model.state_dict())
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_schedule="memory",
                            epochs=4, batch_size=32, lr=0.0025, beta=3.0, augment="none", validation_examples=150,
                            eval_wpgd_steps=10, eval_pgd_steps=2, test_wpgd_steps=20, test_pgd_steps=2,
                            budget_subset=256, amp="off", evaluation="quick", seed=0)
    result = finetune(config, start, data, device="cpu")
    memory = result.provenance["perturbation_memory"]
    n_fit = result.provenance["examples"]["train"]
    assert memory["bytes"] == n_fit * 64 * 2 and memory["images_remembered"] >= n_fit - 32
    assert memory["started_empty_on_resume"] is False
    # "improved": the paired 95 % interval of the test W2 change lies above zero (and no guard fired)
    assert result.improved and result.after["w2_robust_accuracy"] >= result.before["w2_robust_accuracy"] + 0.03
    assert result.config["attack_schedule"] == "memory" and result.config["attack_steps"] == 1


def test_a_resumed_memory_run_finishes_with_its_memory_started_empty(setup, tmp_path) -> None:
    from core.engine.checkpoint import load_training_checkpoint
    from core.engine.hooks import Hooks

    model, data = setup
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_schedule="memory", epochs=3,
                            batch_size=32, lr=0.0025, beta=3.0, augment="none", train_examples=300,
                            validation_examples=60, test_examples=60, eval_wpgd_steps=3, eval_pgd_steps=1,
                            test_wpgd_steps=3, test_pgd_steps=1, budget_subset=64, amp="off", evaluation="quick",
                            seed=0)

    def fresh():
        m = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
        m.load_state_dict(model.state_dict())
        return m

    uninterrupted = finetune(config, fresh(), data, device="cpu")
    path = tmp_path / "state.safetensors"

    class Stop(Exception):
        pass

    def crash_after_first_epoch(ckpt) -> None:
        ckpt.save(path)
        if ckpt.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        finetune(config, fresh(), data, Hooks(checkpoint=crash_after_first_epoch), device="cpu")
    resumed = finetune(config, fresh(), data, device="cpu", resume=load_training_checkpoint(path))
    assert resumed.epochs_completed == 3 and len(resumed.history) == 3
    assert resumed.provenance["perturbation_memory"]["started_empty_on_resume"] is True
    assert uninterrupted.provenance["perturbation_memory"]["started_empty_on_resume"] is False
    # the first epoch is the same run; the second starts from the clean images instead of the memory
    assert resumed.history[0]["train_loss"] == uninterrupted.history[0]["train_loss"]
    assert resumed.history[1]["train_loss"] != uninterrupted.history[1]["train_loss"]


# ------------------------------------------------------------------ attack_schedule "allocate"
def test_allocate_budget_serves_the_cheapest_points_first_and_the_next_one_the_rest() -> None:
    delta = torch.tensor(0.1, dtype=torch.float64)
    wanted = torch.tensor([0.05, float("inf"), 0.1, 0.2, 0.01])
    sizes = allocate_budget(wanted, delta, THREAT)
    # budget n·δ² = 0.05: 0.01² + 0.05² + 0.1² = 0.0126 fit whole, 0.2² = 0.04 does not: it gets the rest
    assert sizes[[4, 0, 2]].tolist() == pytest.approx([0.01, 0.05, 0.1])
    assert sizes[1] == 0.0
    assert sizes[3].item() == pytest.approx((0.05 - 0.0126) ** 0.5, rel=1e-5)
    assert sizes.double().square().mean().item() == pytest.approx(0.1 ** 2, rel=1e-5)
    # budget to spare: everyone gets what they want; nothing wanted: nothing given
    assert allocate_budget(torch.tensor([0.01, 0.02]), delta, THREAT).tolist() == pytest.approx([0.01, 0.02])
    assert allocate_budget(torch.full((3,), float("inf")), delta, THREAT).tolist() == [0.0, 0.0, 0.0]


def test_the_allocation_step_spends_the_budget_where_it_flips_points(setup) -> None:
    """One gradient, then the images nearest the boundary (first order) get γ times their distance:
    inside the W2 ball, fooled images untouched, and more images flipped than by W-FGSM's
    gradient-proportional spread of the same budget."""
    model, data = setup
    model.eval()
    x, y = to_unit_float(data.train_x[:256], "cpu"), data.train_y[:256]
    loss_fn = attack_loss("redlr")
    g, logits, loss = input_gradient(model, x, y, loss_fn, CPU)
    adv = attack_batch(model, x, y, THREAT, loss_fn=loss_fn, steps=1, step_ratio=1.0, compute=CPU, allocate=1.5)
    e = adv.x_adv - x
    assert THREAT.distance(adv.x_adv, x) <= DELTA * (1 + 1e-5)
    assert THREAT.distance(adv.x_adv, x) >= DELTA * 0.9            # the budget is spent
    wrong = logits.argmax(1) != y
    assert wrong.any() and e[wrong].abs().max() == 0.0
    moved = e.flatten(1).abs().amax(1) > 0
    assert 0 < int(moved.sum()) < int((~wrong).sum())             # concentrated, not spread over all
    reach = -loss / THREAT.dual_norms(g)
    assert reach[moved].max() <= reach[~moved & ~wrong].min() + 1e-6   # the nearest ones first
    fgsm = attack_batch(model, x, y, THREAT, loss_fn=loss_fn, steps=1, step_ratio=1.0, compute=CPU)
    with torch.no_grad():
        robust_alloc = (model(adv.x_adv).argmax(1) == y).float().mean().item()
        robust_fgsm = (model(fgsm.x_adv).argmax(1) == y).float().mean().item()
    assert robust_alloc < robust_fgsm - 0.02


def test_allocate_option_defaults_and_invalid_combinations() -> None:
    config = FinetuneConfig(attack_schedule="allocate")
    assert (config.attack_steps, config.attack_overshoot) == (1, 1.5)
    assert FinetuneConfig(attack_schedule="allocate", attack_steps=3).attack_steps == 3
    with pytest.raises(ValidationError, match="needs a w2-linf or w2-l2 threat_model"):
        FinetuneConfig(attack_schedule="allocate", threat_model={"kind": "linf"})
    with pytest.raises(ValidationError, match="attack_loss must be 'redlr' or 'dlr'"):
        FinetuneConfig(attack_schedule="allocate", attack_loss="kl")
    with pytest.raises(ValidationError, match="attack_overshoot"):
        FinetuneConfig(attack_schedule="allocate", attack_overshoot=0.5)


def test_a_small_allocate_finetune_on_digits_improves_w2_robustness(setup) -> None:
    model, data = setup
    start = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    start.load_state_dict(model.state_dict())
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_schedule="allocate",
                            attack_overshoot=1.5, epochs=4, batch_size=32, lr=0.0025, beta=3.0, augment="none",
                            validation_examples=150, eval_wpgd_steps=10, eval_pgd_steps=2, test_wpgd_steps=20,
                            test_pgd_steps=2, budget_subset=256, amp="off", evaluation="quick", seed=0)
    result = finetune(config, start, data, device="cpu")
    assert result.improved and result.after["w2_robust_accuracy"] >= result.before["w2_robust_accuracy"] + 0.03
    assert result.config["attack_schedule"] == "allocate" and result.config["attack_steps"] == 1
