"""Fused KD head (issue 4): CE + KD + diagnostics from last hidden states and output weights, chunk by chunk.

Same contract as `distillery.loss.plain_loss` (read loss.py's docstring), listed as IMPLS["fused"] there.

Why: at vocab 128256 the logits are the largest tensors of a step. The plain path holds several fp32 [N, V] tensors
for student and teacher (logits, log-softmax, exp, the divergence's intermediates and their gradients). Here one
forward does, for each chunk of C target rows:
    student logits [C, Vs] = h_s[C] @ W_s^T (recomputed, fp32), teacher logits [C, V] under no_grad,
    CE + T^2 * divergence on the chunk, diagnostics from the same log-probs,
    dL/dlogits [C, Vs] by torch.autograd.grad on that chunk only (any registered divergence works, its graph is freed
    before the next chunk), then grad_h[C] = dlogits @ W_s and grad_W += dlogits^T @ h_s[C] (fp32 accumulator),
with the loss weights (w_ce, w_kd) folded in. backward() only scales the stored gradients by grad_output.
What stays alive: grad_h [N, Hs] (compute dtype), grad_W [Vs, Hs] fp32, the compute-dtype copies of W_s / W_t when
their dtype differs from the compute dtype, and one chunk's [C, V] buffers (about ten fp32 ones at the peak).

ZeRO-3: the trainer registers W_s as an external parameter of the module whose forward calls this, so it is gathered
during that forward; everything that reads W_s (or the teacher's W_t, gathered by GatheredParameters) happens inside
this forward, so ZeRO may release both right after it. backward() returns a full [Vs, Hs] gradient for W_s, which
autograd accumulates into the parameter, where ZeRO-3's gradient hooks reduce-scatter it like any other gradient.
Tied embeddings need nothing special: the gradient returned here is added to the embedding's own by autograd.
"""
import torch
import torch.nn.functional as F

from distillery.loss_parts import DIAG_KEYS, IGNORE_INDEX, LossParts, diagnostics

# Auto chunk: about 2^25 logits per chunk, i.e. 128 MiB per fp32 [C, V] buffer, rows a multiple of 64.
# V = 128256 -> 256 rows (the same as Liger's next_pow2(N / ceil(V / H)) at N = 8192, H = 2048), V = 151936 -> 192,
# V = 32000 -> 1024. Smaller chunks lower the peak (about 10 such buffers live at once) but add per-chunk overhead:
# a Python iteration, ~30 kernel launches and one read-modify-write of the fp32 grad_W accumulator ([Vs, Hs], 1 GiB at
# V = 128256, H = 2048), which is what makes very small chunks slow on GPU.
CHUNK_ELEMENTS = 2 ** 25


def auto_chunk_rows(vocab):
    return max(64, (CHUNK_ELEMENTS // vocab) // 64 * 64)


def _compute_dtype(x):
    """The matmul dtype plain_loss gets: the autocast dtype when autocast is on for x's device, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


_FP32_OUT_MM = {}


def _fp32_out_addmm_ok(device, dtype):
    """Whether addmm with out_dtype=float32 (bf16/fp16 inputs, fp32 accumulator updated in place) works here; CUDA has
    it in recent torch, CPU does not. Probed once on tiny tensors and checked against a reference, so an unsupported
    or wrong kernel can only cost speed, never correctness."""
    key = (device.type, dtype)
    if key not in _FP32_OUT_MM:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                a = torch.randn(16, 8, generator=g).to(device, dtype)
                b = torch.randn(8, 32, generator=g).to(device, dtype)
                acc = torch.randn(16, 32, generator=g).to(device)
                ref = acc + a.float() @ b.float()
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(acc, ref, rtol=1e-2, atol=1e-2))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _FP32_OUT_MM[key] = ok
    return _FP32_OUT_MM[key]


def _accumulate_weight_grad(grad_w, dl, h, alpha=1.0):
    """grad_w [V, H] fp32 += alpha * dl^T [V, C] @ h [C, H]. The fp32 accumulator keeps bf16 rounding from growing with the
    number of chunks; without a mixed-precision kernel each chunk's product is rounded to bf16 once (a [V, H] temp)."""
    if dl.dtype == torch.float32:
        grad_w.addmm_(dl.t(), h, alpha=alpha)
    elif _fp32_out_addmm_ok(dl.device, dl.dtype):
        torch.addmm(grad_w, dl.t(), h, alpha=alpha, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.add_(dl.t() @ h, alpha=alpha)


class _Spec:
    """Everything non-tensor the chunk loop needs (passed through autograd.Function.apply as one object)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _softmax_into(x, out):
    """softmax over dim 1 of x [C, V] fp32, written into out (which may be x itself). One fused row kernel instead of
    F.softmax's fresh [C, V] result. Aliasing is safe: each row is fully reduced (max, sum of exp) before any element
    of it is written, on CPU and CUDA alike."""
    return torch.ops.aten._softmax.out(x, 1, False, out=out)


def _log_softmax_into(x, out):
    return torch.ops.aten._log_softmax.out(x, 1, False, out=out)


def _rowdot(a, b, scratch):
    """sum_v a[c, v] * b[c, v] -> [C] fp32, accurate: the products go to `scratch` ([R, V], a quarter chunk, reused) R
    rows at a time and are summed by torch's cascade sum. A batched [1, V] x [V, 1] matmul needs no scratch but sums
    sequentially: 4.5e-4 absolute error at V = 32000 (5e-6 relative), too much for entropies that are differences.
    Few large blocks on purpose: every op is a parallel region, and on a loaded CPU each barrier can wait for a
    descheduled thread. Only the diagnostics use it; the KL's own dot reuses a dead workspace in place."""
    out = a.new_empty(a.shape[0])
    R = scratch.shape[0]
    for r in range(0, a.shape[0], R):
        n = min(R, a.shape[0] - r)
        torch.sum(torch.mul(a[r:r + n], b[r:r + n], out=scratch[:n, :a.shape[1]]), 1, out=out[r:r + n])
    return out


def _lse(m, p, i):
    """logsumexp per row of x [C, V] from its row max m [C], argmax i [C] and p = softmax(x) as computed:
    lse = m - log p[i] + log sum_v p. p[i] = 1 / S is >= 1 / V, so its log is exact to rounding; the last term undoes
    the softmax kernel's own rounding of S (its sequential fp32 sum: sum_v p - 1 ~ 6e-6 at V = 32000)."""
    return m - p.gather(1, i[:, None]).squeeze(1).log() + p.sum(1).log()


def _logits_into(h, w, out):
    """out [C, V] fp32 = h [C, H] @ w[V, H]^T, in the matmul dtype of h; fp32 writes straight into the workspace."""
    if h.dtype == torch.float32:
        return torch.mm(h, w.t(), out=out)
    return out.copy_(h @ w.t())                                                 # bf16 [C, V] temporary, then fp32


def _diag_T1(s_v, t, y):
    """Diagnostics at T = 1 from raw logits s_v [C, v] (student, shared vocab) and t [C, v]: two log-softmax
    temporaries. Used when T != 1 (the KD softmaxes are at T), before the workspaces are overwritten."""
    d = diagnostics(F.log_softmax(s_v, -1), F.log_softmax(t, -1), y)
    return torch.stack([d[k] for k in DIAG_KEYS])


def _chunk_objective(s_logits, t_logp_T, y, sp):
    """CE and KD sums of one chunk. s_logits [C, Vs] fp32 (the autograd leaf), t_logp_T [C, v] or None, y [C].
    Returns (ce, kd, s_logp_T); mirrors plain_loss operation for operation so fp32 results agree to rounding."""
    if t_logp_T is None:
        return F.cross_entropy(s_logits, y, reduction="sum"), None, None
    T, v = sp.temperature, sp.kd_vocab
    s_v = s_logits[:, :v] if v < s_logits.shape[1] else s_logits
    s_logp_T = F.log_softmax(s_v / T if T != 1.0 else s_v, -1)                 # [C, v]
    if T == 1.0 and v == s_logits.shape[1]:
        # Same log-softmax as the KD term: saves one [C, Vs] buffer and pass (cross_entropy is nll(log_softmax)).
        ce = -s_logp_T.gather(1, y[:, None]).sum()
    else:
        ce = F.cross_entropy(s_logits, y, reduction="sum")
    kd = (T * T) * sp.divergence(s_logp=s_logp_T, t_logp=t_logp_T, **sp.divergence_args).sum()
    return ce, kd, s_logp_T


def _autograd_chunk(z, t, q, y, sp, need_grad):
    """Any divergence: the chunk's objective differentiated by autograd. z [C, Vs] student logits, t [C, v] teacher
    logits or None, q [C, v] workspace (teacher log-probs); z and t are workspace slices, t is overwritten.
    Returns (ce, kd or None, diag [len(DIAG_KEYS)] or None, dL/dz [C, Vs] or None, scale 1.0).
    Live at the peak: the three workspaces plus what the divergence's graph holds (log-softmax, exp, its
    intermediates and their gradients: about six more [C, V])."""
    T = sp.temperature
    t_logp = diag = None
    if t is not None:
        with torch.no_grad():
            if sp.want_diag and T != 1.0:
                diag = _diag_T1(z[:, :sp.kd_vocab], t, y)
            t_logp = _log_softmax_into(t.div_(T) if T != 1.0 else t, q)       # [C, v], plain's log_softmax(t / T)
    dl = None
    out = _compiled_chunk(z, t_logp, y, sp) if (need_grad and sp.compile) else None
    if out is not None:
        ce, kd, s_logp_T, dl = out
    else:
        s_logits = z.detach().requires_grad_(need_grad)                         # leaf on the workspace, no copy
        with torch.set_grad_enabled(need_grad):
            ce, kd, s_logp_T = _chunk_objective(s_logits, t_logp, y, sp)
            if need_grad:
                total = sp.w_ce * ce + (sp.w_kd * kd if kd is not None else 0.0)
                (dl,) = torch.autograd.grad(total, s_logits)                    # frees this chunk's graph
    if sp.want_diag and t is not None and T == 1.0:
        d = diagnostics(s_logp_T.detach(), t_logp, y)
        diag = torch.stack([d[k] for k in DIAG_KEYS])
    return ce.detach(), (kd.detach() if kd is not None else None), diag, dl, 1.0


# torch.compile'd objective + gradient of the autograd route, one per (divergence, options, T, shared vocab, teacher):
# inductor fuses the divergence's elementwise chain and its backward into a few loops instead of ~30 separate
# [C, V] passes. Costs a compilation on first use of each key (tens of seconds on CPU; the last, shorter chunk adds
# one dynamic-shape recompile) and is off by default. A key whose compilation fails maps to None: eager from then on.
_COMPILED = {}


def _compiled_chunk(z, t_logp, y, sp):
    """(ce, kd or None, s_logp_T, dL/dz) from the compiled objective, or None when compile is unavailable."""
    try:
        key = (sp.divergence, tuple(sorted(sp.divergence_args.items())), sp.temperature, sp.kd_vocab,
               t_logp is not None)
        hash(key)
    except TypeError:                                                           # unhashable option: stay eager
        return None
    if key not in _COMPILED:
        static = _Spec(divergence=sp.divergence, divergence_args=dict(sp.divergence_args),
                       temperature=sp.temperature, kd_vocab=sp.kd_vocab)

        def objective_and_grad(s_logits, t_logp, y, w):                        # w [2]: weights as data, no recompile
            def total(zz):
                ce, kd, s_logp = _chunk_objective(zz, t_logp, y, static)
                if kd is None:
                    return w[0] * ce, (ce, ce, ce)
                return w[0] * ce + w[1] * kd, (ce, kd, s_logp)
            dl, (_, aux) = torch.func.grad_and_value(total, has_aux=True)(s_logits)
            return aux, dl
        try:
            _COMPILED[key] = torch.compile(objective_and_grad)
        except Exception as e:                                                  # noqa: BLE001 (no compiler, ...)
            _compile_failed(key, e)
    fn = _COMPILED[key]
    if fn is None:
        return None
    w = torch.tensor([sp.w_ce, sp.w_kd], dtype=torch.float32, device=z.device)
    try:
        (ce, kd, s_logp), dl = fn(z, t_logp, y, w)
    except Exception as e:                                                      # noqa: BLE001
        _compile_failed(key, e)
        return None                                                             # eager re-raises real errors
    if t_logp is None:
        return ce.detach(), None, None, dl
    return ce.detach(), kd.detach(), s_logp.detach(), dl


def _compile_failed(key, e):
    import warnings
    warnings.warn(f"fused KD head: torch.compile of the chunk objective failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly", RuntimeWarning)
    _COMPILED[key] = None


def _forward_kl_chunk(z, t, q, y, sp, need_grad):
    """CE + T^2 KL(p_t^T || p_s^T) in closed form, same contract as _autograd_chunk; z, t and q are all overwritten.

    With lse = logsumexp, q = softmax(t / T), p = softmax(z_v / T) over the shared vocab v, and sum_v q = 1:
        KL = sum_v q (t - z_v) / T - lse(t / T) + lse(z_v / T)
        CE = lse(z) - z_y                                               (full student vocab, T = 1)
        dL/dz = w_ce (softmax(z) - onehot(y)) + w_kd T (p - q) on the first v columns.
    lse comes from the softmax itself (_lse). fp32 accuracy: the softmax kernel's q sums to 1 only to ~6e-6 at
    V = 32000, and sum_v q (t - z) is ~10 where KL is ~7, so the dot is divided by the cascade-summed sum_v q and lse
    is corrected by it (_lse); without that the kd sum was 3e-5 off float64 (plain: 1.5e-6).
    Per chunk at T = 1, v = Vs: two row maxima, two softmax kernels, three row sums, one subtraction, one row dot and
    one in-place combination, two exp per element; autograd through the plugin does about twice the passes and three
    exp. Three [C, V] fp32 buffers (the workspaces) and a few-MiB scratch, nothing else of that size.
    The diagnostics (T = 1) cost two more row dots; at T != 1 they need their own log-softmaxes (_diag_T1)."""
    c, Vs = z.shape
    rows = torch.arange(c, device=z.device)
    scratch = sp.scratch
    z_y = z.gather(1, y[:, None]).squeeze(1)                                    # [C], before z is overwritten
    if t is None:                                                               # CE only (no teacher)
        m, i = z.max(1)
        p = _softmax_into(z, z)                                                 # [C, Vs] in place
        ce = (_lse(m, p, i) - z_y).sum()
        if not need_grad:
            return ce, None, None, None, 1.0
        p[rows, y] -= 1.0
        return ce, None, None, p, sp.w_ce
    T, v = sp.temperature, t.shape[1]
    zv = z[:, :v] if v < Vs else z                                              # [C, v] view
    want_diag = sp.want_diag
    diag = _diag_T1(zv, t, y) if want_diag and T != 1.0 else None              # before the in-place steps
    if T != 1.0:
        t.div_(T)                                                               # t / T, as plain
    mt, it = t.max(1)                                                           # [C]
    inside = y < v                                                              # targets beyond the shared vocab
    t_y = t.gather(1, y.clamp(max=v - 1)[:, None]).squeeze(1) if want_diag and T == 1.0 else None  # before t dies
    _softmax_into(t, q)                                                         # q = p_t [C, v]
    sq = q.sum(1)                                                               # 1 up to the kernel's rounding
    lse_t = mt - q.gather(1, it[:, None]).squeeze(1).log() + sq.log()
    qt = _rowdot(q, t, scratch) / sq if want_diag and T == 1.0 else None      # sum_v q t (teacher entropy)
    ms, i_s = zv.max(1)                                                         # student argmax on the shared vocab
    t.sub_(zv, alpha=1.0 / T).mul_(q)                                           # t <- q (t - z_v) / T, t dies here
    d = t.sum(1) / sq                                                           # cascade sum: sum_v q (t - z_v) / T
    pT = t                                                                      # reused for p_s^T
    if T == 1.0:
        _softmax_into(zv, pT)
    else:
        _softmax_into(torch.div(zv, T, out=pT), pT)
    sp_ = pT.sum(1)                                                             # 1 up to the kernel's rounding
    lse_s = ms / T if T != 1.0 else ms
    lse_s = lse_s - pT.gather(1, i_s[:, None]).squeeze(1).log() + sp_.log()   # as _lse
    kl = d - lse_t + lse_s                                                      # [C] KL(p_t || p_s) at T
    kd = (T * T) * kl.sum()
    if want_diag and T == 1.0:
        p_true = torch.where(inside, q.gather(1, y.clamp(max=v - 1)[:, None]).squeeze(1) / sq, 0.0)
        fast = v == Vs                                                          # z dies below: product in place
        pz = (zv.mul_(pT).sum(1) if fast else _rowdot(pT, zv, scratch)) / sp_
        diag = torch.stack([(lse_s - pz).sum(),                                 # student: lse - sum p z
                            (lse_t - qt).sum(),                                 # teacher: lse - sum q t
                            kl.sum(), (i_s == it).float().sum(), p_true.sum(),
                            torch.where(inside, lse_t - t_y, 0.0).sum()])              # teacher CE: lse - t_y
    b = sp.w_kd * T
    if T == 1.0 and v == Vs:                                                    # CE shares the KD softmax
        ce = (lse_s - z_y).sum()
        if not need_grad:
            return ce, kd, diag, None, 1.0
        a = sp.w_ce + b                                                         # dL/dz = a p - b q - w_ce onehot
        if a == 0.0:
            return ce, kd, diag, pT.zero_(), 0.0
        pT.add_(q, alpha=-b / a)                                                # scale a is folded into the matmuls
        pT[rows, y] -= sp.w_ce / a
        return ce, kd, diag, pT, a
    m1, i1 = (ms, i_s) if v == Vs else z.max(1)
    p1 = _softmax_into(z, z)                                                    # full-vocab softmax at T = 1
    ce = (_lse(m1, p1, i1) - z_y).sum()
    if not need_grad:
        return ce, kd, diag, None, 1.0
    pT.sub_(q)                                                                  # p_s^T - p_t^T
    if sp.w_ce != 0.0:
        p1[:, :v].add_(pT, alpha=b / sp.w_ce)
        p1[rows, y] -= 1.0
        return ce, kd, diag, p1, sp.w_ce
    p1.zero_()[:, :v].copy_(pT)
    return ce, kd, diag, p1, b


def _chunk_loop(hs, ws, ht, wt, y, sp, need_h, need_w):
    """The single pass over the vocab. hs [N, Hs], ws [Vs, Hs], ht [N, Ht] / wt [v, Ht] or None, y [N].
    Returns stats [2 + len(DIAG_KEYS)] fp32 (ce_sum, kd_sum, diagnostics), grad_h [N, Hs] or None, grad_w or None."""
    N, Hs = hs.shape
    Vs = ws.shape[0]
    has_teacher = ht is not None
    w_s = ws.detach().to(sp.s_dtype)                                            # [Vs, Hs]; no copy if same dtype
    w_t = wt.detach().to(sp.t_dtype) if has_teacher else None                   # [v, Ht]
    need_grad = need_h or need_w
    grad_h = hs.new_empty(N, Hs, dtype=sp.s_dtype) if need_h else None
    grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
    stats = torch.zeros(2 + len(DIAG_KEYS), dtype=torch.float32, device=hs.device)
    C = max(1, min(sp.chunk, N))
    # The chunk's [C, V] fp32 workspaces, allocated once and reused by every chunk: a fresh 100+ MiB tensor per
    # chunk and step would be mmap'd and page-faulted in again each time on CPU (~50 ms per 128 MiB buffer).
    f32 = dict(dtype=torch.float32, device=hs.device)
    zbuf = torch.empty(C, Vs, **f32)                                            # student logits, then dL/dz
    tbuf = torch.empty(C, sp.kd_vocab, **f32) if has_teacher else None          # teacher logits, then p_s^T
    qbuf = torch.empty(C, sp.kd_vocab, **f32) if has_teacher else None          # teacher (log-)probs
    # Row-dot scratch for the closed form's diagnostics: a quarter chunk (+8 % of the head's peak at V = 32000).
    sp.scratch = None
    if sp.chunk_fn is _forward_kl_chunk and has_teacher and sp.want_diag:       # the diagnostics' row dots
        sp.scratch = torch.empty(max(1, -(-C // 4)), Vs, **f32)
    chunk_fn = sp.chunk_fn
    for i in range(0, N, C):
        h = hs[i:i + C].detach().to(sp.s_dtype)                                 # [c, Hs]
        c = h.shape[0]
        z = _logits_into(h, w_s, zbuf[:c])                                      # [c, Vs]
        t = q = None
        if has_teacher:
            t = _logits_into(ht[i:i + C].to(sp.t_dtype), w_t, tbuf[:c])         # [c, v]
            q = qbuf[:c]
        ce, kd, diag, dl, scale = chunk_fn(z, t, q, y[i:i + C], sp, need_grad)
        stats[0] += ce
        if kd is not None:
            stats[1] += kd
        if diag is not None:
            stats[2:] += diag
        if need_grad:
            if sp.s_dtype != torch.float32 and scale != 1.0:
                dl.mul_(scale)                                                  # bf16: round dL/dz itself once
                scale = 1.0
            dl = dl.to(sp.s_dtype)                                              # [c, Vs], what autograd feeds mm
            if need_h:
                gh = torch.mm(dl, w_s, out=grad_h[i:i + c])
                if scale != 1.0:
                    gh.mul_(scale)                                              # [c, Hs]: cheaper than scaling dl
            if need_w:
                _accumulate_weight_grad(grad_w, dl, h, scale)
        del z, t, q, dl
    return stats, grad_h, grad_w


class _FusedKDHead(torch.autograd.Function):
    """Forward computes loss, stats and both gradients; backward scales the gradients by grad_output."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, y, sp):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dev = hs.device.type
        with torch.autocast(device_type=dev, enabled=False):                   # dtypes were resolved by the caller
            stats, grad_h, grad_w = _chunk_loop(hs, ws, ht, wt, y, sp, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = hs.dtype, ws.dtype
        loss = sp.w_ce * stats[0] + sp.w_kd * stats[1]
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * g_loss).to(ctx.h_dtype) if grad_h is not None else None
        # In place: the accumulator is ours and used once. A second backward through the same graph (retain_graph)
        # fails on autograd's version check instead of silently scaling twice.
        gw = grad_w.mul_(g_loss).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


# Closed forms the head knows, by name. A divergence opts in with the attribute `fused_closed_form = "<name>"` (set
# on the function in plugins/divergences.py, checked by identity of meaning: only when it has no divergence_args);
# every other divergence, user plugins included, goes through autograd on the chunk.
CLOSED_FORMS = {"forward_kl": _forward_kl_chunk}


def _pick_chunk_fn(has_teacher, divergence, divergence_args, closed_form):
    if not closed_form:
        return _autograd_chunk
    if not has_teacher:
        return _forward_kl_chunk                                                # its CE-only branch
    name = getattr(divergence, "fused_closed_form", None)
    if name in CLOSED_FORMS and not divergence_args:
        return CLOSED_FORMS[name]
    return _autograd_chunk


def fused_loss(*, student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None, kd_vocab=None,
               divergence=None, divergence_args=None, temperature=1.0, w_ce=1.0, w_kd=0.0, want_diag=False,
               ignore_index=IGNORE_INDEX, chunk_size=0, closed_form=True, compile=False, **_):
    """Chunked path; arguments as plain_loss, plus
    chunk_size   rows per chunk; 0 = auto_chunk_rows(vocab);
    closed_form  True: CE and divergences that declare a closed form (forward_kl) get their values and dL/dlogits
                 from formulas (fewer passes and buffers); False: autograd on every chunk (the reference route);
    compile      True: torch.compile the autograd route's per-chunk objective + gradient (not the closed form, which
                 is already a handful of fused kernels); falls back to eager, with one warning, when compiling fails."""
    mask = targets.reshape(-1) != ignore_index
    y = targets.reshape(-1)[mask]                                               # [N]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])[mask]            # [N, Hs], small next to [N, V]
    has_teacher = teacher_hidden is not None
    if has_teacher:
        v = kd_vocab or min(student_weight.shape[0], teacher_weight.shape[0])
        ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[mask]  # [N, Ht]
        wt = teacher_weight.detach()[:v]                                       # [v, Ht] view: padded rows dropped
        if divergence is None:
            raise ValueError("fused_loss: a teacher was given but no divergence")
    else:
        v, ht, wt = None, None, None
    divergence_args = dict(divergence_args or {})
    chunk = int(chunk_size) if chunk_size else auto_chunk_rows(student_weight.shape[0])
    sp = _Spec(chunk=max(1, chunk), kd_vocab=v, temperature=float(temperature), w_ce=float(w_ce), w_kd=float(w_kd),
               divergence=divergence, divergence_args=divergence_args, want_diag=bool(want_diag),
               s_dtype=_compute_dtype(hs), t_dtype=_compute_dtype(ht) if has_teacher else None,
               chunk_fn=_pick_chunk_fn(has_teacher, divergence, divergence_args, closed_form),
               compile=bool(compile))
    if torch.is_grad_enabled() and (hs.requires_grad or student_weight.requires_grad):
        loss, stats = _FusedKDHead.apply(hs, student_weight, ht, wt, y, sp)
    else:
        # No gradient wanted (evaluation, torch.no_grad): no [Vs, Hs] / [N, Hs] gradient buffers, no gradient
        # matmuls. (Function.apply would still report needs_input_grad from requires_grad under no_grad.)
        with torch.no_grad(), torch.autocast(device_type=hs.device.type, enabled=False):
            stats, _, _ = _chunk_loop(hs, student_weight, ht, wt, y, sp, False, False)
        loss = sp.w_ce * stats[0] + sp.w_kd * stats[1]
    diag = {k: stats[2 + j] for j, k in enumerate(DIAG_KEYS)} if (want_diag and has_teacher) else {}
    kd_sum = stats[1] if has_teacher else stats.new_zeros(())
    return LossParts(loss=loss, ce_sum=stats[0], kd_sum=kd_sum, n_tokens=mask.sum(), diag=diag)
