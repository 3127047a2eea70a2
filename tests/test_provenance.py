"""distillery/provenance.py: which code trained a run (one record per start), and the report's line about it."""
import json
import shutil
import subprocess

import pytest

from distillery import provenance
from eval import report

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@needs_git
def test_code_version_commit_and_dirty(tmp_path):
    assert provenance.code_version(str(tmp_path)) == (None, None)            # not a checkout: unknown, not an error
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert provenance.code_version(str(tmp_path)) == (head.strip(), False)
    (tmp_path / "notes.txt").write_text("untracked files do not make the tree dirty\n")
    assert provenance.code_version(str(tmp_path))[1] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.code_version(str(tmp_path)) == (head.strip(), True)
    assert provenance.modified_files(str(tmp_path)) == ["a.py"]


def test_record_start_appends_one_record_per_start(tmp_path):
    a = provenance.record_start(str(tmp_path), 0, 2, argv=["train.py", "alpha=0.2"])
    provenance.record_start(str(tmp_path), 40, 1, argv=["train.py", "resume=auto"])
    got = provenance.starts(str(tmp_path))
    assert [(s["step"], s["world"], s["argv"][-1]) for s in got] == [(0, 2, "alpha=0.2"), (40, 1, "resume=auto")]
    assert got[0] == json.loads(json.dumps(a)) and set(a) >= {"commit", "dirty", "python", "torch", "host"}
    assert provenance.starts(str(tmp_path / "old-run")) == []


def test_report_names_the_commits_and_the_runs_that_crossed_one():
    c1, c2 = "a" * 40, "b" * 40
    runs = [{"dir": "r1", "starts": [{"commit": c1, "dirty": False}]},
            {"dir": "r2", "starts": [{"commit": c1, "dirty": False}, {"commit": c2, "dirty": True}]},
            {"dir": "r3", "starts": []}]
    assert report.code_note(runs) == ("code: commit aaaaaaaaaaaa (2 runs), bbbbbbbbbbbb (1 run); resumed on other "
                                      "code: r2; trained with uncommitted changes: r2; no record (runs from before "
                                      "starts.jsonl): 1")
    assert report.code_note([{"dir": "r3", "starts": []}]) is None
