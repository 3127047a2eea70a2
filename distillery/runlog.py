"""A run directory's metrics log, runs/<name>/metrics.jsonl: one JSON object per logged step, evaluation or end-of-run
result, each with its "step". The trainer appends to it (rank 0, through the callbacks' ctx.log); everything that
reads it back (summaries, sweeps, reports, tests) goes through read_metrics here.

And the finished-run marker, runs/<name>/finished.json: written by the trainer last, once the run's schedule is
complete (after the export and the end-of-run callbacks, e.g. eval/final.json). A run stopped earlier (max_steps, a
preemption, a crash) has none, so a report or a sweep never takes its numbers for the run's final ones."""
import os
import time

from distillery.atomic import read_json, read_jsonl, write_json
from distillery.errors import EvalError

FILE = "metrics.jsonl"
FINISHED = "finished.json"


def metrics_path(run_dir):
    return os.path.join(run_dir, FILE)


def read_metrics(run_dir):
    """(train, evals): {step: record} of the training records (those with loss/total) and of the in-loop
    evaluations (those with eval/* keys). A run that has not logged yet is a one-line EvalError."""
    path = metrics_path(run_dir)
    if not os.path.isfile(path):
        raise EvalError(f"{path} not found; train that run first")
    train, evals = {}, {}
    for r in read_jsonl(path):
        if "loss/total" in r:
            train[r["step"]] = r
        if any(k.startswith("eval/") for k in r):
            evals[r["step"]] = r
    return train, evals


def final_losses(run_dir):
    """{eval set: loss} of the run's last in-loop evaluation ({} when it has none)."""
    _, evals = read_metrics(run_dir)
    last = evals[max(evals)] if evals else {}
    return {k.split("/")[1]: v for k, v in last.items() if k.startswith("eval/") and k.endswith("/loss")}


def mark_finished(run_dir, step, total_steps, export_dir):
    """The trainer, rank 0, last thing of a run whose schedule completed (step == total_steps)."""
    write_json(os.path.join(run_dir, FINISHED), {"step": int(step), "total_steps": int(total_steps),
                                                 "export_dir": export_dir,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def finished(run_dir, cfg=None, records=None):
    """(step, how) of a run whose schedule completed, else (None, why not). `how` is "finished.json", or, for a run
    from before the marker existed, "metrics.jsonl" when its last training step is the schedule's last
    (train_tokens // (global_batch_size x seq_len) of its config.yaml). cfg / records: the run's config.yaml dict and
    metrics.jsonl records when the caller has read them already."""
    path = os.path.join(run_dir, FINISHED)
    if os.path.isfile(path):
        d = read_json(path)
        return int(d["step"]), FINISHED
    if cfg is None:
        import yaml
        cfg_path = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(cfg_path):
            return None, "no config.yaml"
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f) or {}
    if records is None:
        records = read_jsonl(metrics_path(run_dir)) if os.path.isfile(metrics_path(run_dir)) else []
    last = max((r["step"] for r in records if "loss/total" in r), default=0)
    try:
        total = int(cfg["train_tokens"]) // (int(cfg["global_batch_size"]) * int(cfg["seq_len"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None, f"no {FINISHED}, last step {last}"
    if total and last == total:
        return last, "metrics.jsonl"
    return None, f"no {FINISHED}; stopped at step {last} of {total}"
