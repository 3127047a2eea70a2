"""Fused KD head (issue 4): CE + KD + diagnostics from last hidden states and output weights, chunk by chunk.

Same contract as `distillery.loss.plain_loss` (read loss.py's docstring), registered as IMPLS["fused"].

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

from distillery.loss import DIAG_KEYS, IGNORE_INDEX, IMPLS, LossParts, diagnostics

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


def _accumulate_weight_grad(grad_w, dl, h):
    """grad_w [V, H] fp32 += dl^T [V, C] @ h [C, H]. The fp32 accumulator keeps bf16 rounding from growing with the
    number of chunks; without a mixed-precision kernel each chunk's product is rounded to bf16 once (a [V, H] temp)."""
    if dl.dtype == torch.float32:
        grad_w.addmm_(dl.t(), h)
    elif _fp32_out_addmm_ok(dl.device, dl.dtype):
        torch.addmm(grad_w, dl.t(), h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.add_(dl.t() @ h)


class _Spec:
    """Everything non-tensor the chunk loop needs (passed through autograd.Function.apply as one object)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


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


def _chunk_loop(hs, ws, ht, wt, y, sp, need_h, need_w):
    """The single pass over the vocab. hs [N, Hs], ws [Vs, Hs], ht [N, Ht] / wt [v, Ht] or None, y [N].
    Returns stats [2 + len(DIAG_KEYS)] fp32 (ce_sum, kd_sum, diagnostics), grad_h [N, Hs] or None, grad_w or None."""
    N, Hs = hs.shape
    has_teacher = ht is not None
    w_s = ws.detach().to(sp.s_dtype)                                            # [Vs, Hs]; no copy if same dtype
    w_t = wt.detach().to(sp.t_dtype) if has_teacher else None                   # [v, Ht]
    need_grad = need_h or need_w
    grad_h = hs.new_empty(N, Hs, dtype=sp.s_dtype) if need_h else None
    grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
    stats = torch.zeros(2 + len(DIAG_KEYS), dtype=torch.float32, device=hs.device)
    T = sp.temperature
    for i in range(0, N, sp.chunk):
        h = hs[i:i + sp.chunk].detach().to(sp.s_dtype)                          # [C, Hs]
        yc = y[i:i + sp.chunk]
        t_logp_T = t_logits = None
        if has_teacher:
            with torch.no_grad():
                t_logits = (ht[i:i + sp.chunk].to(sp.t_dtype) @ w_t.t()).float()  # [C, v]
                t_logp_T = F.log_softmax(t_logits / T if T != 1.0 else t_logits, -1)
        s_logits = (h @ w_s.t()).float()                                        # [C, Vs], no graph behind it
        with torch.set_grad_enabled(need_grad):
            s_logits.requires_grad_(need_grad)
            ce, kd, s_logp_T = _chunk_objective(s_logits, t_logp_T, yc, sp)
            if need_grad:
                total = sp.w_ce * ce + (sp.w_kd * kd if kd is not None else 0.0)
                (dl,) = torch.autograd.grad(total, s_logits)                    # frees this chunk's graph
        stats[0] += ce.detach()
        if kd is not None:
            stats[1] += kd.detach()
        if sp.want_diag and has_teacher:
            with torch.no_grad():
                if T == 1.0:
                    s1, t1 = s_logp_T.detach(), t_logp_T
                else:
                    v = sp.kd_vocab
                    s1 = F.log_softmax(s_logits.detach()[:, :v], -1)
                    t1 = F.log_softmax(t_logits, -1)
                d = diagnostics(s1, t1, yc)
                stats[2:] += torch.stack([d[k] for k in DIAG_KEYS])
                del s1, t1, d
        del s_logits, s_logp_T, t_logp_T, t_logits
        if need_grad:
            dl = dl.to(sp.s_dtype)                                              # [C, Vs], what autograd feeds mm
            if need_h:
                torch.mm(dl, w_s, out=grad_h[i:i + sp.chunk])
            if need_w:
                _accumulate_weight_grad(grad_w, dl, h)
            del dl
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


def fused_loss(*, student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None, kd_vocab=None,
               divergence=None, divergence_args=None, temperature=1.0, w_ce=1.0, w_kd=0.0, want_diag=False,
               ignore_index=IGNORE_INDEX, chunk_size=0, **_):
    """Chunked path; arguments as plain_loss, plus chunk_size (rows per chunk; 0 = auto_chunk_rows(vocab))."""
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
    chunk = int(chunk_size) if chunk_size else auto_chunk_rows(student_weight.shape[0])
    sp = _Spec(chunk=max(1, chunk), kd_vocab=v, temperature=float(temperature), w_ce=float(w_ce), w_kd=float(w_kd),
               divergence=divergence, divergence_args=dict(divergence_args or {}), want_diag=bool(want_diag),
               s_dtype=_compute_dtype(hs), t_dtype=_compute_dtype(ht) if has_teacher else None)
    loss, stats = _FusedKDHead.apply(hs, student_weight, ht, wt, y, sp)
    diag = {k: stats[2 + j] for j, k in enumerate(DIAG_KEYS)} if (want_diag and has_teacher) else {}
    kd_sum = stats[1] if has_teacher else stats.new_zeros(())
    return LossParts(loss=loss, ce_sum=stats[0], kd_sum=kd_sum, n_tokens=mask.sum(), diag=diag)


IMPLS["fused"] = fused_loss
