"""One KD micro-step, and the step statistics of a log interval: the code both train.py and bench/train_step.py run.

micro_step: teacher forward (no grad) -> gathered teacher head -> student forward + loss (distillery/loss.py) ->
engine.backward -> engine.step. DeepSpeed owns accumulation: engine.step() each micro-batch only applies the
update at the accumulation boundary.
"""
import contextlib
import dataclasses
import time

import deepspeed
import torch
import torch.distributed as dist

from distillery.loss_parts import DIAG_KEYS


class Timer:
    """Device-synchronised wall time of code blocks, when enabled (a sync costs overlap, so the trainer enables it
    on reported steps only). `with timer(): ...` adds the block's seconds to timer.seconds."""

    def __init__(self, device, enabled=True):
        self.enabled, self.seconds = enabled, 0.0
        self._sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self):
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.seconds += time.perf_counter() - t0


def micro_step(engine, teacher, x, y, loss_kw, w_ce, w_kd, want_diag=False, teacher_timer=None, positions=None):
    """One micro-batch through teacher and student, backward and (accumulation-aware) step.

    x, y: [mb, S] token rows and their targets on the engine's device. positions: [mb, S] document positions
    (distillery/packing.py) given to both models, or None (one causal sequence per row). loss_kw: Objective.loss_kw(). w_ce, w_kd: the
    loss weights with any normalisation folded in. Returns the engine's output dict (loss, ce_sum, kd_sum, n_tokens,
    diag). teacher_timer: a callable returning a context manager around the teacher's share (its forward and the
    gather of its head), e.g. a Timer. A partitioned teacher's output weight is gathered for the duration of the
    student's forward only (the fused head reads it chunk by chunk; ZeRO-3 releases it right after); a replicated
    teacher's (distillery/placement.py) is read as it is, no collective."""
    t_hidden, t_weight = None, None
    with contextlib.ExitStack() as held:  # holds the gathered teacher head until the student's forward is done
        if teacher is not None:
            with teacher_timer() if teacher_timer is not None else contextlib.nullcontext(), torch.no_grad():
                t_hidden = teacher(x, position_ids=positions)                      # [mb, S, Ht]
                t_weight = teacher.module.head_weight                              # [Vt, Ht]
                if hasattr(t_weight, "ds_id"):  # ZeRO-3 partition: gather it (collective, every rank)
                    held.enter_context(deepspeed.zero.GatheredParameters([t_weight], modifier_rank=None))
        parts = engine(input_ids=x, targets=y, teacher_hidden=t_hidden, teacher_weight=t_weight, w_ce=w_ce,
                       w_kd=w_kd, want_diag=want_diag and teacher is not None, position_ids=positions, **loss_kw)
    if t_hidden is not None:  # which term went bad, when one does (a [mb, S, Ht] reduction: ~free next to the forward)
        parts["teacher_finite"] = torch.isfinite(t_hidden).all()
    engine.backward(parts["loss"])
    engine.step()
    return parts


@dataclasses.dataclass
class Summary:
    """Token means over a log interval, identical on every rank."""
    total: float
    ce: float
    kd: float
    nonfinite: int        # micro-batches whose loss was not finite
    diag: dict            # diagnostics' token means (empty when not asked for)
    bad_terms: tuple = () # which terms were non-finite in some micro-batch: "CE", "KD", "teacher hidden states"


BAD_TERMS = ("CE", "KD", "teacher hidden states")
N_FIXED = 7  # sums: total, ce, kd, bad loss, bad ce, bad kd, bad teacher; then the diagnostics


class StepStats:
    """Sums over the micro-batches and steps of one log interval, kept on the device (no host sync per step) and
    reduced across ranks once per log step."""

    def __init__(self, device, want_diag):
        self.want_diag = want_diag
        self._sums = torch.zeros(N_FIXED + len(DIAG_KEYS), dtype=torch.float64, device=device)
        self.tokens, self.steps = 0.0, 0

    def add(self, parts, inv_n, w_ce, w_kd):
        """One micro-batch: its CE and KD sums as its share of the step's global token mean (x inv_n = 1/N)."""
        ce, kd = parts["ce_sum"].double() * inv_n, parts["kd_sum"].double() * inv_n
        bad = [~torch.isfinite(t) for t in (parts["loss"], ce, kd)]
        bad.append(~parts.get("teacher_finite", torch.ones((), dtype=torch.bool, device=ce.device)))
        self._sums[:N_FIXED] += torch.stack([w_ce * ce + w_kd * kd, ce, kd] + [b.double() for b in bad])
        for i, k in enumerate(DIAG_KEYS):
            if k in parts["diag"]:
                self._sums[N_FIXED + i] += parts["diag"][k].double()

    def local_bad_terms(self):
        """This rank's non-finite terms so far in the interval (a host sync: only when something already went wrong)."""
        return tuple(t for t, v in zip(BAD_TERMS, self._sums[4:N_FIXED].tolist()) if v > 0)

    def end_step(self, n_tokens):
        self.steps += 1
        self.tokens += n_tokens

    def summary(self):
        """All-reduce the interval's sums (collective: every rank calls it on the same steps) and reset."""
        dist.all_reduce(self._sums)
        a = self._sums.tolist()
        out = Summary(total=a[0] / self.steps, ce=a[1] / self.steps, kd=a[2] / self.steps, nonfinite=int(a[3]),
                      diag={k: a[N_FIXED + i] / self.tokens for i, k in enumerate(DIAG_KEYS)} if self.want_diag else {},
                      bad_terms=tuple(t for t, v in zip(BAD_TERMS, a[4:N_FIXED]) if v > 0))
        self._sums.zero_()
        self.tokens, self.steps = 0.0, 0
        return out
