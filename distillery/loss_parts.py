"""The loss seam's shared types (a leaf module: no distillery imports), used by both loss paths, the trainer,
the evaluation and the benchmarks. The contract of a loss path is in distillery/loss.py's docstring."""
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
DIAG_KEYS = ("student_entropy", "teacher_entropy", "kl", "top1_agree", "teacher_p_true", "teacher_ce")


@dataclass
class LossParts:
    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    n_tokens: torch.Tensor
    diag: dict = field(default_factory=dict)


def diagnostics(s_logp, t_logp, y):
    """Per-token sums of the paper's logit diagnostics at T = 1. s_logp, t_logp: [N, V] fp32 over the shared vocab V;
    y: [N] targets over the student's vocab, which may be larger than V (teacher vocab smaller than the student's):
    such a target has teacher probability 0 in teacher_p_true and adds nothing to teacher_ce (the teacher's
    cross-entropy on the true tokens, -log p_t(y): what an alpha controller compares with the student's CE)."""
    s_p, t_p = s_logp.exp(), t_logp.exp()
    V = t_logp.shape[-1]
    inside = y < V
    p_true = t_p.gather(-1, y.clamp(max=V - 1)[:, None]).squeeze(-1)           # [N], valid where inside
    return {
        "student_entropy": -(s_p * s_logp).sum(-1).sum(),
        "teacher_entropy": -(t_p * t_logp).sum(-1).sum(),
        "kl": (t_p * (t_logp - s_logp)).sum(-1).sum(),
        "top1_agree": (s_logp.argmax(-1) == t_logp.argmax(-1)).float().sum(),
        "teacher_p_true": torch.where(inside, p_true, 0.0).sum(),
        "teacher_ce": torch.where(inside, -t_logp.gather(-1, y.clamp(max=V - 1)[:, None]).squeeze(-1), 0.0).sum(),
    }


def shift_targets(x):
    """Rows [B, S] -> next-token targets [B, S]: targets[:, t] = x[:, t + 1], and the last position has none
    (IGNORE_INDEX). The one target shift of the project: training, in-loop and standalone evaluation use it."""
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, :-1] = x[:, 1:]
    return y
