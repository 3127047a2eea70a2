"""The loss seam: CE + KD (+ per-token diagnostics) from last hidden states and output-layer weights.

Everything the trainer needs from a micro-batch comes out of `compute_loss`. Two implementations share that contract:
  plain  the reference: full logits for the micro-batch, autograd does the rest (memory: a few [N, V] tensors).
  fused  distillery/fused_kd.py (issue 4): chunked, never holds [N, V] logits of either model; takes one extra
         keyword, chunk_size (rows per chunk, 0 = auto), which plain ignores. Design: docs/kd_losses.md.

Contract (all sums are over target positions t with targets[t] != ignore_index on this rank's micro-batch):
  loss      = w_ce * ce_sum + w_kd * kd_sum                (differentiable; the only tensor with a graph)
  ce_sum    = sum_t -log p_s(y_t)                           (student at T = 1, over the student's full vocab)
  kd_sum    = sum_t T^2 * D(p_t^T || p_s^T)                 (over the shared vocab kd_vocab; 0 without a teacher)
  n_tokens  = number of target positions
  diag      = dict of detached per-token sums at T = 1 over the shared vocab: student_entropy, teacher_entropy,
              kl (forward KL(t||s)), top1_agree, teacher_p_true. Empty without a teacher or when not asked for.
The trainer folds the mix weights and the global token normalisation into w_ce and w_kd (see train.py), so
gradient accumulation and data parallelism never double-normalise (peers_and_pitfalls.md, trap 3).
"""
import torch
import torch.nn.functional as F

from distillery.fused_kd import fused_loss
from distillery.sparse_kd import sparse_loss
from distillery.loss_parts import DIAG_KEYS, IGNORE_INDEX, LossParts, diagnostics, shift_targets  # noqa: F401


def plain_loss(*, student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None, kd_vocab=None,
               divergence=None, divergence_args=None, temperature=1.0, w_ce=1.0, w_kd=0.0, want_diag=False,
               ignore_index=IGNORE_INDEX, **_):
    """Reference path. student_hidden [B, S, Hs], student_weight [Vs, Hs], targets [B, S] (ignore_index masked),
    teacher_hidden [B, S, Ht], teacher_weight [Vt, Ht]. Full logits only for the selected (target) rows."""
    mask = targets.reshape(-1) != ignore_index
    y = targets.reshape(-1)[mask]                                         # [N]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])[mask]       # [N, Hs]
    s_logits = (hs @ student_weight.to(hs.dtype).t()).float()              # [N, Vs] fp32 for the softmax
    ce_sum = F.cross_entropy(s_logits, y, reduction="sum")
    n = mask.sum()
    zero = s_logits.new_zeros(())
    if teacher_hidden is None:
        return LossParts(loss=w_ce * ce_sum, ce_sum=ce_sum.detach(), kd_sum=zero, n_tokens=n)
    v = kd_vocab or min(student_weight.shape[0], teacher_weight.shape[0])
    with torch.no_grad():
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[mask]
        t_logits = (ht @ teacher_weight[:v].to(ht.dtype).t()).float()    # [N, v]
    T = float(temperature)
    s_logp_T = F.log_softmax(s_logits[:, :v] / T, -1)
    t_logp_T = F.log_softmax(t_logits / T, -1)
    kd_sum = (T * T) * divergence(s_logp=s_logp_T, t_logp=t_logp_T, **(divergence_args or {})).sum()
    diag = {}
    if want_diag:
        with torch.no_grad():
            s1 = s_logp_T.detach() if T == 1.0 else F.log_softmax(s_logits[:, :v].detach(), -1)
            t1 = t_logp_T if T == 1.0 else F.log_softmax(t_logits, -1)
            diag = diagnostics(s1, t1, y)
    loss = w_ce * ce_sum + w_kd * kd_sum
    return LossParts(loss=loss, ce_sum=ce_sum.detach(), kd_sum=kd_sum.detach(), n_tokens=n, diag=diag)


# The loss paths, a fixed table: loss_impl=plain|fused selects one (distillery/config.py checks the name).
IMPLS = {"plain": plain_loss, "fused": fused_loss, "sparse": sparse_loss}  # sparse: cached targets (teacher_cache=)


def compute_loss(impl="plain", **kw):
    if impl not in IMPLS:
        raise ValueError(f"unknown loss_impl {impl!r}; known: {', '.join(sorted(IMPLS))}")
    return IMPLS[impl](**kw)
