"""Every report the recipes build is checked for W2 ≤ pointwise at the same δ (the W2 ball
contains the pointwise ball): a contradicting report is refused, never handed out."""
import pytest

from core.engine.evaluation.invariants import ReportInvariantError, check_report, w2_above_pointwise


def test_a_report_stating_w2_above_linf_is_refused_wherever_it_says_so():
    ok = {"w2": [{"threat": "w2-linf", "delta": 0.1, "robust_accuracy": 0.2}],
          "pointwise": [{"threat": "linf", "delta": 0.1, "robust_accuracy": 0.3, "attack": "apgd"}],
          "before": {"w2_robust_accuracy": 0.4, "linf_robust_accuracy": 0.5},
          "history": [{"epoch": 1, "w2_robust_accuracy": 0.5, "linf_robust_accuracy": 0.5}]}
    assert check_report(ok) is ok
    assert w2_above_pointwise(ok) == ([], 2)
    for bad in ({**ok, "pointwise": [{**ok["pointwise"][0], "robust_accuracy": 0.1}]},
                {**ok, "after": {"w2_robust_accuracy": 0.255, "linf_robust_accuracy": 0.135}},  # the report
                {**ok, "summary": {"w2_robust_accuracy": 0.6, "l2_robust_accuracy": 0.5, "w2_threat": "w2-l2"}}):
        with pytest.raises(ReportInvariantError, match="W2"):
            check_report(bad)


def test_other_radii_and_ground_costs_are_not_compared():
    report = {"w2": [{"threat": "w2-linf", "delta": 0.1, "robust_accuracy": 0.5}],
              "pointwise": [{"threat": "linf", "delta": 0.2, "robust_accuracy": 0.1, "attack": "pgd"},
                            {"threat": "l2", "delta": 0.1, "robust_accuracy": 0.1, "attack": "pgd"}],
              "summary": {"w2_threat": "w2-linf", "w2_robust_accuracy": 0.5, "l2_robust_accuracy": 0.1}}
    assert w2_above_pointwise(report) == ([], 0)


def test_a_validation_row_that_states_the_minimum_is_checked_and_an_older_row_is_not():
    new = {"epoch": 2, "w2_robust_accuracy": 0.6, "w2_wpgd_robust_accuracy": 0.6, "linf_robust_accuracy": 0.5}
    old = {"epoch": 1, "w2_robust_accuracy": 0.6, "linf_robust_accuracy": 0.5}   # measured apart (older checkpoint)
    assert w2_above_pointwise({"history": [old]}) == ([], 0)
    for report in ({"history": [old, new]}, {"validation": {"before": old, "best": new}}):
        with pytest.raises(ReportInvariantError, match=r"W2 0\.6 above linf 0\.5 \(epoch 2\)"):
            check_report(report)


def test_every_validation_row_of_a_fine_tune_is_the_minimum_of_w_pgd_and_pgd(digits_small_cnn):
    """The per-epoch validation's W2 is min(W-PGD, PGD from the clean images): never above l∞."""
    import copy

    from core.engine.config import FinetuneConfig
    from core.engine.recipes.finetune import finetune

    model, data = digits_small_cnn
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": 0.1}, epochs=2, batch_size=64, lr=0.003,
                            train_examples=300, validation_examples=120, test_examples=60, eval_wpgd_steps=3,
                            eval_pgd_steps=2, budget_subset=64, attack_steps=1, evaluation="quick", seed=0)
    result = finetune(config, copy.deepcopy(model), data, device="cpu")
    rows = [r for r in [*result.history, *result.validation.values()] if "clean_accuracy" in r]
    assert len(rows) >= 4
    for r in rows:
        assert r["w2_robust_accuracy"] == min(r["w2_wpgd_robust_accuracy"], r["linf_robust_accuracy"]), r
        assert r["w2_robust_accuracy"] <= r["linf_robust_accuracy"] <= r["clean_accuracy"]
    assert w2_above_pointwise(result.report)[1] >= 2 + len(rows)   # before/after and every validation row compared
