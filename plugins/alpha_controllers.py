"""Alpha controllers (the contract: plugins/base.py AlphaController): alpha from what the run measures.

gap: the mini grid (docs/results/mini-grid.md) found the best fixed alpha rises with the teacher's strength (0.2 for
teachers weaker than the student, 0.5 for a stronger one), and a user cannot know beforehand how a teacher will stand
against a student that does not exist yet. What the run can measure is the teacher's lead on the very batches being
trained: gap = CE_student - CE_teacher (nats per token, token means over the global batch). A teacher far ahead
(every teacher at step 0, a strong one throughout) gets the ceiling; as the student closes in, alpha falls, and once
the student is the better predictor of the data, alpha is 0 and the run is plain LM training:

    alpha = ceiling * clip(g / scale, 0, 1),     g = ema * g_prev + (1 - ema) * gap_interval

The gap is measured every `every` optimizer steps over all of their micro-batches and ranks (one all_reduce of three
numbers and one host sync per update). The teacher's CE comes from the loss's diagnostics (teacher_ce), so the loss
computes them on every micro-batch (a few row reductions per chunk of the fused head) and a live teacher is needed.
"""
import torch
import torch.distributed as dist

from distillery.errors import ConfigError
from plugins import AlphaController, register


@register("alpha_controller", "gap")
class Gap(AlphaController):
    """alpha = ceiling * clip(gap / scale, 0, 1); gap = student CE - teacher CE on the training batches (EMA)."""
    options = {"every": 10, "scale": 0.5, "ema": 0.5}
    wants_diagnostics = True

    def __init__(self, ceiling, total_steps, **opts):
        super().__init__(ceiling, total_steps, **opts)
        every, scale, ema = self.opts["every"], self.opts["scale"], self.opts["ema"]
        if not (isinstance(every, int) and every >= 1) or not scale > 0 or not 0 <= ema < 1:
            raise ConfigError(f"alpha_controller_args for gap: every={every!r} must be an integer >= 1, "
                              f"scale={scale!r} > 0 (nats), ema={ema!r} in [0, 1)")
        self._alpha = self.ceiling   # before the first measurement: an untrained student trails any teacher
        self.gap = None              # smoothed gap in nats; None before the first update
        self._acc = None             # this rank's [student CE sum, teacher CE sum, tokens] since the last update
        self._carried = None         # the global partial sums a resumed run restored, added at its first update

    def alpha(self, step):
        return self._alpha

    def observe(self, parts):
        v = torch.stack([parts["ce_sum"].double(), parts["diag"]["teacher_ce"].double(),
                         torch.as_tensor(parts["n_tokens"], device=parts["ce_sum"].device).double()])
        self._acc = v if self._acc is None else self._acc + v

    def _global(self):
        """This interval's sums over every rank (collective), plus any carried over from a checkpoint."""
        out = [0.0, 0.0, 0.0]
        if self._acc is not None:  # every rank observes the same micro-batches, so all or none get here
            acc = self._acc.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(acc)
            out = acc.tolist()
        if self._carried is not None:
            out = [a + b for a, b in zip(out, self._carried)]
        return out

    def end_step(self, step):
        if step % self.opts["every"]:
            return
        ce, tce, n = self._global()
        self._acc, self._carried = None, None
        if n <= 0:
            return
        g, e = (ce - tce) / n, self.opts["ema"]
        self.gap = g if self.gap is None else e * self.gap + (1 - e) * g
        self._alpha = self.ceiling * min(max(self.gap / self.opts["scale"], 0.0), 1.0)

    def metrics(self):
        return {} if self.gap is None else {"alpha/gap": self.gap}

    def state_dict(self):
        """Called on every rank at a checkpoint (the save is collective), so the partial interval's sums are
        reduced here: a resumed run, on any number of ranks, continues with the same numbers."""
        return {"alpha": self._alpha, "gap": self.gap, "partial": self._global()}

    def load_state_dict(self, state):
        self._alpha, self.gap = float(state["alpha"]), state["gap"]
        self._acc, self._carried = None, list(state["partial"])
