"""Rerunning or resuming a run directory: what may change, checked before anything is written (docs/reliability.md).

A run directory holds one experiment. Its config.yaml says which; config.RUN_DEFINING lists the keys that make it
that experiment. Before a run writes anything, check() compares the new config with the run directory's config.yaml
(and, for resume=<checkpoint dir> of another run, with that run's): a different run-defining key is refused with the
list of differences; a fresh start (resume="") over a directory that already trained is refused. Keys that may
change are returned, applied (apply_lr re-applies lr / warmup_frac / min_lr_frac over the checkpoint's scheduler
state, which would otherwise restore the old base lr) and recorded in <run_dir>/config_history.jsonl.
"""
import os
import time

import yaml

from distillery import atomic
from distillery.config import MAY_CHANGE, RUN_DEFINING, to_dict
from distillery.errors import ConfigError

HISTORY = "config_history.jsonl"


def _saved(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _diff(old, new, keys):
    return {k: (old[k], new[k]) for k in keys if k in old and old[k] != new[k]}


def _fmt(d):
    return ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in d.items())


def check(cfg):
    """Before anything is written: refuse what would mix two experiments in one run directory. Returns the changed
    keys that may change, {key: (old, new)} (empty for a new run)."""
    new = to_dict(cfg)
    old = _saved(os.path.join(cfg.run_dir, "config.yaml"))
    if old is not None:
        fixed = _diff(old, new, RUN_DEFINING)
        if fixed:
            raise ConfigError(f"{cfg.run_dir} holds a run with other run-defining settings: {_fmt(fixed)}; give this "
                              f"one a new name= (or delete {cfg.run_dir})")
        trained = any(os.path.exists(os.path.join(cfg.run_dir, f)) for f in ("checkpoints", "metrics.jsonl"))
        if not cfg.resume and trained:
            raise ConfigError(f"{cfg.run_dir} already holds a run; continue it with resume=auto, or give this one a "
                              f"new name=")
    if cfg.resume not in ("", "auto"):  # a checkpoint of another run: <run>/checkpoints/<tag>
        src = os.path.dirname(os.path.dirname(os.path.abspath(cfg.resume.rstrip("/"))))
        other = _saved(os.path.join(src, "config.yaml"))
        fixed = _diff(other or {}, new, RUN_DEFINING)
        if fixed:
            raise ConfigError(f"resume={cfg.resume} belongs to a run with other run-defining settings: "
                              f"{_fmt(fixed)}; resume with that run's settings or start a new run")
    return _diff(old or {}, new, [k for k in MAY_CHANGE if k not in ("resume", "name", "out_dir")])


def record(cfg, changes, step):
    """Append the applied changes to <run_dir>/config_history.jsonl (rank 0)."""
    if changes:
        atomic.append_jsonl(os.path.join(cfg.run_dir, HISTORY), {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}})


def apply_lr(engine, cfg, total_steps):
    """After a checkpoint load: the LR schedule of *this* config (base lr, warmup, floor) at the loaded step, not the
    checkpoint's base lr. LambdaLR's state restores base_lrs but not its lambdas (plain functions), and the
    optimizer's state restores each group's current lr."""
    from distillery.engines import lr_lambda
    sched = engine.lr_scheduler
    fn = lr_lambda(total_steps, cfg.warmup_frac, cfg.min_lr_frac)
    sched.base_lrs = [cfg.lr] * len(sched.base_lrs)
    sched.lr_lambdas = [fn] * len(sched.base_lrs)
    lrs = [cfg.lr * fn(sched.last_epoch) for _ in sched.base_lrs]
    for g, lr in zip(sched.optimizer.param_groups, lrs):
        g["lr"] = lr
    sched._last_lr = lrs
