"""scripts/steps.py (what the recorded experiments share) and the step lists of scripts/mini_grid.py and
scripts/cache_study.py: every training run they launch is a valid trainer command line."""
import json
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import cache_study  # noqa: E402
import mini_grid  # noqa: E402
import steps  # noqa: E402
import train  # noqa: E402
from distillery.config import load_config  # noqa: E402


def test_run_steps_records_times_and_stops_on_failure(tmp_path, capsys):
    timing = tmp_path / "timing.json"
    ok = [sys.executable, "-c", "pass"]
    steps.run_steps([("a", "step a", ok), ("b", "step b", ok)], "t", str(timing))
    got = json.loads(timing.read_text())
    assert sorted(got["runs"]) == ["a", "b"] and got["seconds"] == pytest.approx(sum(got["runs"].values()))
    assert "[t 1/2] step a" in capsys.readouterr().out
    # a later invocation merges; a failing step stops with one line naming it, after keeping what finished
    with pytest.raises(SystemExit, match="error: d failed; fix it and rerun the same command"):
        steps.run_steps([("c", "c", ok), ("d", "d", [sys.executable, "-c", "raise SystemExit(3)"]), ("e", "e", ok)],
                        "t", str(timing))
    assert sorted(json.loads(timing.read_text())["runs"]) == ["a", "b", "c"]
    steps.run_steps([("x", "x", ["/no/such/binary-never-run"])], "t", str(tmp_path / "dry.json"), dry_run=True)
    assert not (tmp_path / "dry.json").exists() and "/no/such/binary-never-run" in capsys.readouterr().out


def _train_args(cmd):
    """The trainer's part of a launch command, parsed as train.py parses it."""
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"] and "train.py" in cmd
    args = train.parse_args(cmd[cmd.index("train.py") + 1:])
    assert os.path.isfile(REPO / args.ds_config) and os.path.isfile(REPO / args.config)
    return load_config(str(REPO / args.config), args.overrides)


def test_mini_grid_plan_is_valid_trainer_commands():
    names = []
    for name, config, over in mini_grid.plan():
        cfg = _train_args(steps.train_cmd(config, over, name))
        assert cfg.name == name and cfg.out_dir == "runs"
        names.append(name)
    assert len(names) == len(set(names)) == 3 + 2 + 3 * (2 * 2 + 2)   # teachers, baselines, per teacher 4 + 2 cm
    # every teacher / compute-match reference points at a run that comes earlier in the plan
    seen = set()
    for name, _, over in mini_grid.plan():
        for o in over:
            k, v = o.split("=", 1)
            if k in ("teacher", "compute_match"):
                assert v.replace("runs/", "", 1).replace("/export", "") in seen, (name, o)
        seen.add(name)


def test_cache_study_steps_are_valid_commands():
    plan = cache_study.steps(12, sweep=(32, 64))
    kinds = [k for k, *_ in plan]
    assert kinds[:4] == ["teacher", "cache", "cache", "cache"] and kinds.count("student") == 2 * 7
    caches = {p: cmd for kind, _, p, cmd in plan if kind == "cache"}
    assert sorted(caches) == [f"{cache_study.OUT}/cache-sampled12", f"{cache_study.OUT}/cache-topk12",
                              f"{cache_study.OUT}/cache-topk64"]
    for kind, key, path, cmd in plan:
        if kind == "cache":
            assert cmd[1:3] == ["-m", "data_prep.teacher_cache"] and cmd[cmd.index("--out") + 1] == path
            continue
        cfg = _train_args(cmd)
        assert f"runs/{cfg.name}" == path
        if cfg.teacher_cache:
            assert cfg.teacher_cache in caches and cfg.teacher == f"{cache_study.TEACHER}/export"
            assert cfg.alpha == 0.2 and cfg.teacher_cache_k in (0, 32, 64)
