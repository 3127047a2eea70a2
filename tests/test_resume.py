"""distillery/resume.py: what a rerun or a resume of a run directory may change, decided before anything is written."""
import json
import os

import pytest

from distillery import resume
from distillery.config import load_config, save_config
from distillery.errors import ConfigError


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"out_dir={tmp_path}", "name=r", *overrides])


def existing_run(tmp_path, *overrides, trained=True):
    cfg = cfg_for(tmp_path, *overrides)
    os.makedirs(cfg.run_dir)
    save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    if trained:
        (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1, "loss/total": 5.0}\n')
    return cfg


def test_new_run_has_no_changes(tmp_path):
    assert resume.check(cfg_for(tmp_path, "resume=auto")) == {}


def test_run_defining_change_is_refused_with_the_differences(tmp_path):
    existing_run(tmp_path, "alpha=0.2", "student=tiny-student")
    before = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds a run with other run-defining settings: student "
                                          r"\('tiny-student' -> 'micro'\), alpha \(0.2 -> 0.5\); give this one a new name=") as e:
        resume.check(cfg_for(tmp_path, "alpha=0.5", "student=micro", "resume=auto"))
    assert "\n" not in str(e.value)
    assert (tmp_path / "r" / "config.yaml").read_text() == before  # nothing overwritten


def test_fresh_start_over_a_trained_run_is_refused(tmp_path):
    existing_run(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run; continue it with resume=auto"):
        resume.check(cfg_for(tmp_path))
    existing_run(tmp_path / "u", trained=False)  # config written, nothing trained (e.g. a start-up error): fine
    assert resume.check(cfg_for(tmp_path / "u")) == {}


def test_may_change_keys_are_returned_and_recorded(tmp_path):
    existing_run(tmp_path, "lr=3e-4", "log_interval=10")
    cfg = cfg_for(tmp_path, "lr=1e-4", "log_interval=5", "resume=auto")
    changes = resume.check(cfg)
    assert changes == {"lr": (3e-4, 1e-4), "log_interval": (10, 5)}
    resume.record(cfg, changes, step=40)
    rec = [json.loads(x) for x in open(tmp_path / "r" / resume.HISTORY)]
    assert rec[0]["resumed_at_step"] == 40 and rec[0]["changes"]["lr"] == {"old": 3e-4, "new": 1e-4}


def test_resume_from_another_runs_checkpoint_checks_that_run(tmp_path):
    existing_run(tmp_path, "alpha=0.2")
    ck = tmp_path / "r" / "checkpoints" / "step00000010"
    ck.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"belongs to a run with other run-defining settings: alpha \(0.2 -> 0.4\)"):
        resume.check(load_config(None, [f"out_dir={tmp_path}", "name=other", "alpha=0.4", f"resume={ck}"]))
    assert resume.check(load_config(None, [f"out_dir={tmp_path}", "name=other", "alpha=0.2", f"resume={ck}"])) == {}
