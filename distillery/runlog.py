"""A run directory's metrics log, runs/<name>/metrics.jsonl: one JSON object per logged step, evaluation or end-of-run
result, each with its "step". The trainer appends to it (rank 0, through the callbacks' ctx.log); everything that
reads it back (summaries, sweeps, reports, tests) goes through read_metrics here."""
import os

from distillery.atomic import read_jsonl
from distillery.errors import EvalError

FILE = "metrics.jsonl"


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
