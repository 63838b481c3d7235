"""The pieces of one W-TRADES step: W-PGD-Budget, the split loss, the KL start, weight noise."""
from __future__ import annotations

import pytest
import torch

from core.engine.attacks.wpgd import attack_batch
from core.engine.config import FinetuneConfig
from core.engine.data.datasets import to_unit_float
from core.engine.data.sampling import stratified_indices
from core.engine.device import Compute
from core.engine.losses import attack_loss, cross_entropy, kl_divergence, redlr
from core.engine.recipes.finetune import RandomWeightPerturbation, estimate_global_sensitivity, w_trades_step
from core.engine.threats import Threat
from core.engine.zoo import create_model

DELTA = 0.1
CPU = Compute.resolve("cpu", amp="off")


@pytest.fixture(scope="module")
def setup(digits_small_cnn):
    model, data = digits_small_cnn
    x = to_unit_float(data.train_x[:64], "cpu")
    return model, data, x, data.train_y[:64]


def _frozen_step(model, x, y, config: FinetuneConfig, upsilon_ema):
    """w_trades_step with lr = 0, so the weights stay as they are and the step can be checked."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return w_trades_step(model, optimizer, x, y, threat=Threat("w2-linf", DELTA), config=config, compute=CPU,
                         perturbation=RandomWeightPerturbation(model, config.weight_perturbation),
                         generator=torch.Generator().manual_seed(0), upsilon_ema=upsilon_ema)


def _batch_sensitivity(model, x, y) -> float:
    """Υ_B = (mean_i ‖∇_x ReDLR_i‖_1²)^{1/2}, computed directly."""
    model.eval()
    xa = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(redlr(model(xa), y).sum(), xa)
    return float(g.flatten(1).abs().sum(1).double().square().mean().sqrt())


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0, 100.0, 0.0])
def test_batch_budget_is_delta_times_sensitivity_ratio_clamped(setup, ratio: float) -> None:
    model, _, x, y = setup
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_steps=2,
                            weight_perturbation=0.0, budget_cap=3.0)
    upsilon_b = _batch_sensitivity(model, x, y)
    ema = torch.tensor(upsilon_b / ratio if ratio > 0 else 0.0, dtype=torch.float64)
    _, adv, new_ema = _frozen_step(model, x, y, config, ema)
    assert float(adv.sensitivity) == pytest.approx(upsilon_b, rel=1e-5)
    decay = config.budget_ema_decay
    if ratio == 0.0:                    # no estimate yet: the fixed radius, and Ῡ starts at Υ_B
        assert float(adv.delta) == pytest.approx(DELTA, rel=1e-6)
        assert float(new_ema) == pytest.approx(upsilon_b, rel=1e-6)
    else:                               # δ_B = δ·Υ_B/Ῡ in [0, 3δ]; Ῡ then averages Υ_B clamped at 3·Ῡ
        assert float(adv.delta) == pytest.approx(min(DELTA * ratio, 3 * DELTA), rel=1e-5)
        seen = min(upsilon_b, 3 * float(ema))
        assert float(new_ema) == pytest.approx(decay * float(ema) + (1 - decay) * seen, rel=1e-6)
    assert Threat("w2-linf", 1.0).distance(adv.x_adv, x) <= float(adv.delta) * (1 + 1e-5)


def test_fixed_budget_returns_no_estimate(setup) -> None:
    model, _, x, y = setup
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_steps=2,
                            weight_perturbation=0.0, budget="fixed")
    _, adv, new_ema = _frozen_step(model, x, y, config, None)
    assert new_ema is None and float(adv.delta) == pytest.approx(DELTA)


def test_global_sensitivity_estimate_is_the_mean_batch_sensitivity(setup) -> None:
    model, data, _, _ = setup
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, budget_subset=300, batch_size=128)
    estimate = estimate_global_sensitivity(model, data.train_x, data.train_y, Threat("w2-linf", DELTA), config,
                                           CPU, torch.Generator().manual_seed(5), augment=False)
    idx = torch.from_numpy(stratified_indices(data.train_y.numpy(), 300, config.seed))
    x, y = to_unit_float(data.train_x[idx], "cpu"), data.train_y[idx]
    # the quantity the running estimate averages: Υ_B of batches of the training batch size
    direct = [_batch_sensitivity(model, x[i:i + 128], y[i:i + 128]) for i in (0, 128, 256)]
    assert float(estimate) == pytest.approx(sum(direct) / 3, rel=1e-5)


def test_split_loss_attack_maximises_its_loss_and_outer_step_is_ce_plus_beta_kl(setup) -> None:
    model, _, x, y = setup
    beta = 4.0
    results = {}
    for name in ("redlr", "ce"):
        config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_steps=3, beta=beta,
                                attack_loss=name, weight_perturbation=0.0, budget="fixed")
        loss, adv, _ = _frozen_step(model, x, y, config, None)
        with torch.no_grad():
            logits, logits_adv = model(x), model(adv.x_adv)
        expected = cross_entropy(logits, y).mean() + beta * kl_divergence(logits, logits_adv).mean()
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        results[name] = adv.x_adv
        # the inner attack raised its own loss
        fn = attack_loss(name)
        with torch.no_grad():
            assert fn(model(adv.x_adv), y).mean() > fn(model(x), y).mean()
    assert not torch.equal(results["redlr"], results["ce"])


def test_kl_inner_loss_needs_and_gets_a_random_start(setup) -> None:
    model, _, x, y = setup
    model.eval()
    with torch.no_grad():
        kl = attack_loss("kl", logits_clean=model(x))
    threat = Threat("w2-linf", DELTA)
    # at x' = x the KL gradient vanishes (up to rounding): the attack's first step sees no signal ...
    still = attack_batch(model, x, y, threat, loss_fn=kl, steps=1, step_ratio=2.0, compute=CPU)
    assert float(still.sensitivity) < 1e-4
    # ... from x + 0.001·N(0, I) it does
    started = attack_batch(model, x, y, threat, loss_fn=kl, steps=1, step_ratio=2.0, compute=CPU,
                           start_noise=0.001, generator=torch.Generator().manual_seed(0))
    assert float(started.sensitivity) > 100 * float(still.sensitivity)
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, attack_steps=3, attack_loss="kl",
                            weight_perturbation=0.0, budget="fixed")
    _, adv, _ = _frozen_step(model, x, y, config, None)
    assert float(adv.sensitivity) > 100 * float(still.sensitivity)   # the recipe starts from the noise
    moved = threat.distance(adv.x_adv, x)
    assert 0.01 * DELTA < moved <= DELTA * (1 + 1e-6)


def test_random_weight_perturbation_has_relative_size_gamma_and_restores_exactly(setup) -> None:
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    rwp = RandomWeightPerturbation(model, 0.02)
    rwp.apply(torch.Generator().manual_seed(3))
    for name, p in model.named_parameters():
        if p.dim() > 1:
            rel = float((p.detach() - before[name]).norm() / before[name].norm())
            assert rel == pytest.approx(0.02, rel=1e-4), name
        else:
            assert torch.equal(p, before[name]), name        # biases are not perturbed
    rwp.restore()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    off = RandomWeightPerturbation(model, 0.0)
    off.apply(torch.Generator().manual_seed(3))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
