"""What the recorded CPU experiments (mini_grid.py, cache_study.py) share: the offline data they train on, the launch
of one training run, and running a list of steps in order with each one's wall time recorded."""
import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from distillery import runlog  # noqa: E402
from distillery.atomic import read_json, write_json  # noqa: E402
from distillery.launch import free_port  # noqa: E402

OFFLINE_DATA = "data/offline"


def parser(doc, out):
    """The flags every recorded experiment has; the script adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--report-only", action="store_true", help="just the report from what has finished")
    ap.add_argument("--dry-run", action="store_true", help="the commands, nothing run")
    ap.add_argument("--out", default=out, help="where the report goes")
    return ap


def prepare(a):
    """Work from the repository root; build the offline data unless nothing will train."""
    os.chdir(REPO)
    if not (a.report_only or a.dry_run):
        ensure_offline_data()


def finished(run_dir):
    """A training run is finished when its schedule completed: the trainer's finished.json (or, for a run from before
    that marker, a metrics.jsonl that reaches the schedule's last step): distillery.runlog.finished."""
    return os.path.isdir(run_dir) and runlog.finished(run_dir)[0] is not None


def ensure_offline_data():
    """The offline corpus the experiments use (2048-token BPE, 128-token rows), built once."""
    if not os.path.isfile(os.path.join(OFFLINE_DATA, "index.json")):
        subprocess.run([sys.executable, "-m", "data_prep.offline", "--out", OFFLINE_DATA, "--vocab_size", "2048",
                        "--seq_len", "128"], check=True)


def train_cmd(config, overrides, name):
    """One CPU training run under the DeepSpeed launcher, into runs/<name>; a free port per run, so it can run next
    to other jobs."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
            "train.py", "--ds_config", "ds_configs/cpu.json", "--config", config, *overrides, f"name={name}",
            "out_dir=runs"]


def run_steps(todo, tag, timing_path, dry_run=False):
    """Run [(key, label, command)] in order (from the repository root). Each step's wall time is merged into
    timing_path ({"runs": {key: seconds}, "seconds": their sum, "cpus"}) as soon as it finishes, so a killed
    invocation keeps the times of what it finished. A failing step stops everything with one line: rerunning the
    same command continues (the callers skip finished steps)."""
    for i, (key, label, cmd) in enumerate(todo):
        print(f"[{tag} {i + 1}/{len(todo)}] {label}", flush=True)
        if dry_run:
            print("  " + " ".join(cmd))
            continue
        t = time.time()
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            raise SystemExit(f"error: {key} failed; fix it and rerun the same command (finished steps are skipped)")
        old = read_json(timing_path) if os.path.isfile(timing_path) else {}
        runs = {**old.get("runs", {}), key: round(time.time() - t, 1)}
        write_json(timing_path, {"runs": runs, "seconds": round(sum(runs.values()), 1), "cpus": os.cpu_count()})
