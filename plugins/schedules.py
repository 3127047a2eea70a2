"""Alpha schedules: alpha at optimizer step `step` of `total_steps` (0-based; last step = total_steps - 1).

Shared arguments: alpha (the peak/target value), start (value at step 0 when warming up), end (final value when
decaying), warmup_frac / decay_frac (fractions of the run). The paper keeps alpha constant; Peng et al. (2025) found
WSD on alpha (with a WSD LR) best, so the shapes mirror the LR schedules.
"""
import math

from plugins import register


def _frac(step, total_steps):
    return step / max(total_steps - 1, 1)


def _warmup(step, total_steps, alpha, start, warmup_frac):
    """Linear start -> alpha over the first warmup_frac of the run; None once warmed up."""
    w = warmup_frac * max(total_steps - 1, 1)
    if w > 0 and step < w:
        return start + (alpha - start) * step / w
    return None


@register("alpha_schedule", "constant")
def constant(step, total_steps, alpha, **_):
    """alpha at every step (the paper)."""
    return alpha


@register("alpha_schedule", "linear")
def linear(step, total_steps, alpha, start=0.0, **_):
    """start at step 0 -> alpha at the last step, linearly."""
    return start + (alpha - start) * _frac(step, total_steps)


@register("alpha_schedule", "cosine")
def cosine(step, total_steps, alpha, start=0.0, end=0.0, warmup_frac=0.0, **_):
    """Linear warmup start -> alpha over warmup_frac, then cosine alpha -> end at the last step."""
    a = _warmup(step, total_steps, alpha, start, warmup_frac)
    if a is not None:
        return a
    w = warmup_frac * max(total_steps - 1, 1)
    p = (step - w) / max(total_steps - 1 - w, 1e-9)
    return end + (alpha - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(p, 0.0), 1.0)))


@register("alpha_schedule", "wsd")
def wsd(step, total_steps, alpha, start=0.0, end=0.0, warmup_frac=0.0, decay_frac=0.2, **_):
    """Warmup-stable-decay: linear warmup start -> alpha, hold alpha, linear decay to end over the last decay_frac."""
    a = _warmup(step, total_steps, alpha, start, warmup_frac)
    if a is not None:
        return a
    last = max(total_steps - 1, 1)
    d0 = (1.0 - decay_frac) * last
    if decay_frac <= 0 or step <= d0:
        return alpha
    return alpha + (end - alpha) * (step - d0) / (last - d0)
