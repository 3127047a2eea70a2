"""KD on sparse teacher targets (issue 13): the loss of a run whose teacher is an offline cache
(distillery/teacher_cache.py) instead of a live engine. Same contract as distillery/loss.py's plain_loss:

  loss      = w_ce * ce_sum + w_kd * kd_sum                 (differentiable)
  ce_sum    = sum_t -log p_s(y_t)                            (student at T = 1, full student vocab)
  kd_sum    = sum_t T^2 * D_t                                (D_t the sparse divergence below, over the shared vocab)
  n_tokens  = number of target positions (targets != ignore_index)

Notation: p = p_s^T (student softmax at T over the shared vocab kd_vocab), q = p_t^T (teacher), S = the cached ids of
a position, q_S their cached probabilities, r = log q(outside S) the cached rest (top-k).

Sparse divergences (a small registry of their own, `SPARSE`, keyed by name; `register` adds one):
  topk_renorm   sum_{v in S} q~_v log(q~_v / p_v),  q~ = q_S / q(S): the teacher renormalised over its top k, the
                student's full distribution (so it is still pushed off the dropped tokens). Equals the live
                `top_k` divergence with tail_bucket: false (plugins/divergences.py), at any k.
  topk_tail     sum_{v in S} q_v log(q_v / p_v) + q_r log(q_r / p_r),  q_r = exp(r), p_r = 1 - p(S): the top k plus
                one bucket holding the remaining mass on both sides (ModelOpt / Megatron). Equals the live `top_k`
                with tail_bucket: true, at any k.
  topk_support  KL(q~ || p~), p~ = p_S / p(S): both renormalised over S. Blind to the student's mass outside S (no
                gradient moves it there or back); offered for comparison, not as a default.
  sampled       -sum_k w_k log p(id_k) - H(q): ids drawn i.i.d. from q, w_k = count / K. E[sum_k w_k log p(id_k)] =
                sum_v q_v log p_v, so value and gradient are unbiased estimates of the full forward KL(q || p) and
                its gradient T (p - q) w.r.t. the student logits (Anshumann et al., ACL 2025, 'Random Sampling KD');
                H(q) is the cached exact teacher entropy (a constant: no gradient, it only makes kd_sum a KL).
With K = kd_vocab the three top-k forms are all the full forward KL (q(S) = 1, q_r = 0): equal to online KD.

The mode is chosen by (method, sparse_mode): ('topk', 'renorm' | 'tail' | 'support') or ('sampled', any); a
registered name passed as `sparse_divergence=` overrides it. A divergence is fn(s_logp [C, K], s_rest [C] or None,
t_vals [C, K], t_rest [C]) -> [C], where s_logp are the student's log-probs at T at the cached ids (normalised over
the shared vocab) and s_rest = log p(outside S) (computed only when fn.needs_student_rest is true).

Computation: chunks of C target rows, like the fused head (distillery/fused_kd.py): per chunk the student logits
[C, Vs] are recomputed from h and W; the divergence (any registered one) is differentiated by autograd on its [C, K]
inputs only, and the chain rule to the logits is written out (one softmax per temperature, a scatter_add of K
entries, for the tail one masked copy), so no [C, V] autograd graph exists; grad_h[C] = dz W and grad_W += dz^T h
(fp32 accumulator) are formed in the forward and backward multiplies them by grad_output. Memory: a few [C, Vs]
buffers of one chunk plus grad_h and an fp32 grad_W; never [N, V]. No teacher logits exist at all.
"""
import torch

from distillery.errors import ConfigError
from distillery.loss_parts import IGNORE_INDEX, LossParts

NO_MASS = -1e30  # "no mass" as a finite log-prob (as plugins/divergences.py): no 0 * inf NaN reaches a gradient

SPARSE = {}
MODES = {("topk", "renorm"): "topk_renorm", ("topk", "tail"): "topk_tail", ("topk", "support"): "topk_support"}


def register(name, methods=("topk",), needs_student_rest=False):
    """Add a sparse divergence under `name`, usable with caches of the given methods."""
    def deco(fn):
        if name in SPARSE:
            raise ConfigError(f"sparse divergence {name!r} is registered twice; rename one")
        fn.methods, fn.needs_student_rest, fn.sparse_name = tuple(methods), needs_student_rest, name
        SPARSE[name] = fn
        return fn
    return deco


def resolve(method, sparse_mode="renorm", sparse_divergence=None):
    """The sparse divergence function for a cache method and mode (or an explicit registered name)."""
    if method not in ("topk", "sampled"):
        raise ConfigError(f"unknown teacher cache method {method!r}; known: topk, sampled")
    name = sparse_divergence or ("sampled" if method == "sampled" else MODES.get((method, sparse_mode)))
    if name is None:
        raise ConfigError(f"unknown sparse_mode {sparse_mode!r} for a top-k cache; known: renorm, tail, support")
    if name not in SPARSE:
        raise ConfigError(f"unknown sparse divergence {name!r}; known: {', '.join(sorted(SPARSE))}")
    fn = SPARSE[name]
    if method not in fn.methods:
        raise ConfigError(f"sparse divergence {name!r} needs a {' or '.join(fn.methods)} cache, this one is "
                          f"{method}; rebuild the cache with --method {fn.methods[0]} or pick another")
    return fn


def _xlogx_ratio(lq, lp):
    """exp(lq) * (lq - lp), 0 where exp(lq) = 0."""
    q = lq.exp()
    return torch.where(q > 0, q * (lq - lp), torch.zeros_like(q))


@register("topk_renorm")
def topk_renorm(s_logp, s_rest, t_vals, t_rest):
    """Teacher renormalised over its top k, the student's full distribution: sum_S q~ log(q~ / p)."""
    lq = t_vals - t_vals.logsumexp(-1, keepdim=True)
    return _xlogx_ratio(lq, s_logp).sum(-1)


@register("topk_tail", needs_student_rest=True)
def topk_tail(s_logp, s_rest, t_vals, t_rest):
    """The top k plus one tail bucket on both sides: KL over k + 1 outcomes."""
    return _xlogx_ratio(t_vals, s_logp).sum(-1) + _xlogx_ratio(t_rest.clamp_min(NO_MASS), s_rest)


@register("topk_support")
def topk_support(s_logp, s_rest, t_vals, t_rest):
    """Both renormalised over the top k: KL(q~ || p~)."""
    lq = t_vals - t_vals.logsumexp(-1, keepdim=True)
    lp = s_logp - s_logp.logsumexp(-1, keepdim=True)
    return _xlogx_ratio(lq, lp).sum(-1)


@register("sampled", methods=("sampled",))
def sampled(s_logp, s_rest, t_vals, t_rest):
    """Unbiased forward KL: -sum_k w_k log p(id_k) - H(q) (t_vals = weights, t_rest = teacher entropy)."""
    return -(t_vals * s_logp).sum(-1) - t_rest


def auto_chunk_rows(vocab):
    """~2^25 logits per chunk, a multiple of 64 rows (the fused head's rule)."""
    return max(64, (2 ** 25 // max(1, vocab)) // 64 * 64)


def _chunk(z, y, ids, vals, rest, fn, v, T, w_ce, w_kd, need_grad, want_diag):
    """One chunk: (ce sum, kd sum, dL/dz or None, diag). z [C, Vs] logits (fp32 or fp64), no graph.

    The divergence is differentiated by autograd on its small inputs only (s_logp [C, K], s_rest [C]): a = dL/ds_logp,
    b = dL/ds_rest; the chain rule to the logits is written out, so no [C, V] autograd graph exists:
        d s_logp_k / d zT = onehot(id_k) - p,   d s_rest / d zT = p 1[not in S] / p(not S) - p,   zT = z / T."""
    lp1 = z.log_softmax(-1)                                                             # [C, Vs] student, T = 1
    ce = -lp1.gather(-1, y[:, None]).squeeze(-1)
    same = T == 1.0 and v == z.shape[1]
    lpT = lp1 if same else ((z[:, :v] / T) if T != 1.0 else z[:, :v]).log_softmax(-1)   # [C, v] student at T
    s_logp = lpT.gather(-1, ids).requires_grad_(need_grad)                              # [C, K]
    p = lpT.exp()
    s_rest = p_out = p_rest = None
    if fn.needs_student_rest:
        p_out = p.scatter(-1, ids, 0.0)                                                 # p outside S (ids may repeat)
        p_rest = p_out.sum(-1)
        s_rest = p_rest.log().clamp_min(NO_MASS).requires_grad_(need_grad)
    with torch.enable_grad():
        kd = (T * T) * fn(s_logp=s_logp, s_rest=s_rest, t_vals=vals, t_rest=rest)        # [C]
        if need_grad:
            leaves = [s_logp] + ([s_rest] if s_rest is not None else [])
            grads = torch.autograd.grad(w_kd * kd.sum(), leaves, allow_unused=True)
    dz = None
    if need_grad:
        # dL/dz = w_ce (p1 - onehot(y)) + (1/T) [scatter(a) + p (-sum a - b) + (b / p_rest) p_out]  (first v columns)
        a = grads[0].detach() if grads[0] is not None else torch.zeros_like(s_logp)
        coef = -a.sum(-1, keepdim=True)
        b = grads[1].detach()[:, None] if s_rest is not None and grads[1] is not None else None
        if b is not None:
            coef = coef - b
        if same:
            dz = p.mul_(coef.add_(w_ce))                                                # p is dead after this
        else:
            dz = lp1.exp_().mul_(w_ce)
            dz[:, :v].add_(p.mul_(coef.div_(T)))
        dz.scatter_add_(-1, ids, a.div(T) if T != 1.0 else a)
        if b is not None:
            ratio = torch.where(p_rest[:, None] > 0, b / p_rest[:, None], torch.zeros_like(b))
            dz[:, :v].add_(p_out.mul_(ratio.div_(T)))
        if w_ce != 0:
            dz.scatter_add_(-1, y[:, None], torch.full(y[:, None].shape, -w_ce, dtype=z.dtype, device=z.device))
    diag = {}
    if want_diag:
        with torch.no_grad():
            l1 = z[:, :v].log_softmax(-1)
            diag["student_entropy"] = -(l1.exp() * l1).sum()
    return ce.sum(), kd.detach().sum(), dz, diag


class _SparseHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, y, ids, vals, rest, sp):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hs.shape[0]
        cdt = hs.dtype
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        w_c = ws.to(cdt)
        grad_h = torch.zeros_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if need_w else None
        ce_sum = hs.new_zeros((), dtype=acc)
        kd_sum = hs.new_zeros((), dtype=acc)
        diag = {}
        C = sp["chunk"]
        for a in range(0, n, C):
            b = min(n, a + C)
            h = hs[a:b]
            z = (h @ w_c.t()).to(acc)
            ce, kd, dz, d = _chunk(z, y[a:b], ids[a:b], vals[a:b].to(acc), rest[a:b].to(acc), sp["fn"], sp["v"],
                                   sp["T"], sp["w_ce"], sp["w_kd"], need_h or need_w, sp["want_diag"])
            ce_sum += ce
            kd_sum += kd
            for k_, v_ in d.items():
                diag[k_] = diag.get(k_, 0) + v_
            if dz is not None:
                if need_h:
                    grad_h[a:b] = (dz.to(cdt) @ w_c).to(grad_h.dtype)
                if need_w:
                    grad_w.addmm_(dz.t(), h.to(acc))
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.ws_dtype = ws.dtype
        loss = sp["w_ce"] * ce_sum + sp["w_kd"] * kd_sum
        sp["out"] = (ce_sum, kd_sum, diag)
        return loss.to(acc)

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * g.to(grad_w.dtype)).to(ctx.ws_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def sparse_loss(*, student_hidden, student_weight, targets, cache_ids, cache_vals, cache_rest=None, method="topk",
                temperature=1.0, w_ce=1.0, w_kd=0.0, sparse_mode="renorm", sparse_divergence=None, kd_vocab=None,
                want_diag=False, chunk_size=0, ignore_index=IGNORE_INDEX, **_):
    """CE + KD against cached sparse teacher targets. student_hidden [B, S, H], student_weight [Vs, H], targets
    [B, S], cache_ids [B, S, K] (int), cache_vals [B, S, K], cache_rest [B, S] (CacheReader.take's three, rows
    aligned with the batch); method 'topk' | 'sampled' (the cache's), sparse_mode 'renorm' | 'tail' | 'support'
    (top-k; ignored for sampled), or sparse_divergence=<registered name>. kd_vocab: the shared vocab (the cache's
    CacheReader.kd_vocab; default min(Vs, max id + 1) is not safe, so give it); temperature must be the cache's.
    Other keywords (teacher_hidden, divergence, ... from the trainer's loss_kw) are ignored.
    Returns LossParts; diag (want_diag) holds student_entropy only: the teacher-side diagnostics need the full
    teacher distribution, which a cache does not have."""
    fn = resolve(method, sparse_mode, sparse_divergence)
    if cache_rest is None:
        if fn.needs_student_rest or method == "sampled":
            raise ConfigError(f"sparse divergence {fn.sparse_name!r} needs the cache's rest column; pass "
                              f"cache_rest from CacheReader.take")
        cache_rest = cache_vals.new_zeros(cache_vals.shape[:-1])
    H = student_hidden.shape[-1]
    mask = targets.reshape(-1) != ignore_index
    y = targets.reshape(-1)[mask]
    K = cache_ids.shape[-1]
    ids = cache_ids.reshape(-1, K)[mask].long()
    vals = cache_vals.reshape(-1, K)[mask]
    rest = cache_rest.reshape(-1)[mask]
    v = int(kd_vocab or student_weight.shape[0])
    if ids.numel() and int(ids.max()) >= v:
        raise ConfigError(f"teacher cache holds token id {int(ids.max())} >= kd_vocab {v}; the cache was made for "
                          f"another vocab: rebuild it for this student or fix kd_vocab")
    hs = student_hidden.reshape(-1, H)
    hv = hs[mask]                                        # masked positions: zero gradient (index backward)
    T = float(temperature)
    if T <= 0:
        raise ConfigError(f"temperature={T} must be > 0")
    sp = dict(fn=fn, v=v, T=T, w_ce=float(w_ce), w_kd=float(w_kd), want_diag=want_diag,
              chunk=int(chunk_size) or auto_chunk_rows(student_weight.shape[0]))
    loss = _SparseHead.apply(hv, student_weight, y, ids, vals, rest, sp)
    ce_sum, kd_sum, diag = sp.pop("out")
    return LossParts(loss=loss, ce_sum=ce_sum.detach(), kd_sum=kd_sum.detach(), n_tokens=mask.sum(), diag=diag)

