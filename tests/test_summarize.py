"""scripts/summarize.py: final eval per run, PPL change vs the first run, plot."""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import summarize  # noqa: E402


def fake_run(d, losses, curve=((1000, 7.0), (2000, 6.0))):
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for tok, ce in curve:
            f.write(json.dumps({"step": tok // 1000, "loss/ce": ce, "tokens/seen": tok}) + "\n")
        f.write(json.dumps({"step": 1, "eval/heldout/loss": 9.0}) + "\n")  # an earlier eval: superseded
        f.write(json.dumps({"step": 2, **{f"eval/{k}/loss": v for k, v in losses.items()},
                            **{f"eval/{k}/ppl": math.exp(v) for k, v in losses.items()}}) + "\n")


def test_table_and_plot(tmp_path, capsys):
    fake_run(tmp_path / "base", {"heldout": 5.0, "ood": 6.0})
    fake_run(tmp_path / "kd", {"heldout": 4.9, "ood": 6.1})
    summarize.main([str(tmp_path / "base"), str(tmp_path / "kd"), "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    heldout = next(line for line in out.splitlines() if line.startswith("heldout"))
    assert f"{100 * (math.exp(4.9) - math.exp(5.0)) / math.exp(5.0):+.2f}%" in heldout
    ood = next(line for line in out.splitlines() if line.startswith("ood"))
    assert f"{100 * (math.exp(6.1) - math.exp(6.0)) / math.exp(6.0):+.2f}%" in ood
    assert (tmp_path / "p.png").stat().st_size > 0
    assert summarize.final_eval(str(tmp_path / "kd"))[0] == {"heldout": 4.9, "ood": 6.1}


def test_missing_run_is_one_line_error(tmp_path):
    from distillery.errors import EvalError
    with pytest.raises(EvalError, match="metrics.jsonl not found; train that run first"):
        summarize.main([str(tmp_path / "nope"), str(tmp_path / "nope2")])
    p = subprocess.run([sys.executable, "scripts/summarize.py", str(tmp_path / "nope")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope' / 'metrics.jsonl'} not found; train that run first"]
