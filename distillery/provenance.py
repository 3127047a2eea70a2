"""Which code and libraries trained a run: one record per start (fresh or resumed) in <run_dir>/starts.jsonl.

A run resumed after a preemption may continue on other code (a fix pulled in between, another node's environment),
so the record is per start, not per run: a result can always be traced to the commits that produced it, and a
report can tell a run that crossed a code change. Costs two `git` calls (~10 ms) on rank 0 at start.

    {"time": "...", "step": 0, "world": 8, "commit": "<40 hex>" | null, "dirty": false | true | null,
     "modified": [the tracked files with uncommitted changes, at most 50],
     "python": "3.11.9", "torch": "...", "deepspeed": "...", "transformers": "...", "host": "...",
     "argv": ["train.py", ...]}

commit / dirty are null outside a git checkout (or without git): an installed copy. dirty counts tracked files only
(runs/ and data/ are ignored, untracked notes do not make a tree dirty).
"""
import os
import platform
import subprocess
import sys
import time

from distillery import atomic

FILE = "starts.jsonl"
MAX_LISTED = 50                       # modified files listed per record (a tree with more is listed in part)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))        # the checkout holding distillery/


def _git(*args, root=ROOT):
    try:
        p = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None     # not stripped: porcelain lines start with a space


def modified_files(root=ROOT):
    """Tracked files with uncommitted changes at root ([] if none; None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no", root=root)
    return None if status is None else [line[3:] for line in status.splitlines() if line.strip()]


def _state(root):
    """(commit, modified files) of the checkout at root; (None, None) when it is not a git checkout or git is
    missing. The two git calls of a start record."""
    commit = (_git("rev-parse", "HEAD", root=root) or "").strip()
    return (commit, modified_files(root)) if commit else (None, None)


def code_version(root=ROOT):
    """(commit, dirty) of the checkout at root; (None, None) when it is not a git checkout or git is missing."""
    commit, modified = _state(root)
    return commit, (None if modified is None else bool(modified))


def versions():
    """Versions of the libraries that decide a run's numbers (those imported by now; None if not imported)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod else None
    return out


def record_start(run_dir, step, world, argv=None):
    """Append this start's record to <run_dir>/starts.jsonl (rank 0, after the config is written)."""
    commit, modified = _state(ROOT)
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": int(step), "world": int(world),
           "commit": commit, "dirty": None if modified is None else bool(modified),
           "modified": (modified or [])[:MAX_LISTED], **versions(), "host": platform.node(),
           "argv": list(sys.argv if argv is None else argv)}
    atomic.append_jsonl(os.path.join(run_dir, FILE), rec)
    return rec


def starts(run_dir):
    """Every start record of a run ([] for a run from before this file existed)."""
    path = os.path.join(run_dir, FILE)
    return atomic.read_jsonl(path) if os.path.isfile(path) else []
