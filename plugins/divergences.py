"""KD divergences D(teacher || student) per token.

Inputs are fp32 log-probabilities at temperature T over the shared vocab: s_logp, t_logp [N, V]; output [N].
The core (distillery/loss.py, distillery/fused_kd.py) does chunking, masking, temperature, the T^2 factor and the
token normalisation, so every function here is only the per-token maths; gradients come from autograd, which is what
lets the fused head give any divergence here its memory savings (it differentiates these on one chunk at a time).

Notation: p_t = exp(t_logp) (teacher), p_s = exp(s_logp) (student), KL(a || b) = sum_v a_v (log a_v - log b_v).
Options arrive as keyword arguments from the config field `divergence_args`; every function names its options
explicitly (no **kwargs sink), so a misspelt option fails on the first step instead of being silently ignored.
Everything is written to stay finite when a log-prob is a large negative number (the truncation wrappers below use
-1e30 for "no mass" rather than -inf, because 0 * -inf is NaN and would leak into gradients).
"""
import math

import torch

from plugins import register

# "No mass" as a log-probability. Finite on purpose: exp() gives exactly 0, and differences of two such entries are
# exactly 0, so p * (log p - log q) is 0 with no NaN in forward or backward. -inf would give 0 * inf = NaN.
NO_MASS = -1e30


def _kl(logp, logq):
    """KL(p || q) per row from log-probs [N, V] -> [N]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix_ratio(w, r):
    """log(m / b) for the mixture m = w * a + (1 - w) * b, given r = log a - log b [N, V], 0 < w < 1.

    Written on the log-ratio on purpose: log m - log b computed as two separate log-probs loses everything below
    fp32's eps * |log b| when m is within O(w) of b (w near 0), which is exactly where JSD(beta) approaches its KL
    endpoint and the skew KLs sit (lambda = 0.1). Here the O(w) result comes out of logaddexp with full precision."""
    return torch.logaddexp(r + math.log(w), r.new_tensor(math.log1p(-w)))


@register("divergence", "forward_kl")
def forward_kl(s_logp, t_logp):
    """KL(p_t || p_s): mean-seeking; the paper's loss (Lu & Liu 2026, eq. 1; Hinton et al. 2015)."""
    return _kl(t_logp, s_logp)


# Opt-in for the fused head's closed form (distillery/fused_kd.py, CLOSED_FORMS): it computes this divergence's value
# and dL/dlogits = T (p_s - p_t) from formulas instead of autograd. Only this exact function carries it; a wrapper or
# a user plugin with the same maths goes through autograd unless it sets the attribute itself.
forward_kl.fused_closed_form = "forward_kl"


@register("divergence", "reverse_kl")
def reverse_kl(s_logp, t_logp):
    """KL(p_s || p_t): mode-seeking (MiniLLM, Gu et al. 2024)."""
    return _kl(s_logp, t_logp)


@register("divergence", "symmetric_kl")
def symmetric_kl(s_logp, t_logp):
    """KL(p_t || p_s) + KL(p_s || p_t) (Jeffreys divergence; torchtune's symmetric KL at ratio 0.5 is half of it)."""
    return _kl(t_logp, s_logp) + _kl(s_logp, t_logp)


@register("divergence", "jsd")
def jsd(s_logp, t_logp, beta=0.5):
    """Generalized JSD(beta), scaled to be continuous in beta: beta=0 -> KL(p_t||p_s), beta=1 -> KL(p_s||p_t).

    For 0 < beta < 1, with the mixture m = beta * p_t + (1 - beta) * p_s (the mixture of Agarwal et al. 2024 (GKD),
    TRL and Liger):
        JSD_beta = [beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)] / (beta * (1 - beta)).
    The numerator is TRL's / Liger's generalized JSD; it tends to 0 at both ends (it is beta * KL(p_t||p_s) + O(beta^2)
    near 0 and (1 - beta) * KL(p_s||p_t) + O((1-beta)^2) near 1, Huszar 2015, "How (not) to train your generative
    model", sec. 4), so TRL/Liger special-case the endpoints and their loss jumps there. Dividing by beta * (1 - beta)
    removes the jump: the limits are exactly the endpoint values, which we use at beta in {0, 1}. Endpoint convention
    is TRL's and Liger's (beta = 0 is forward KL, LigerFusedLinearJSDLoss(beta=0) is the paper's loss). Inside (0, 1)
    our value is theirs times 1 / (beta * (1 - beta)) (x4 at beta = 0.5): fold that into w_kd when matching their runs.
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(t_logp, s_logp)
    if beta == 1.0:
        return _kl(s_logp, t_logp)
    # Each KL against the mixture from its own log-ratio, so both ends are exact in fp32: log(m / p_s) is
    # _log_mix_ratio(beta, r) and log(m / p_t) is _log_mix_ratio(1 - beta, -r) (m = (1 - beta) p_s + beta p_t seen
    # from p_t). Forming log(m / p_t) as r - log(m / p_s) instead cancels two O(1) numbers to an O(1 - beta) one and,
    # after the division by 1 - beta, cost 3.5e-4 relative at beta = 1 - 1e-4 (1.5e-7 at beta = 1e-4).
    r = t_logp - s_logp                                             # log p_t / p_s
    kl_t_m = -(t_logp.exp() * _log_mix_ratio(1.0 - beta, -r)).sum(-1)  # KL(p_t || m), O((1-beta)^2) near beta = 1
    kl_s_m = -(s_logp.exp() * _log_mix_ratio(beta, r)).sum(-1)         # KL(p_s || m), O(beta^2) near beta = 0
    return (beta * kl_t_m + (1.0 - beta) * kl_s_m) / (beta * (1.0 - beta))


def _skew_lambda(lam, kw, name):
    """DistiLLM calls the skew coefficient lambda (alpha in their paper), a Python keyword: accept `lambda` too."""
    extra = set(kw) - {"lambda"}
    if extra:
        raise TypeError(f"{name}: unexpected divergence_args {sorted(extra)}; options are lam (alias lambda)")
    lam = float(kw.get("lambda", lam))
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"{name}: lambda must be in [0, 1), got {lam}")
    return lam


@register("divergence", "skew_forward_kl")
def skew_forward_kl(s_logp, t_logp, lam=0.1, **kw):
    """SKL_lambda = KL(p_t || lambda * p_t + (1 - lambda) * p_s) (Ko et al. 2024, DistiLLM, eq. 3; lambda = 0.1 there).
    lambda = 0 is forward KL; the teacher share in the mixture bounds the log-ratio by -log(lambda)."""
    lam = _skew_lambda(lam, kw, "skew_forward_kl")
    if lam == 0.0:
        return _kl(t_logp, s_logp)
    r = t_logp - s_logp
    return (t_logp.exp() * (r - _log_mix_ratio(lam, r))).sum(-1)   # m / p_t = (m / p_s) / (p_t / p_s)


@register("divergence", "skew_reverse_kl")
def skew_reverse_kl(s_logp, t_logp, lam=0.1, **kw):
    """SRKL_lambda = KL(p_s || (1 - lambda) * p_t + lambda * p_s) (Ko et al. 2024, DistiLLM, eq. 4). lambda = 0 is
    reverse KL."""
    lam = _skew_lambda(lam, kw, "skew_reverse_kl")
    if lam == 0.0:
        return _kl(s_logp, t_logp)
    return -(s_logp.exp() * _log_mix_ratio(1.0 - lam, t_logp - s_logp)).sum(-1)


@register("divergence", "tvd")
def tvd(s_logp, t_logp):
    """Total variation distance 0.5 * sum_v |p_t - p_s| (as in DistillKit; Wen et al. 2023, f-divergence KD).
    Its subgradient at p_t == p_s is 0 (torch's sign(0) = 0)."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


@register("divergence", "hard_label")
def hard_label(s_logp, t_logp):
    """Hard-label KD: -log p_s(argmax_v p_t), CE on the teacher's top-1 token (paper ablation; Kim & Rush 2016).
    Ties take the lowest index. The core's T^2 factor still applies: the paper's ablation runs it at T = 1."""
    return -s_logp.gather(-1, t_logp.argmax(-1, keepdim=True)).squeeze(-1)


# ---- teacher truncation -------------------------------------------------------------------------------------------
#
# top_k / top_p keep the teacher's most likely tokens S (per token, chosen at temperature T) and hand a base
# divergence (default forward_kl, any registered name) a distribution over S plus one "tail" slot:
#   tail_bucket = False: the teacher is renormalised over S (the paper's "renormalised" top-k) and puts nothing in the
#                        tail; the student keeps its full distribution, its mass outside S collapsed into the tail.
#                        For forward KL this is exactly sum_{v in S} q_t,v (log q_t,v - log p_s,v), the student still
#                        being pushed off the dropped tokens; for JSD, skew KL and TVD collapsing the dropped tokens is
#                        exact too, because with zero teacher mass their terms are linear in p_s. Reverse and
#                        symmetric KL are infinite against a truncated teacher, so they need the tail bucket.
#   tail_bucket = True:  no renormalisation; teacher and student each put their mass outside S into the tail slot
#                        (the "tail bucket" of ModelOpt / Megatron top-k KD), so the divergence also matches the
#                        total mass the student leaves outside S.
# Implementation: full width [N, V + 1] with NO_MASS at dropped entries (one chunk's worth of extra memory in the fused
# head; a gather to [N, k + 1] would be smaller for top-k but cannot express top-p's per-token set sizes).

_INFINITE_WITHOUT_TAIL = {"reverse_kl", "symmetric_kl"}


def _base(name):
    from plugins import get  # at call time: every plugin module is loaded by then, including user-added bases
    return get("divergence", name)


def _truncated(s_logp, t_logp, keep, tail_bucket, base, base_args):
    """keep: [N, V] bool, the teacher's kept tokens. Returns base(...) over the [N, V + 1] collapsed distributions."""
    if not tail_bucket and base in _INFINITE_WITHOUT_TAIL:
        raise ValueError(f"{base} against a truncated teacher without tail bucket is infinite (the teacher has no "
                         f"mass where the student has some); set tail_bucket: true or use forward_kl / jsd / tvd")
    fn = _base(base)
    s_in = torch.where(keep, s_logp, NO_MASS)                                    # [N, V]
    s_tail = torch.where(keep, NO_MASS, s_logp).logsumexp(-1, keepdim=True)      # [N, 1] student mass outside S
    t_in = torch.where(keep, t_logp, NO_MASS)
    t_tail_mass = torch.where(keep, NO_MASS, t_logp).logsumexp(-1, keepdim=True)  # [N, 1]
    if tail_bucket:
        t_tail = t_tail_mass
    else:
        # Renormalise over S: log q = log p - log(1 - dropped mass). log1p(-exp(.)) keeps a tiny dropped mass exact.
        t_in = t_in - torch.log1p(-t_tail_mass.clamp(max=-1e-12).exp())
        t_tail = torch.full_like(t_tail_mass, NO_MASS)
    return fn(s_logp=torch.cat([s_in, s_tail], -1), t_logp=torch.cat([t_in, t_tail], -1), **base_args)


@register("divergence", "top_k")
def top_k(s_logp, t_logp, k=None, k_frac=None, tail_bucket=False, base="forward_kl", **base_args):
    """Teacher truncated to its top-k tokens (k, or k_frac of the shared vocab as in the paper's 1/5/20/50% ablation,
    rounded, at least 1); renormalised, or with a tail bucket. Other options go to the base divergence."""
    V = t_logp.shape[-1]
    if (k is None) == (k_frac is None):
        raise ValueError("top_k: give exactly one of k (tokens) or k_frac (fraction of the shared vocab)")
    if k is None:
        if not 0.0 < float(k_frac) <= 1.0:
            raise ValueError(f"top_k: k_frac must be in (0, 1], got {k_frac}")
        k = max(1, round(float(k_frac) * V))
    k = int(k)
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    if k >= V:
        return _base(base)(s_logp=s_logp, t_logp=t_logp, **base_args)
    idx = t_logp.topk(k, dim=-1).indices                                         # [N, k] (ties: torch's pick)
    keep = torch.zeros_like(t_logp, dtype=torch.bool).scatter_(-1, idx, True)
    return _truncated(s_logp, t_logp, keep, tail_bucket, base, base_args)


@register("divergence", "top_p")
def top_p(s_logp, t_logp, p=None, tail_bucket=False, base="forward_kl", **base_args):
    """Teacher truncated to its nucleus: the fewest most-likely tokens whose mass reaches p (at temperature T; the
    token that crosses p is kept, so at least one); renormalised, or with a tail bucket."""
    if p is None or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"top_p: p must be in (0, 1], got {p}")
    sorted_logp, order = t_logp.sort(-1, descending=True)                        # [N, V]
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()               # teacher mass ranked above each token
    keep = torch.empty_like(t_logp, dtype=torch.bool).scatter_(-1, order, mass_before < float(p))
    return _truncated(s_logp, t_logp, keep, tail_bucket, base, base_args)
