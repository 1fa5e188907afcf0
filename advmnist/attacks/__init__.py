"""Attacks in pixel space [0, 1]; one registry, one file per method.

    from advmnist.attacks import get_attack, list_attacks, pgd
    x_adv = pgd(model.eval(), x, y, eps=0.3, steps=40)
"""

from .core import (AttackError, AttackSpec, frozen, get_attack, gradient_fn, input_grad, list_attacks, logits_fn,
                   register_attack)
from .fgsm import fgsm
from .gd import gd
from .penalty import penalty
from .pgd import pgd
from .apgd import apgd, apgd_t
from .square import square
from .fab import fab_t
from .cw import cw
from .deepfool import deepfool
from .fmn import fmn
from .jsma import jsma

__all__ = ["AttackError", "AttackSpec", "frozen", "get_attack", "gradient_fn", "input_grad", "list_attacks",
           "logits_fn", "register_attack", "fgsm", "gd", "penalty", "pgd", "apgd", "apgd_t", "square", "fab_t",
           "cw", "deepfool", "fmn", "jsma"]
