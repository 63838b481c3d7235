"""Robustness evaluation an expert would sign: the W2 attack ensemble run to convergence
(ensemble), the pointwise standard (pointwise), intervals (intervals), the masking audit
(audit) and per-class numbers (perclass). Both recipes (evaluate, finetune) measure with these.
"""
