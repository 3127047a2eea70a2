"""plugins/alpha_controllers.py (and the AlphaController contract in plugins/base.py): the gap controller's rule,
its options, its state across a checkpoint, and a trainer run with it (resume exact, 2 ranks == 1 rank)."""
import math

import pytest
import torch

import plugins
from conftest import read_metrics, run_inprocess, run_launcher
from distillery.config import load_config
from distillery.errors import ConfigError, PluginError
from distillery.objective import Objective
from plugins.alpha_controllers import Gap


def parts(ce, tce, n):
    """A micro-batch's loss parts as the trainer hands them over: sums over n target tokens (device tensors)."""
    return {"ce_sum": torch.tensor(ce * n), "n_tokens": torch.tensor(n), "diag": {"teacher_ce": torch.tensor(tce * n)}}


def test_gap_rule_by_hand():
    """alpha = ceiling * clip(g / scale, 0, 1) with g the token-weighted gap of the interval, smoothed by ema."""
    c = Gap(0.5, 100, every=2, scale=0.5, ema=0.5)
    assert c.alpha(0) == 0.5 and c.metrics() == {}              # the ceiling before any measurement
    c.observe(parts(6.0, 5.0, 10))
    c.end_step(1)                                               # not an update step
    assert c.alpha(1) == 0.5
    c.observe(parts(5.5, 5.0, 30))
    c.end_step(2)                                               # gap = (60 + 165 - 50 - 150) / 40 = 0.625
    assert c.gap == pytest.approx(0.625) and c.alpha(2) == 0.5  # clipped at the ceiling
    c.observe(parts(5.0, 5.1, 10))
    c.observe(parts(5.0, 5.1, 10))
    c.end_step(3)
    c.end_step(4)                                               # interval gap -0.1; g = 0.5 * 0.625 + 0.5 * -0.1
    assert c.gap == pytest.approx(0.2625)
    assert c.alpha(4) == pytest.approx(0.5 * 0.2625 / 0.5)
    assert c.metrics() == {"alpha/gap": pytest.approx(0.2625)}
    for _ in range(6):                                          # the student ahead for good: alpha goes to 0
        c.observe(parts(4.0, 5.0, 10))
        c.end_step(6)
    assert c.alpha(6) == 0.0


def test_gap_state_carries_a_partial_interval():
    """A checkpoint between two updates: the restored controller ends the interval exactly as the uninterrupted one."""
    seq = [parts(6.0 - 0.1 * i, 5.0, 8 + i) for i in range(9)]
    a = Gap(0.4, 100, every=3, scale=0.3, ema=0.2)
    for i, p in enumerate(seq, 1):
        a.observe(p)
        a.end_step(i)
    b = Gap(0.4, 100, every=3, scale=0.3, ema=0.2)
    for i, p in enumerate(seq[:4], 1):
        b.observe(p)
        b.end_step(i)
    c = Gap(0.4, 100, every=3, scale=0.3, ema=0.2)
    c.load_state_dict(b.state_dict())                            # step 4: one micro-batch into the interval 4..6
    for i, p in enumerate(seq[4:], 5):
        c.observe(p)
        c.end_step(i)
    assert c.gap == a.gap and c.alpha(9) == a.alpha(9)


@pytest.mark.parametrize("opts,match", [({"every": 0}, "every=0 must be an integer >= 1"),
                                        ({"scale": 0}, "scale=0"), ({"ema": 1.0}, "ema=1.0")])
def test_gap_bad_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        Gap(0.5, 10, **opts)


def test_controller_config_errors():
    def obj(*over):
        return Objective.from_config(load_config(None, list(over)), 10)
    with pytest.raises(PluginError, match=r"unknown option\(s\) window; known: ema, every, scale"):
        obj("alpha_controller=gap", "alpha_controller_args={window: 3}")
    with pytest.raises(PluginError, match="unknown alpha_controller plugin 'gapp'; known: gap"):
        obj("alpha_controller=gapp")
    with pytest.raises(ConfigError, match="alpha_schedule=wsd would be ignored"):
        obj("alpha_controller=gap", "alpha_schedule=wsd")
    with pytest.raises(ConfigError, match="alpha_controller_args is set but alpha_controller is not"):
        obj("alpha_controller_args={every: 2}")
    assert obj("alpha_controller=gap", "alpha=0.3").needs_teacher()       # the ceiling decides
    assert not obj("alpha_controller=gap", "alpha=0").needs_teacher()
    with pytest.raises(PluginError, match="must subclass plugins.AlphaController"):
        plugins.register("alpha_controller", "not_a_class")(lambda step: 0.1)


def test_controller_refuses_a_teacher_cache(data_dir, tmp_path):
    """The gap controller reads the teacher's CE, which a cache does not hold: refused before anything is written."""
    import train
    with pytest.raises(ConfigError, match="reads the teacher's CE, which a teacher cache does not hold"):
        train.resolve(train.parse_args(["--ds_config", "ds_configs/cpu.json", f"data={data_dir}", f"out_dir={tmp_path}",
                                        "alpha_controller=gap", f"teacher_cache={tmp_path}/nocache"]))
    assert not (tmp_path / "default").exists()


CTRL = ["alpha=0.5", "alpha_controller=gap", "alpha_controller_args={every: 3, scale: 0.05, ema: 0.5}", "seed=46"]


@pytest.fixture(scope="module")
def ctrl_run(data_dir, teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctrl")
    run_inprocess(data_dir, out, "name=full", f"teacher={teacher_dir}", *CTRL)
    return out / "full"


def test_trainer_follows_the_controller(ctrl_run):
    """The logged alpha of each step is the rule applied to the gap the controller measured before it, and the
    teacher CE it reads is logged (entropy/teacher_ce)."""
    m, _ = read_metrics(ctrl_run)
    assert [m[s]["alpha"] for s in (1, 2, 3)] == [0.5, 0.5, 0.5]  # no update before step 3 ends
    for s in (4, 5, 6):  # the alpha of steps 4..6 comes from the update after step 3
        assert m[s]["alpha"] == pytest.approx(0.5 * min(max(m[3]["alpha/gap"] / 0.05, 0), 1))
    assert all(math.isfinite(m[s]["entropy/teacher_ce"]) for s in m)
    assert len({m[s]["alpha/gap"] for s in (3, 6, 9)}) == 3
    assert len({m[s]["alpha"] for s in m}) >= 2  # it moved: the resume and 2-rank tests below cover a moving alpha


def test_controller_resume_is_exact(ctrl_run, data_dir, teacher_dir, tmp_path):
    """Stopped at step 7 (one step into an interval), resumed: the same alphas and losses as uninterrupted."""
    run_inprocess(data_dir, tmp_path, "name=r", f"teacher={teacher_dir}", "max_steps=7", *CTRL)
    run_inprocess(data_dir, tmp_path, "name=r", f"teacher={teacher_dir}", "resume=auto", *CTRL)
    full, _ = read_metrics(ctrl_run)
    resumed, _ = read_metrics(tmp_path / "r")
    assert sorted(resumed) == sorted(full) == list(range(1, 11))
    for s in full:
        assert (resumed[s]["alpha"], resumed[s]["loss/total"]) == (full[s]["alpha"], full[s]["loss/total"]), s


def test_controller_two_ranks_match_one_rank(ctrl_run, data_dir, teacher_dir, tmp_path):
    """The controller's gap is a global token mean: 2 ranks decide the same alphas as 1 rank."""
    run_launcher(data_dir, tmp_path, "name=two", f"teacher={teacher_dir}", "max_steps=7", *CTRL)
    one, _ = read_metrics(ctrl_run)
    two, _ = read_metrics(tmp_path / "two")
    for s in range(1, 8):
        assert two[s]["alpha"] == pytest.approx(one[s]["alpha"], rel=1e-4, abs=1e-6), s
        assert two[s]["loss/total"] == pytest.approx(one[s]["loss/total"], rel=1e-4), s
