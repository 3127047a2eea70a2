"""scripts/steps.py (what the recorded experiments share) and the step lists of scripts/mini_grid.py,
scripts/cache_study.py and scripts/tpp_sweep.py: every training run they launch is a valid trainer command line."""
import json
import math
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import cache_study  # noqa: E402
import mini_grid  # noqa: E402
import steps  # noqa: E402
import tpp_sweep  # noqa: E402
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


def _fake_run(root, name, heldout_ce):
    """A finished run as the scripts see it: the trainer's finished.json and eval/final.json with a held-out CE."""
    d = root / "runs" / name
    (d / "eval").mkdir(parents=True)
    (d / "finished.json").write_text(json.dumps({"step": 1}))
    (d / "eval" / "final.json").write_text(json.dumps({"ppl": {"heldout": {"ce": heldout_ce}}}))


def test_tpp_sweep_plan_and_weak_teacher_calibration(tmp_path, monkeypatch):
    """Before the probes: baselines, probes and the strong teacher. After them: the weak teacher's budget by
    log-linear interpolation to +0.17 nats (by hand below), then every distilled, compute-matched and controller run,
    each a valid trainer command whose teacher / compute_match reference comes earlier in the plan."""
    monkeypatch.chdir(tmp_path)
    runs, complete = tpp_sweep.plan("r3", [43, 44], [0.2, 0.5])
    assert not complete and [n for n, _, _ in runs] == [f"sweep/r3/{n}" for n in (
        "base-s43", "probe-half", "probe-quarter", "t-strong", "base-s44")]
    t = tpp_sweep.tokens("r3")
    assert t % tpp_sweep.TOKENS_PER_STEP == 0 and abs(t / tpp_sweep.PARAMS - 3) < 0.01
    _fake_run(tmp_path, "sweep/r3/base-s43", 4.0)
    _fake_run(tmp_path, "sweep/r3/probe-half", 4.10)      # +0.10 at T/2
    _fake_run(tmp_path, "sweep/r3/probe-quarter", 4.40)   # +0.40 at T/4
    d, probe = tpp_sweep.weak_budget("r3")
    half, quarter = t // 2 // 2048 * 2048, t // 4 // 2048 * 2048
    b = (0.10 - 0.40) / math.log(half / quarter)   # the pair that brackets 0.17: T/4 and T/2
    want = math.exp(math.log(quarter) + (0.17 - 0.40) / b)
    assert probe is None and d == int(want) // 2048 * 2048 and quarter < d < half
    # both probes above the target (as r1 came out): interpolate between T/2 and the baseline itself at (T, 0)
    assert tpp_sweep.interpolate({half: 0.54, quarter: 0.92, t: 0.0}, t) == \
        int(math.exp(math.log(half) + (0.17 - 0.54) / ((0.0 - 0.54) / math.log(t / half)))) // 2048 * 2048
    assert tpp_sweep.interpolate({half: 0.05, quarter: 0.10, t: 0.0}, t) == t // 8 // 2048 * 2048  # clamped
    cal = json.loads((tmp_path / "runs/sweep/r3/calibration.json").read_text())
    assert cal["weak_tokens"] == d and cal["probes"][str(half)]["gap"] == pytest.approx(0.10)
    runs, complete = tpp_sweep.plan("r3", [43, 44], [0.2, 0.5])
    names = [n for n, _, _ in runs]
    assert complete and len(names) == len(set(names)) == 5 + 1 + 2 * (2 * 2 + 2 + 2)
    seen = set()
    for name, config, over in runs + tpp_sweep.grid_controller_plan([43, 44]):
        cfg = _train_args(steps.train_cmd(config, over, name))
        assert cfg.name == name
        if "/gap-" in name:
            assert cfg.alpha_controller == "gap" and cfg.alpha == 0.5
        for ref in (cfg.teacher if cfg.alpha > 0 else "", cfg.compute_match):
            if ref and not ref.startswith("runs/mini/"):
                assert ref.replace("runs/", "", 1).replace("/export", "") in seen, (name, ref)
        seen.add(name)
    # a probe within 0.03 nats of the target is the weak teacher itself
    (tmp_path / "runs/sweep/r3/probe-half/eval/final.json").write_text(json.dumps({"ppl": {"heldout": {"ce": 4.18}}}))
    assert tpp_sweep.weak_budget("r3") == (half, "sweep/r3/probe-half")
    assert "sweep/r3/t-weak" not in [n for n, _, _ in tpp_sweep.plan("r3", [43], [0.2])[0]]
