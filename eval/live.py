"""Glue for evaluation inside a training run (used by plugins/eval_downstream.py and plugins/eval_final.py): reading
the run's config whatever its shape, finding the data dir and tokenizer, rank helpers."""
import json
import os

import torch.distributed as dist


def rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cfg_get(cfg, dotted, default=None):
    """cfg['a']['b'] / cfg.a.b for 'a.b', on dicts, dataclasses or namespaces; default when any part is missing."""
    cur = cfg
    for part in dotted.split("."):
        if cur is None:
            return default
        if isinstance(cur, dict):
            cur = cur.get(part)
        else:
            cur = getattr(cur, part, None)
    return default if cur is None else cur


def first(cfg, keys, default=None):
    for k in keys:
        v = cfg_get(cfg, k)
        if v is not None:
            return v
    return default


DATA_KEYS = ("data.dir", "data.path", "data.data_dir", "data_dir", "data")
EVAL_DATA_KEYS = ("eval.data", "eval.data_dir") + DATA_KEYS


def data_dir(cfg, override=None):
    """The dir holding the eval token sets: an explicit override, the trainer's `eval_data`, else its `data`."""
    for v in [override] + [cfg_get(cfg, k) for k in ("eval_data",) + EVAL_DATA_KEYS]:
        if isinstance(v, str) and os.path.isfile(os.path.join(v, "index.json")):
            return v
    return None


def tokenizer_for(cfg, run_dir=None, override=None):
    """The tokenizer of the run: an explicit path, the data dir's tokenizer/, or the run's export/."""
    from eval import common
    cands = [override] if override else []
    d = data_dir(cfg)
    if d:
        cands.append(os.path.join(d, "tokenizer"))
    if run_dir:
        cands.append(os.path.join(run_dir, "export"))
    for c in cands:
        if c and os.path.isdir(c):
            tok = common.load_tokenizer(c)
            if tok is not None:
                return tok
    raise common.EvalError(f"no tokenizer found for this run (tried {cands}); pass tokenizer=<dir> to the callback")


def append_jsonl(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def callback_args(cfg, name, prefix=None):
    """Options for callback `name` from the run config, whichever way the config carries them: a dict at
    cfg.callback_args[name] or cfg[name], and/or flat keys '<prefix>_<option>' (e.g. downstream_tasks)."""
    out = {}
    for key in (f"callback_args.{name}", name):
        v = cfg_get(cfg, key)
        if isinstance(v, dict):
            out.update(v)
    if prefix and cfg is not None:
        items = cfg.items() if isinstance(cfg, dict) else vars(cfg).items() if hasattr(cfg, "__dict__") else ()
        for k, v in items:
            if k.startswith(prefix + "_") and v is not None:
                out.setdefault(k[len(prefix) + 1:], v)
    return out
