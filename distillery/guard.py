"""Silent divergence, made loud: every step's health, a stop after a streak of bad steps, no "successful" useless run.

A step is bad when DeepSpeed skipped its update (non-finite gradients: its overflow check runs in every step, so
reading the counter costs nothing) or, seen at log steps, when its loss was not finite. After `max_bad_steps`
consecutive bad steps the run stops with the steps, the term that went non-finite (CE, KD, the teacher's hidden
states, or only the gradients) and the last checkpoint *verified* good, or says that none is known. A run that
skipped more than `max_skipped_frac` of its steps (counted over the whole run, across resumes) fails at the end (no
export), however short it is. Skipped steps are logged as train/skipped_steps.

Which checkpoint is good: a finite loss before a save says nothing about the weights the save holds (the update of
the save's own step may already have ruined them: lr=1e6 puts them at 1e11 with every logged loss finite). So a
checkpoint is only a candidate when written (never inside a run of skipped steps), and becomes good when the step
after it, computed from exactly its weights, applied its update (finite gradients) with every loss term finite on
this rank. Its next step skipped or non-finite: it is dropped. The state (counts, the good checkpoint, the
candidate, an open streak) is saved in every checkpoint (`state_dict`) and restored on resume; the checkpoint resumed
from is the candidate its first step verifies.
"""
import os

from distillery.errors import TrainingError


def _tag(path):
    return os.path.basename(str(path).rstrip("/"))


class Guard:
    def __init__(self, cfg, engine, start_step, state=None, where=None):
        """state: a checkpoint's state_dict() (None for a fresh run); where: the (load_dir, tag) resumed from."""
        self.max_bad, self.max_frac = cfg.max_bad_steps, cfg.max_skipped_frac
        self.prev = int(getattr(engine, "skipped_steps", 0))  # after the checkpoint load: DeepSpeed restores it
        self.streak = self.skipped = self.steps = 0
        self.first_bad = None
        self.last_good = None      # path of the newest checkpoint verified good
        self.candidate = None      # (step, path): the newest checkpoint written, its next step not yet run
        self.dropped = None        # why the last candidate was not verified, for the message
        if state:
            self.load_state_dict(state)
        if where is not None:      # the checkpoint resumed from: its next step (the first one here) verifies it
            self.candidate = (start_step, os.path.join(*where))

    def state_dict(self):
        return {"streak": self.streak, "first_bad": self.first_bad, "skipped": self.skipped, "steps": self.steps,
                "last_good": self.last_good, "candidate": self.candidate, "dropped": self.dropped}

    def load_state_dict(self, state):
        for k in ("streak", "first_bad", "skipped", "steps", "last_good", "dropped"):
            setattr(self, k, state.get(k, getattr(self, k)))
        self.candidate = tuple(state["candidate"]) if state.get("candidate") else None

    def _advice(self):
        good = self.last_good
        if good and os.path.isdir(good):
            where = f"resume from {good} (resume={good}), the last checkpoint verified good"
        else:
            why = (f"{_tag(good)} was verified, but it is gone: removed by hand or by keep_last" if good else
                   self.dropped or "none was saved before it")
            where = f"no checkpoint is known to be good ({why}): start again"
        return f"{where} with a lower lr (or alpha), or check the data"

    def after_step(self, step, engine, stats):
        """After optimizer step `step` (1-based): count a skipped update; verify the candidate checkpoint the step
        started from; stop after a streak of skipped updates."""
        now = int(getattr(engine, "skipped_steps", 0))
        bad, self.prev = now > self.prev, now
        self.steps += 1
        if self.candidate is not None and step == self.candidate[0] + 1:
            # stats hold this step alone (the save step reset them); a host sync, once per checkpoint
            nonfinite = not bad and stats.local_bad_terms()
            if bad or nonfinite:
                self.dropped = (f"{_tag(self.candidate[1])} was saved, but the step after it "
                                f"{'was skipped' if bad else 'had a non-finite loss'}")
            else:
                self.last_good = self.candidate[1]
            self.candidate = None
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
        """A checkpoint of `step` was written: a candidate, outside a run of skipped steps only."""
        if self.streak == 0:
            self.candidate = (step, path)

    def metrics(self):
        return {"train/skipped_steps": self.skipped}

    def at_end(self):
        """A run that mostly skipped its updates did not train: fail it (before its export)."""
        if self.steps and self.skipped > self.max_frac * self.steps:
            raise TrainingError(f"{self.skipped} of {self.steps} optimizer steps were skipped (non-finite gradients), "
                                f"more than max_skipped_frac={self.max_frac:g}: the student did not train; "
                                f"{self._advice()}")
