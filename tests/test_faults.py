"""Fault scenarios end to end (issue 9, item 7): one test per scenario of bench/faults.py, which prints the same
checks as a table (docs/reliability.md). The scenarios that train (several trainer subprocesses, 1 or 2 CPU ranks)
are behind -m slow; the default ones stop before a process group exists (~5-10 s each)."""
import importlib.util
import sys

import pytest

from conftest import REPO

# bench/ is not put on sys.path: its data_prep.py would shadow the data_prep package
_spec = importlib.util.spec_from_file_location("faults", REPO / "bench" / "faults.py")
faults = sys.modules.setdefault("faults", importlib.util.module_from_spec(_spec))
if not hasattr(faults, "SCENARIOS"):
    _spec.loader.exec_module(faults)


@pytest.fixture(scope="module")
def env(data_dir, teacher_dir, tmp_path_factory):
    """Shared by every test of the module: the uninterrupted reference runs and the part-way runs are made once."""
    return faults.Env(tmp_path_factory.mktemp("faults"), data=data_dir, teacher=teacher_dir)


def check(env, name):
    o = faults.run_scenario(name, env)
    report = f"{name}: {o.survived}; " + "; ".join(map(str, o.problems)) + f"\nsaw: {o.message}\nnotes: {o.notes}"
    hard = [p for p in o.problems if not p.bug]
    assert not hard, report
    if o.expect.startswith("skipped"):  # the machine does not allow it (e.g. no mount rights for a real full disk)
        pytest.skip(o.expect)
    if o.problems:  # only known trainer bugs (docs/reliability.md names them): expected to fail until fixed
        pytest.xfail(report)
    assert o.survived == faults.SCENARIOS[name]["expect"]
    return o


def test_every_scenario_has_a_test():
    tests = {n[len("test_"):] for n in globals() if n.startswith("test_")}
    assert set(faults.SCENARIOS) <= tests, set(faults.SCENARIOS) - tests


# --- fast: refused before any process group, model or file exists
def test_yaml_error(env):
    check(env, "yaml_error")


def test_plugin_syntax_error(env):
    check(env, "plugin_syntax_error")


def test_teacher_truncated(env):
    check(env, "teacher_truncated")


# --- slow: trainer subprocesses (one rank, or two under the deepspeed launcher)
@pytest.mark.slow
def test_preempt_sigterm_rank(env):
    o = check(env, "preempt_sigterm_rank")
    assert o.steps_lost == 0 and o.weights_equal is True


@pytest.mark.slow
def test_preempt_sigusr1(env):
    o = check(env, "preempt_sigusr1")
    assert o.steps_lost == 0 and o.weights_equal is True


@pytest.mark.slow
def test_preempt_runner_killed(env):
    o = check(env, "preempt_runner_killed")
    assert o.steps_lost == 0 and o.weights_equal is True


@pytest.mark.slow
def test_lock_second_run(env):
    check(env, "lock_second_run")


@pytest.mark.slow
def test_lock_stale_after_kill(env):
    o = check(env, "lock_stale_after_kill")
    assert o.steps_lost <= faults.SAVE and o.weights_equal is True


def _corrupt_newest(env, name):
    o = check(env, name)
    assert o.steps_lost == faults.SAVE and o.weights_equal is True


@pytest.mark.slow
def test_corrupt_truncated(env):
    _corrupt_newest(env, "corrupt_truncated")


@pytest.mark.slow
def test_corrupt_zero_length(env):
    _corrupt_newest(env, "corrupt_zero_length")


@pytest.mark.slow
def test_corrupt_flipped(env):
    _corrupt_newest(env, "corrupt_flipped")


@pytest.mark.slow
def test_corrupt_all(env):
    check(env, "corrupt_all")


@pytest.mark.slow
def test_config_run_defining(env):
    check(env, "config_run_defining")


@pytest.mark.slow
def test_config_lr_change(env):
    check(env, "config_lr_change")


@pytest.mark.slow
def test_config_preset_rerun(env):
    check(env, "config_preset_rerun")


@pytest.mark.slow
def test_world_size_change(env):
    check(env, "world_size_change")


@pytest.mark.slow
def test_diverge_lr(env):
    check(env, "diverge_lr")


@pytest.mark.slow
def test_diverge_mostly_skipped(env):
    check(env, "diverge_mostly_skipped")


@pytest.mark.slow
def test_disk_full_save(env):
    o = check(env, "disk_full_save")
    assert o.steps_lost == faults.SAVE and o.weights_equal is True


@pytest.mark.slow
def test_keep_last(env):
    check(env, "keep_last")


@pytest.mark.slow
def test_data_zeroed_shard(env):
    check(env, "data_zeroed_shard")


@pytest.mark.slow
def test_data_token_ids(env):
    check(env, "data_token_ids")


@pytest.mark.slow
def test_data_without_tokenizer(env):
    check(env, "data_without_tokenizer")


# --- issue 20: cache provenance, settings checked at start, unfinished runs, eval sets too small
def test_eval_set_too_small(env):
    check(env, "eval_set_too_small")


@pytest.mark.slow
def test_cache_wrong_teacher(env):
    check(env, "cache_wrong_teacher")


@pytest.mark.slow
def test_config_checked_at_start(env):
    check(env, "config_checked_at_start")


@pytest.mark.slow
def test_max_steps_unfinished(env):
    o = check(env, "max_steps_unfinished")
# --- issue 24 (reliability, round 2): fast
def test_ds_config_not_json(env):
    check(env, "ds_config_not_json")


# --- issue 24: slow
@pytest.mark.slow
def test_disk_full_real(env):
    o = check(env, "disk_full_real")
    assert o.steps_lost == faults.SAVE and o.weights_equal is True


@pytest.mark.slow
def test_diverge_verified_good(env):
    check(env, "diverge_verified_good")


@pytest.mark.slow
def test_preempt_in_skipped_streak(env):
    check(env, "preempt_in_skipped_streak")


@pytest.mark.slow
def test_preempt_stale_latest(env):
    o = check(env, "preempt_stale_latest")
    assert o.steps_lost == 0 and o.weights_equal is True


@pytest.mark.slow
def test_stale_latest_pruned(env):
    o = check(env, "stale_latest_pruned")
    assert o.steps_lost == 0 and o.weights_equal is True


@pytest.mark.slow
def test_universal_exact(env):
    o = check(env, "universal_exact")
    assert o.weights_equal is True


@pytest.mark.slow
def test_preempt_startup(env):
    o = check(env, "preempt_startup")
    assert o.weights_equal is True


@pytest.mark.slow
def test_preempt_second_sigterm(env):
    o = check(env, "preempt_second_sigterm")
    assert o.steps_lost == 0 and o.weights_equal is True


@pytest.mark.slow
def test_preempt_sigterm_group(env):
    o = check(env, "preempt_sigterm_group")
    assert o.steps_lost == 0 and o.weights_equal is True


@pytest.mark.slow
def test_preempt_during_export(env):
    o = check(env, "preempt_during_export")
    assert o.weights_equal is True


@pytest.mark.slow
def test_preempt_during_final_eval(env):
    o = check(env, "preempt_during_final_eval")
    assert o.weights_equal is True


@pytest.mark.slow
def test_export_sigkill(env):
    o = check(env, "export_sigkill")
    assert o.steps_lost == 0 and o.weights_equal is True
