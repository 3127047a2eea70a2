"""Loss mixes: weights (w_ce, w_kd) of CE and KD given alpha (paper_setup.md, 'Loss scaling' ablation)."""
from plugins import register


@register("mix", "standard")
def standard(alpha):
    """(1 - alpha) * CE + alpha * KD: the paper's main objective."""
    return 1.0 - alpha, alpha


@register("mix", "keep_full_ce")
def keep_full_ce(alpha):
    """CE + alpha * KD: KD added on top of the full LM loss."""
    return 1.0, alpha


@register("mix", "keep_full_kd")
def keep_full_kd(alpha):
    """(1 - alpha) * CE + KD: full KD, down-weighted LM loss."""
    return 1.0 - alpha, 1.0
