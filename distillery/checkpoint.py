"""DeepSpeed checkpoints with an atomic commit, and `resume=auto`.

Layout: {run_dir}/checkpoints/step00000100/ (DeepSpeed's files) and {run_dir}/checkpoints/latest (a tag name).
A checkpoint is written under a temporary tag, renamed when every rank has finished, and only then named in
`latest`: a run killed while saving resumes from the previous complete checkpoint, never a half-written one.
Needs a filesystem shared by all ranks (as DeepSpeed's ZeRO-3 resume does).
"""
import os
import shutil

import torch
import torch.distributed as dist

from distillery.config import ConfigError

# keys that must not change across a resume: they define the data order and the model
FIXED_ON_RESUME = ("student", "student_init", "data", "seed", "seq_len", "global_batch_size", "teacher",
                   "train_tokens")


def ckpt_dir(cfg):
    return os.path.join(cfg.run_dir, "checkpoints")


def save(engine, cfg, step, client_state):
    d = ckpt_dir(cfg)
    tag, tmp_tag = f"step{step:08d}", f"tmp-step{step:08d}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(os.path.join(d, tmp_tag), ignore_errors=True)
    dist.barrier()
    state = dict(client_state, torch_rng=torch.get_rng_state())
    engine.save_checkpoint(d, tag=tmp_tag, client_state=state, save_latest=False)
    dist.barrier()
    if rank == 0:
        final = os.path.join(d, tag)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(os.path.join(d, tmp_tag), final)
        with open(os.path.join(d, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(d, "latest.tmp"), os.path.join(d, "latest"))
    dist.barrier()
    return os.path.join(d, tag)


def find_resume(cfg):
    """(load_dir, tag) to resume from, or None for a fresh start."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        latest = os.path.join(ckpt_dir(cfg), "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            return ckpt_dir(cfg), f.read().strip()
    path = cfg.resume.rstrip("/")
    if not os.path.isdir(path):
        raise ConfigError(f"resume={cfg.resume!r} is not a checkpoint directory; use resume=auto or a "
                          f"runs/<name>/checkpoints/stepNNNNNNNN path")
    return os.path.dirname(path), os.path.basename(path)


def load(engine, cfg, where):
    load_dir, tag = where
    path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"could not load checkpoint {os.path.join(load_dir, tag)}; it is missing or incomplete")
    saved = client.get("config", {})
    changed = [k for k in FIXED_ON_RESUME if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"resume changes {', '.join(f'{k} ({saved[k]!r} -> {getattr(cfg, k)!r})' for k in changed)}"
                          f"; start a new run name instead")
    if "torch_rng" in client:
        torch.set_rng_state(client["torch_rng"])
    return client
