"""Built-in callbacks: entropy diagnostics, console progress, TensorBoard scalars."""
import sys
import time

from plugins import register


@register("callback", "entropy")
class Entropy:
    """Student/teacher entropy, KL(t||s), top-1 agreement, teacher p(true): token means over the log interval."""
    wants_diagnostics = True  # asks the loss to compute per-token diagnostics (same chunk loop, no extra pass)

    def on_step_end(self, metrics=None, diag=None, **_):
        if metrics is None or not diag:
            return
        names = {"student_entropy": "entropy/student", "teacher_entropy": "entropy/teacher", "kl": "entropy/kl_t_s",
                 "top1_agree": "entropy/top1_agreement", "teacher_p_true": "entropy/teacher_p_true"}
        for k, v in diag.items():
            metrics[names.get(k, f"entropy/{k}")] = v


@register("callback", "progress")
class Progress:
    """One console line per log step on rank 0: loss, tokens/s, ETA."""

    def on_train_start(self, rank=0, start_step=0, total_steps=0, cfg=None, teacher=None, **_):
        self.rank, self.t0, self.start, self.total = rank, time.perf_counter(), start_step, total_steps
        if rank == 0:
            kd = (f"alpha={cfg.alpha} {cfg.mix}/{cfg.divergence} T={cfg.temperature}, teacher {cfg.teacher}"
                  if teacher is not None else "no teacher (alpha = 0)")
            print(f"[{cfg.name}] {cfg.student} {kd}: steps {start_step}->{total_steps}, "
                  f"{cfg.global_batch_size}x{cfg.seq_len} tokens/step", flush=True)

    def on_step_end(self, step=0, metrics=None, **_):
        if metrics is None or self.rank != 0:
            return
        rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        kd = f" ce {metrics['loss/ce']:.4f} kd {metrics['loss/kd']:.4f}" if "perf/teacher_share" in metrics else ""
        print(f"step {step:>6}/{self.total} loss {metrics['loss/total']:.4f}{kd} lr {metrics['lr']:.2e} "
              f"| {metrics['perf/tokens_per_s']:,.0f} tok/s | ETA {_hms(eta)}", flush=True)

    def on_eval(self, step=0, results=None, **_):
        if self.rank == 0 and results:
            line = " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in results.items() if k.endswith("/loss"))
            print(f"eval @ {step}: loss {line}", file=sys.stdout, flush=True)


def _hms(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@register("callback", "tensorboard")
class TensorBoard:
    """Every metric of a log step and every eval result as a TensorBoard scalar (rank 0's writer)."""

    def on_step_end(self, step=0, metrics=None, writer=None, **_):
        if metrics is not None and writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)

    def on_eval(self, step=0, results=None, writer=None, **_):
        if writer is not None:
            for k, v in (results or {}).items():
                writer.add_scalar(k, v, step)
            writer.flush()

    def on_train_end(self, writer=None, **_):
        if writer is not None:
            writer.flush()
