"""The divergence guard (distillery/guard.py): which checkpoint it calls good, and its state across a resume.

A fake engine (DeepSpeed's skipped_steps counter) and fake step statistics drive it step by step, as train() does:
after_step after every optimizer step, saved after every checkpoint."""
import types

import pytest

from distillery.errors import TrainingError
from distillery.guard import Guard


class Driver:
    """Runs a Guard over steps: 'ok' (update applied), 'skip' (update skipped), 'nan' (applied, but a loss term was
    non-finite on this rank), 'save' (a checkpoint of the last step, as train() writes it)."""

    def __init__(self, tmp_path, start_step=0, state=None, max_bad=3, max_frac=0.5, skipped=0):
        self.cfg = types.SimpleNamespace(max_bad_steps=max_bad, max_skipped_frac=max_frac)
        self.engine = types.SimpleNamespace(skipped_steps=skipped)
        self.dir = tmp_path
        self.step = start_step
        where = (str(tmp_path), f"step{start_step:08d}") if start_step else None
        self.guard = Guard(self.cfg, self.engine, start_step, state, where) if start_step else \
            Guard(self.cfg, self.engine, start_step)

    def run(self, *events):
        for ev in events:
            if ev == "save":
                path = self.dir / f"step{self.step:08d}"
                path.mkdir(exist_ok=True)
                self.state = self.guard.state_dict()  # what train.save() puts into the checkpoint
                self.guard.saved(self.step, str(path))
                continue
            self.step += 1
            self.engine.skipped_steps += ev == "skip"
            stats = types.SimpleNamespace(local_bad_terms=lambda ev=ev: ("KD",) if ev == "nan" else ())
            self.guard.after_step(self.step, self.engine, stats)
        return self


def test_a_checkpoint_whose_next_step_is_skipped_is_never_called_good(tmp_path):
    """Issue 24 (2): lr=1e6, save_interval=2: steps 1 and 2 apply their updates, step 2's weights are already ruined
    (1e11), steps 3.. are skipped. The stop must not send the user back to step 2 (a loop): no good checkpoint is
    known."""
    d = Driver(tmp_path).run("ok", "ok", "save")
    with pytest.raises(TrainingError) as e:
        d.run("skip", "skip", "skip")
    msg = str(e.value)
    assert msg.startswith("3 consecutive optimizer steps (3..5) were skipped")
    assert "step00000002" in msg and "resume=" not in msg
    assert "no checkpoint is known to be good (step00000002 was saved, but the step after it was skipped)" in msg


def test_the_last_verified_checkpoint_is_named(tmp_path):
    """A checkpoint is good once the step after it (computed from its weights) had finite loss terms and an applied
    update; a later one whose next step was skipped, or had a non-finite loss term, is not."""
    d = Driver(tmp_path).run("ok", "ok", "save", "ok", "ok", "save", "nan", "ok", "save")
    with pytest.raises(TrainingError, match=r"\(7\.\.9\) .*resume from .*step00000002 \(resume=.*step00000002\), the "
                                            r"last checkpoint verified good") as e:
        d.run("skip", "skip", "skip")
    assert "step00000004" not in str(e.value) and "step00000006" not in str(e.value)


def test_a_pruned_good_checkpoint_is_not_recommended(tmp_path):
    d = Driver(tmp_path).run("ok", "save", "ok")
    (tmp_path / "step00000001").rmdir()  # keep_last removed it
    with pytest.raises(TrainingError, match=r"no checkpoint is known to be good \(step00000001 was verified, but it "
                                            r"is gone: .*keep_last\)"):
        d.run("skip", "skip", "skip")


def test_state_survives_a_resume_and_the_skipped_fraction_counts_the_whole_run(tmp_path):
    """Issue 24 (3): the guard was rebuilt fresh after a resume: max_skipped_frac counted only the steps since, and
    the checkpoint it had verified was forgotten. 3 of the first 6 steps skipped, 1 of the next 4: 4 of 10 is more
    than 0.3, though 1 of 4 is not."""
    first = Driver(tmp_path, max_frac=0.3).run("ok", "save", "skip", "skip", "ok", "skip", "ok", "save")
    resumed = Driver(tmp_path, start_step=6, state=first.state, max_frac=0.3, skipped=3)
    resumed.run("ok", "skip", "ok", "ok")
    with pytest.raises(TrainingError, match=r"4 of 10 optimizer steps were skipped .* more than max_skipped_frac=0.3"
                                            r".*resume from .*step00000006 \(resume="):
        resumed.guard.at_end()


def test_the_checkpoint_resumed_from_is_verified_by_its_next_step(tmp_path):
    """Resumed from step 2 (saved outside a streak, not yet verified) with a lower lr: step 3 is skipped again, so
    step 2 is not good; the message does not send the user back to it."""
    first = Driver(tmp_path).run("ok", "ok", "save")
    resumed = Driver(tmp_path, start_step=2, state=first.state)
    with pytest.raises(TrainingError, match=r"no checkpoint is known to be good \(step00000002 was saved, but the "
                                            r"step after it was skipped\)"):
        resumed.run("skip", "skip", "skip")


def test_a_streak_open_at_the_save_is_carried_over(tmp_path):
    """The state includes an open streak (the end-of-run checkpoint may be written inside one): the resumed guard
    counts on from it instead of starting a new streak."""
    d = Driver(tmp_path).run("ok", "save", "ok", "skip", "skip")
    state = d.guard.state_dict()
    resumed = Driver(tmp_path, start_step=4, state=state, skipped=2)
    with pytest.raises(TrainingError, match=r"^3 consecutive optimizer steps \(3\.\.5\)"):
        resumed.run("skip")
