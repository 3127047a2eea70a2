"""Registry behaviour, mix formulas, alpha schedule formulas."""
import math

import pytest

import plugins
from plugins import PluginError, register


def test_kinds_and_builtins():
    assert {"forward_kl", "reverse_kl"} <= set(plugins.names("divergence"))
    assert plugins.names("mix") == ["keep_full_ce", "keep_full_kd", "standard"]
    assert {"constant", "linear", "cosine", "wsd"} <= set(plugins.names("alpha_schedule"))
    assert {"entropy", "progress", "tensorboard"} <= set(plugins.names("callback"))


def test_duplicate_name_raises():
    with pytest.raises(PluginError, match="registered twice"):
        register("divergence", "forward_kl")(lambda s_logp, t_logp: None)


def test_unknown_lists_known():
    with pytest.raises(PluginError, match="known: .*forward_kl.*reverse_kl"):
        plugins.get("divergence", "nope")
    with pytest.raises(PluginError, match="unknown plugin kind"):
        register("loss", "x")


def test_describe_lists_everything():
    text = plugins.describe()
    for kind in plugins.KINDS:
        assert f"{kind}:" in text
    assert "forward_kl" in text and "wsd" in text


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("name, formula", [
    ("standard", lambda ce, kd, a: (1 - a) * ce + a * kd),
    ("keep_full_ce", lambda ce, kd, a: ce + a * kd),
    ("keep_full_kd", lambda ce, kd, a: (1 - a) * ce + kd),
])
def test_mix_matches_hand_formula(name, formula, alpha):
    ce, kd = 3.7, 0.9
    w_ce, w_kd = plugins.get("mix", name)(alpha=alpha)
    assert w_ce * ce + w_kd * kd == pytest.approx(formula(ce, kd, alpha), abs=1e-12)


T = 101  # steps 0..100: warmup end at 10 with warmup_frac 0.1, decay from step 80 with decay_frac 0.2
KW = dict(total_steps=T, alpha=0.8, start=0.1, end=0.05, warmup_frac=0.1, decay_frac=0.2)


def sched(name, step):
    return plugins.get("alpha_schedule", name)(step=step, **KW)


def test_constant():
    assert [sched("constant", s) for s in (0, 10, 100)] == [0.8, 0.8, 0.8]


def test_linear():
    assert sched("linear", 0) == pytest.approx(0.1)
    assert sched("linear", 10) == pytest.approx(0.1 + 0.7 * 10 / 100)
    assert sched("linear", 100) == pytest.approx(0.8)


def test_cosine():
    assert sched("cosine", 0) == pytest.approx(0.1)
    assert sched("cosine", 5) == pytest.approx(0.1 + 0.7 * 0.5)
    assert sched("cosine", 10) == pytest.approx(0.8)
    assert sched("cosine", 55) == pytest.approx(0.05 + 0.75 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert sched("cosine", 100) == pytest.approx(0.05)


def test_wsd():
    assert sched("wsd", 0) == pytest.approx(0.1)
    assert sched("wsd", 10) == pytest.approx(0.8)
    assert sched("wsd", 50) == pytest.approx(0.8) and sched("wsd", 80) == pytest.approx(0.8)
    assert sched("wsd", 90) == pytest.approx(0.8 + (0.05 - 0.8) * 0.5)
    assert sched("wsd", 100) == pytest.approx(0.05)


def test_lr_schedule_matches_paper():
    from distillery.engines import lr_lambda
    f = lr_lambda(total_steps=1000, warmup_frac=0.05, min_lr_frac=0.1)
    assert f(0) == pytest.approx(1 / 50) and f(49) == pytest.approx(1.0)
    assert f(50) == pytest.approx(1.0)
    assert f(525) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(1000) == pytest.approx(0.1)
