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
