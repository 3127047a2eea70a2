"""Silent divergence, made loud: every step's health, a stop after a streak of bad steps, no "successful" useless run.

A step is bad when DeepSpeed skipped its update (non-finite gradients: its overflow check runs in every step, so
reading the counter costs nothing) or, seen at log steps, when its loss was not finite. After `max_bad_steps`
consecutive bad steps the run stops with the steps, the term that went non-finite (CE, KD, the teacher's hidden
states, or only the gradients) and the last checkpoint saved before the streak, which is a good one: a checkpoint is
only written after its interval's loss was checked. A run that skipped more than `max_skipped_frac` of its steps
fails at the end (no export), however short it is. Skipped steps are logged as train/skipped_steps.
"""
from distillery.errors import TrainingError


class Guard:
    def __init__(self, cfg, engine, start_step):
        self.max_bad, self.max_frac = cfg.max_bad_steps, cfg.max_skipped_frac
        self.prev = int(getattr(engine, "skipped_steps", 0))
        self.streak = self.skipped = self.steps = 0
        self.first_bad = None
        self.last_good = None if start_step == 0 else f"the checkpoint of step {start_step} (resume=auto)"

    def _advice(self):
        where = f"resume from {self.last_good}" if self.last_good else "no checkpoint was saved before it: start again"
        return f"{where} with a lower lr (or alpha), or check the data"

    def after_step(self, step, engine, stats):
        """After optimizer step `step` (1-based): count a skipped update; stop after a streak of them."""
        now = int(getattr(engine, "skipped_steps", 0))
        bad, self.prev = now > self.prev, now
        self.steps += 1
        if not bad:
            self.streak, self.first_bad = 0, None
            return
        self.skipped += 1
        self.streak += 1
        self.first_bad = self.first_bad or step
        if self.streak >= self.max_bad:
            terms = stats.local_bad_terms() or ("the gradients (every loss term was finite)",)
            raise TrainingError(f"{self.streak} consecutive optimizer steps ({self.first_bad}..{step}) were skipped for "
                                f"non-finite values in {', '.join(terms)}; {self._advice()}")

    def check_interval(self, summary, first, last):
        """At a log step: a non-finite loss anywhere in steps first..last stops the run before any checkpoint."""
        if summary.nonfinite:
            terms = ", ".join(summary.bad_terms) or "the loss"
            raise TrainingError(f"loss is not finite between steps {first} and {last}; {self._advice()} "
                                f"(non-finite: {terms})")

    def saved(self, step, path):
        """A checkpoint was written; it is a good one only outside a run of skipped steps."""
        if self.streak == 0:
            self.last_good = f"{path} (resume={path})"

    def metrics(self):
        return {"train/skipped_steps": self.skipped}

    def at_end(self):
        """A run that mostly skipped its updates did not train: fail it (before its export)."""
        if self.steps and self.skipped > self.max_frac * self.steps:
            raise TrainingError(f"{self.skipped} of {self.steps} optimizer steps were skipped (non-finite gradients), "
                                f"more than max_skipped_frac={self.max_frac:g}: the student did not train; "
                                f"{self._advice()}")
