"""Built-in callbacks: entropy diagnostics (a producer), console progress and TensorBoard scalars (writers)."""
import sys
import time

from plugins import Callback, register

ENTROPY_NAMES = {"student_entropy": "entropy/student", "teacher_entropy": "entropy/teacher", "kl": "entropy/kl_t_s",
                 "top1_agree": "entropy/top1_agreement", "teacher_p_true": "entropy/teacher_p_true",
                 "teacher_ce": "entropy/teacher_ce"}



def _cache_kind(cfg):
    from distillery.teacher_cache import read_cache_index
    ix = read_cache_index(cfg.teacher_cache)
    return (f"top-{ix['k']}, {cfg.teacher_cache_mode}" if ix["method"] == "topk" else
            f"{ix['k']} samples, unbiased")

@register("callback", "entropy")
class Entropy(Callback):
    """Student/teacher entropy, KL(t||s), top-1 agreement, teacher p(true), teacher CE: token means over the log
    interval."""
    wants_diagnostics = True  # asks the loss to compute per-token diagnostics (same chunk loop, no extra pass)

    def on_step_end(self, ctx, step, metrics, diag):
        if metrics is None or not diag:
            return
        for k, v in diag.items():
            metrics[ENTROPY_NAMES.get(k, f"entropy/{k}")] = v


@register("callback", "progress")
class Progress(Callback):
    """One console line per log step on rank 0: loss, tokens/s, ETA; one per evaluation."""

    def on_train_start(self, ctx):
        self.t0 = time.perf_counter()
        cfg = ctx.cfg
        if ctx.rank == 0:
            kd = (f"alpha={cfg.alpha} {cfg.mix}/{cfg.divergence} T={cfg.temperature}, teacher {cfg.teacher}"
                  if ctx.teacher is not None else
                  f"alpha={cfg.alpha} {cfg.mix} T={cfg.temperature}, teacher cache {cfg.teacher_cache} "
                  f"({_cache_kind(cfg)})" if cfg.alpha and cfg.teacher_cache else "no teacher (alpha = 0)")
            mask = "document-masked" if cfg.doc_mask else "one causal sequence per row"
            print(f"[{cfg.name}] {cfg.student} {kd}: steps {ctx.start_step}->{ctx.total_steps}, "
                  f"{cfg.global_batch_size}x{cfg.seq_len} tokens/step ({mask}, attention {cfg.attn_impl})", flush=True)

    def on_log(self, ctx, step, record):
        if ctx.rank != 0:
            return
        if "loss/total" in record:
            rate = (step - ctx.start_step) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (ctx.total_steps - step) / max(rate, 1e-9)
            kd = (f" ce {record['loss/ce']:.4f} kd {record['loss/kd']:.4f}"
                  if ctx.teacher is not None or ctx.cfg.teacher_cache else "")
            print(f"step {step:>6}/{ctx.total_steps} loss {record['loss/total']:.4f}{kd} lr {record['lr']:.2e} "
                  f"| {record['perf/tokens_per_s']:,.0f} tok/s | ETA {_hms(eta)}", flush=True)
        elif any(k.startswith("eval/") and k.endswith("/loss") for k in record):
            line = " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in record.items() if k.endswith("/loss"))
            print(f"eval @ {step}: loss {line}", file=sys.stdout, flush=True)


def _hms(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@register("callback", "tensorboard")
class TensorBoard(Callback):
    """Every logged number (step metrics, evaluations, end-of-run results) as a TensorBoard scalar (rank 0)."""

    def on_log(self, ctx, step, record):
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                ctx.writer.add_scalar(k, v, step)
        if "loss/total" not in record:  # evaluations are rare and looked at right away
            ctx.writer.flush()

    def on_train_end(self, ctx, step, export_dir, metrics):
        ctx.writer.flush()

    def on_error(self, ctx, step, error):
        ctx.writer.flush()
