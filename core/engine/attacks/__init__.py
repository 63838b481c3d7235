"""Attacks: W-PGD and W-FGSM (distributional), PGD and AutoAttack (pointwise)."""
from core.engine.attacks.pgd import PGDResult, pgd
from core.engine.attacks.wpgd import BatchAttack, WPGDResult, attack_batch, w_fgsm, w_pgd

__all__ = ["BatchAttack", "PGDResult", "WPGDResult", "attack_batch", "pgd", "w_fgsm", "w_pgd"]
