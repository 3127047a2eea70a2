"""scripts/sweep.py: paired-by-seed PPL change with standard errors, and a real (tiny) sweep end to end."""
import json
import math
import os
import sys

import pytest

from conftest import BASE, REPO, clean_env

sys.path.insert(0, str(REPO / "scripts"))
import sweep  # noqa: E402


def fake_run(root, name, losses):
    d = root / name
    (d / "export").mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "loss/total": 9.0}) + "\n")
        f.write(json.dumps({"step": 1, **{f"eval/{k}/loss": v for k, v in losses.items()}}) + "\n")
    (d / "finished.json").write_text(json.dumps({"step": 1, "total_steps": 1}))  # the trainer's finished-run marker


def test_paired_summary_matches_hand_computation(tmp_path):
    pts = sweep.points([("alpha", ["0", "0.5"])])
    base = {43: 3.0, 44: 3.2, 45: 2.9}
    kd = {43: 2.95, 44: 3.1, 45: 2.88}
    for s in base:
        fake_run(tmp_path, sweep.run_name("sw", pts[0], s), {"heldout": base[s]})
        fake_run(tmp_path, sweep.run_name("sw", pts[1], s), {"heldout": kd[s]})
    out = sweep.summarize("sw", pts, [43, 44, 45], out_dir=str(tmp_path))
    ch = [100 * (math.exp(kd[s]) - math.exp(base[s])) / math.exp(base[s]) for s in base]
    m = sum(ch) / 3
    se = math.sqrt(sum((c - m) ** 2 for c in ch) / 2) / math.sqrt(3)
    got = out["points"]["alpha=0.5"]["heldout"]
    assert got["n"] == 3
    assert got["ppl_change_pct_mean_se"][0] == pytest.approx(m) and got["ppl_change_pct_mean_se"][1] == pytest.approx(se)
    assert out["points"]["alpha=0"]["heldout"]["ppl_change_pct_mean_se"][0] == 0.0


def test_unfinished_runs_are_left_out(tmp_path):
    pts = sweep.points([("alpha", ["0", "0.5"])])
    fake_run(tmp_path, sweep.run_name("sw", pts[0], 1), {"heldout": 3.0})
    fake_run(tmp_path, sweep.run_name("sw", pts[1], 1), {"heldout": 2.0})
    os.remove(tmp_path / sweep.run_name("sw", pts[1], 1) / "finished.json")  # stopped before its schedule's end
    out = sweep.summarize("sw", pts, [1], out_dir=str(tmp_path))
    assert out["points"]["alpha=0.5"] == {}


def test_tiny_sweep_end_to_end(data_dir, teacher_dir, tmp_path):
    import subprocess
    cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"), "--name", "sw", "--grid", "alpha=0,0.5", "--seeds",
           "1,2", "--launcher", sys.executable, "--", "--ds_config", str(REPO / "ds_configs/cpu.json"),
           f"data={data_dir}", f"teacher={teacher_dir}", *BASE, "train_tokens=1024", "callbacks=[]"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=clean_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.load(open(tmp_path / "runs" / "sw" / "summary.json"))
    assert summary["points"]["alpha=0.5"]["heldout"]["n"] == 2
    assert (tmp_path / "runs" / "sw" / "summary.png").stat().st_size > 0
    p2 = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=clean_env())
    assert p2.returncode == 0 and "[sweep" not in p2.stdout  # everything finished: nothing rerun
