"""bench/gpu_checks.py: the table of checks fits the device call, and the deadline logic (skip for time, timeout,
failure, dependencies, a line written the moment each check ends) on tiny stand-in checks; the CPU twin under -m slow.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_checks", REPO / "bench" / "gpu_checks.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def test_gpu_budgets_fit_the_call_in_the_issues_order():
    names = [c.name for c in gc.CHECKS]
    assert len(set(names)) == len(names)
    assert all(isinstance(c.gpu_s, int) and c.gpu_s > 0 for c in gc.CHECKS), "every check needs a GPU budget"
    assert all(c.cpu_s is None or (isinstance(c.cpu_s, int) and c.cpu_s > 0) for c in gc.CHECKS)
    # the whole call, wheel install included, within 330 s (the margin pays for kills, the summary and bash)
    assert gc.TOTAL_S["gpu"] == 330 and "install" in names
    assert sum(c.gpu_s for c in gc.CHECKS) <= gc.TOTAL_S["gpu"] - gc.MARGIN_S
    assert sum(c.cpu_s or 0 for c in gc.CHECKS) <= gc.TOTAL_S["cpu"] - gc.MARGIN_S
    # env, runs, right, fast, paper: most important first
    order = [gc.PARTS.index(c.part) for c in gc.CHECKS]
    assert order == sorted(order) and set(order) == set(range(len(gc.PARTS)))
    for i, c in enumerate(gc.CHECKS):
        assert all(d in names[:i] for d in c.needs), f"{c.name} needs a check that comes after it"


def test_select_adds_env_and_what_a_check_needs():
    pick = [c.name for c in gc.select(["runs_resume"])]
    assert pick == ["install", "env", "data", "runs_live", "runs_resume"]
    assert [c.name for c in gc.select(["right"])] == ["install", "env", "data", "right_reference", "right_doc_mask",
                                                      "right_fused_head"]
    assert gc.select([]) == list(gc.CHECKS)
    with pytest.raises(gc.ConfigError, match="unknown check 'nosuch'"):
        gc.select(["nosuch"])


def test_unknown_check_is_a_one_line_error():
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_checks.py"), "--cpu", "nosuch"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: unknown check 'nosuch'")
    assert len(p.stderr.strip().splitlines()) == 1 and p.stdout == ""


def py(code):
    """A check command running `code` (braces escaped: commands are format templates)."""
    return "{py} -c " + json.dumps(code).replace("{", "{{").replace("}", "}}")


def test_deadline_timeout_failure_skip_and_lines_as_they_end(tmp_path):
    """A 9-second call: ok, ok (reads the first one's line, written before it started), failed, a hung check killed
    at twice its budget, one that no longer fits (skipped for time), one whose dependency failed."""
    out = tmp_path / "out"
    C = gc.Check
    checks = [
        C("a", "env", 1, 1, py("import json; print('noise'); print(json.dumps({'bench': 'a', 'x': 1}))")),
        C("a2", "env", 1, 1, py(f"import os, sys; sys.exit(0 if os.path.isfile({str(out / 'a.json')!r}) else 3)")),
        C("b", "runs", 1, 1, py("import sys; print('boom'); sys.exit(1)")),
        C("c", "runs", 2, 2, py("import time; print('{\"started\": true}', flush=True); time.sleep(60)")),
        C("d", "right", 5, 5, py("pass")),
        C("e", "fast", 1, 1, py("pass"), needs=("b",)),
    ]
    t0 = time.time()
    r = gc.Runner(checks, "cpu", str(out), t0, 9 + gc.MARGIN_S, dict(py=sys.executable), gc.child_env("cpu", []))
    summary = r.run()
    took = time.time() - t0
    lines = [json.loads(x) for x in (out / "checks.jsonl").read_text().splitlines()]
    assert [x["check"] for x in lines] == ["a", "a2", "b", "c", "d", "e", "summary"]
    rec = {x["check"]: x for x in lines}
    assert rec["a"]["status"] == "ok" and rec["a"]["results"] == [{"bench": "a", "x": 1}] and "tail" not in rec["a"]
    assert rec["a2"]["status"] == "ok"
    assert rec["b"]["status"] == "failed" and rec["b"]["rc"] == 1 and "boom" in rec["b"]["tail"]
    # c: 8.8 s left, d's 5 s reserved -> killed at max(2 x 2, 8.8 - 5) = 4 s, with what it printed
    assert rec["c"]["status"] == "timeout" and 3.5 <= rec["c"]["seconds"] <= 6
    assert rec["c"]["results"] == [{"started": True}]
    assert rec["d"]["status"] == "skipped" and rec["d"]["skip"] == "time" and rec["d"]["reason"].startswith("time:")
    assert rec["e"]["status"] == "skipped" and rec["e"]["skip"] == "needs"
    assert summary["all_ok"] is False and summary["rerun"] == "bash bench/gpu_checks.sh --cpu b c d e"
    assert took < 9 + 1
    for name in "abcde":
        assert json.loads((out / f"{name}.json").read_text()) == rec[name]
    assert "noise" in (out / "a.log").read_text()


@pytest.mark.slow
def test_cpu_twin_ends_within_five_minutes(tmp_path):
    """bash bench/gpu_checks.sh --cpu: every check's line, in order, no failure, within the 300 s deadline."""
    out, work = tmp_path / "out", tmp_path / "work"
    t = time.time()
    p = subprocess.run(["bash", str(REPO / "bench" / "gpu_checks.sh"), "--cpu", "--work", str(work)],
                       capture_output=True, text=True, timeout=400, env=dict(os.environ, OUT=str(out)))
    took = time.time() - t
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    print(json.dumps(lines[-1]), f"load {os.getloadavg()}")
    assert took <= gc.TOTAL_S["cpu"] + 5
    assert [x["check"] for x in lines] == [c.name for c in gc.CHECKS] + ["summary"]
    st = {x["check"]: x["status"] for x in lines[:-1]}
    assert "failed" not in st.values(), {k: x.get("tail") for k, x in zip(st, lines) if x["status"] == "failed"}
    assert st["install"] == "skipped" and st["env"] == "ok"
    for x in lines[:-1]:
        if x["status"] == "ok":
            assert x["results"], f"{x['check']} printed no JSON line"
        assert (out / f"{x['check']}.json").is_file()


def test_summary_reads_targets_and_anchor_ratios():
    step = {"bench": "train_step", "distillery": {"tokens_per_s": 30000}, "distillery_lm": {"tokens_per_s": 36000},
            "targets": {"measured": {"kd_tokens_per_s": 30000}, "meets": {"kd_tokens_per_s": False}}}
    anchor = [{"matmul_bf16_tflops": 800}, {"variant": "lm_only@anchor", "tokens_per_s": 40000},
              {"variant": "liger_kd@anchor", "tokens_per_s": 37500}]
    t = gc.targets({"fast_step": {"results": [step]}, "fast_anchor": {"results": anchor}})
    assert t["meets"] == {"kd_tokens_per_s": False}
    assert t["distillery_vs_anchor_liger_kd"] == 0.8 and t["distillery_lm_vs_anchor_lm_only"] == 0.9
    assert gc.targets({"fast_step": {"status": "timeout", "results": []}}) is None


def test_a_call_cut_short_records_the_running_check(tmp_path):
    """SIGTERM to the driver (the device call ran out): the running check is killed and gets an "interrupted" line
    with what it printed, then the summary; the finished check's line is already on disk."""
    out = tmp_path / "out"
    (tmp_path / "sleeper.py").write_text('import time\nprint(\'{"up": 1}\', flush=True)\ntime.sleep(60)\n')
    (tmp_path / "driver.py").write_text(f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("gc", {str(REPO / "bench" / "gpu_checks.py")!r})
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)
checks = [gc.Check("a", "env", 5, 5, "{{py}} -c pass"),
          gc.Check("b", "runs", 50, 50, "{{py}} {tmp_path / 'sleeper.py'}")]
gc.Runner(checks, "cpu", {str(out)!r}, time.time(), 200, dict(py=sys.executable), gc.child_env("cpu", [])).run()
""")
    p = subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 60
    while not (out / "b.log").exists() or "up" not in (out / "b.log").read_text():
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.terminate()
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 128 + 15, stderr
    lines = [json.loads(x) for x in stdout.splitlines()]
    assert [(x["check"], x.get("status")) for x in lines] == [("a", "ok"), ("b", "interrupted"), ("summary", None)]
    assert lines[1]["results"] == [{"up": 1}] and lines[2]["statuses"] == {"a": "ok", "b": "interrupted"}
    assert json.loads((out / "a.json").read_text())["status"] == "ok"


def test_trainer_runs_are_valid_trainer_configs(tmp_path):
    """Every train.py run of the `runs` part parses as a config (a renamed or refused key fails here, not on the
    lent GPU): the live and resume runs use a ZeRO-3 partitioned teacher, the offload run an offloaded one."""
    sys.path.insert(0, str(REPO / "bench"))
    import trainer_runs
    from distillery.config import load_config
    got = {w: load_config(None, [*trainer_runs.BASE, *trainer_runs.overrides(w, str(tmp_path))]).teacher_placement
           for w in ("live", "offload", "resume")}
    assert got == {"live": "partitioned", "offload": "offload", "resume": "partitioned"}
