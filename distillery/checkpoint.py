"""DeepSpeed checkpoints with an atomic, verified commit; `resume=auto` with fallback; pruning (`keep_last`).

Layout: {run_dir}/checkpoints/step00000100/ (DeepSpeed's files + manifest.json) and {run_dir}/checkpoints/latest
(a tag name). A save goes

    engine.save_checkpoint -> tmp-step00000100/   (every rank; a failed write here is a one-line TrainingError)
    barrier; sha256 of every file (split over the ranks) -> manifest.json in the tmp dir (rank 0)
    rename tmp-step00000100 -> step00000100; `latest` <- step00000100 (atomic); prune to keep_last

so a run killed (or out of disk) while saving leaves the previous checkpoint and `latest` as they were, and a
leftover tmp-* directory is never read (the next save removes it). manifest.json lists every file of the checkpoint
with its size and sha256, the step and the world size that wrote it.

Resume (`find_resume`): the checkpoint `latest` names is verified against its manifest (sizes, then sha256); if it
is truncated, zero-length, corrupt or has no manifest, the newest intact earlier checkpoint is used instead, with a
one-line warning; none intact is a one-line TrainingError (offering, by path, an intact later checkpoint if there is
one). Rank 0 decides and broadcasts, so every rank loads the same tag. Checkpoints with a step above the one `latest`
names are not candidates: they belong to an abandoned branch (an explicit resume= from an older checkpoint) or to a
save killed between rename and `latest`, and the run re-reaches (and overwrites) them. A `latest` naming a checkpoint
that does not exist (stale: restored from a backup, or its directory removed by hand) is not trusted: every
checkpoint is then a candidate, newest first, as without a `latest`. `load` refuses a world-size change before anything is loaded.

Needs a filesystem shared by all ranks (as DeepSpeed's ZeRO-3 resume does).
`python -m distillery.checkpoint runs/<name>/checkpoints` verifies every checkpoint of a run and prints one line each.
"""
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from distillery import atomic
from distillery.config import RUN_DEFINING
from distillery.launch import from_rank0, rank_world
from distillery.shards import sha256_file
from distillery.errors import ConfigError, TrainingError

# keys that must not change across a resume (distillery/config.py says why)
FIXED_ON_RESUME = RUN_DEFINING
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "distillery.checkpoint"
KEEP_LAST = 3          # default of cfg.keep_last: complete checkpoints kept (0 = all)
TAG_RE = re.compile(r"^step(\d{8,})$")
TMP_PREFIX = "tmp-"    # tmp-stepNNNNNNNN (a save in progress or a failed one), tmp-prune-* (a removal)
UNIVERSAL_SUFFIX = "-universal"
CONVERT_CMD = "python -m distillery.checkpoint --to-universal {src}"


def ckpt_dir(cfg):
    return os.path.join(cfg.run_dir, "checkpoints")


def tag_for(step):
    return f"step{step:08d}"


def step_of(tag):
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _dist():
    """(rank, world) of the process group, (0, 1) without one (tools, unit tests)."""
    return rank_world()


def _barrier():
    if _dist()[1] > 1:
        dist.barrier()


_bcast = from_rank0  # rank 0's `obj` on every rank


def _one_line(s):
    return " ".join(str(s).split())


def warn(msg):
    """One line on stderr, rank 0 only."""
    if _dist()[0] == 0:
        print(f"warning: {_one_line(msg)}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- hashing and the manifest
def _hash_local(root, rels, workers=None):
    """{rel: sha256} of files under root, on threads (hashlib releases the GIL on large buffers)."""
    workers = workers or min(8, os.cpu_count() or 1, max(1, len(rels)))
    with ThreadPoolExecutor(workers) as ex:
        return dict(zip(rels, ex.map(lambda r: sha256_file(os.path.join(root, r)), rels)))


def _hash_all_ranks(root, rels):
    """{rel: sha256} for every file in `rels` (the same list on every rank): rank r hashes every world-th file,
    the results are gathered on every rank. A collective when world > 1."""
    rank, world = _dist()
    mine = _hash_local(root, rels[rank::world]) if rels[rank::world] else {}
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    out = {}
    for p in parts:
        out.update(p)
    return out


def list_files(path):
    """Relative paths of every regular file under path (the manifest itself excluded), sorted."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), path)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def build_manifest(path, step, world_size, digests=None, universal=False):
    """The manifest of the checkpoint directory `path` (hashes computed here unless given). universal: a DeepSpeed
    universal checkpoint (loads at any world size; world_size is then the one it was converted from)."""
    rels = list_files(path)
    digests = digests if digests is not None else _hash_local(path, rels)
    return {"format": MANIFEST_FORMAT, "version": 1, "step": int(step), "world_size": int(world_size),
            "universal": bool(universal), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": [{"path": r, "bytes": os.path.getsize(os.path.join(path, r)), "sha256": digests[r]}
                      for r in rels]}


def write_manifest(path, step, world_size, digests=None, universal=False):
    m = build_manifest(path, step, world_size, digests, universal)
    atomic.write_json(os.path.join(path, MANIFEST), m)
    return m


def read_manifest(path):
    """(manifest, None) or (None, what is wrong) for the checkpoint directory `path`."""
    mp = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        return None, "the directory is missing"
    if not os.path.isfile(mp):
        return None, f"it has no {MANIFEST} (an interrupted save, or written before manifests)"
    try:
        with open(mp) as f:
            m = json.load(f)
        if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("files"), list) or not m["files"]:
            raise ValueError("not a distillery checkpoint manifest")
    except (OSError, ValueError) as e:
        return None, f"its {MANIFEST} is unreadable ({_one_line(e)})"
    return m, None


def check_sizes(path):
    """(manifest, None) if every file of the manifest is there with its size, else (manifest or None, reason)."""
    m, why = read_manifest(path)
    if why:
        return None, why
    for e in m["files"]:
        p = os.path.join(path, e["path"])
        if not os.path.isfile(p):
            return m, f"{e['path']} is missing"
        size = os.path.getsize(p)
        if size != e["bytes"]:
            kind = "zero-length" if size == 0 else "truncated" if size < e["bytes"] else "grown"
            return m, f"{e['path']} has {size} bytes, the manifest says {e['bytes']} ({kind})"
    return m, None


def verify(path, checksums=True):
    """None if the checkpoint directory `path` is intact, else a short reason. Sizes always, sha256 if asked.
    Local (no collectives): for tools and tests; the trainer goes through find_resume."""
    m, why = check_sizes(path)
    if why or not checksums:
        return why
    got = _hash_local(path, [e["path"] for e in m["files"]])
    return _compare(m, got)


def _compare(m, digests):
    for e in m["files"]:
        if digests.get(e["path"]) != e["sha256"]:
            return f"{e['path']} fails its sha256 (corrupt)"
    return None


def _verify_all_ranks(path, checksums):
    """verify() as a collective: rank 0 checks sizes, every rank hashes a share, rank 0's verdict on every rank."""
    rank, world = _dist()
    m, why = check_sizes(path) if rank == 0 else (None, None)
    m, why = _bcast((m, why))
    if why or not checksums:
        return why
    digests = _hash_all_ranks(path, [e["path"] for e in m["files"]])
    return _bcast(_compare(m, digests) if rank == 0 else None)


# ---------------------------------------------------------------------------- save
def _sweep_tmp(d):
    """Remove tmp-* leftovers of saves or prunes killed earlier (rank 0, before a new save)."""
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if name.startswith(TMP_PREFIX):
            atomic._remove(os.path.join(d, name))


def _save_error(failure, tag, prev):
    """The one-line message of a save that failed with atomic.write_failure's (no_space, what)."""
    no_space, what = failure
    keep = f"the previous checkpoint {prev} and `latest` are untouched (resume=auto)" if prev else \
        "no earlier checkpoint exists"
    fix = "free space or move out_dir, lower keep_last" if no_space else "fix the directory (permissions, mount)"
    return f"checkpoint {tag} not saved: {what}; {fix}; {keep}"


def _short_of_space(d, prev):
    """(True, what) when the filesystem of `d` has less free space than the last checkpoint `prev` took (a save of
    the same model needs as much, before the prune), else None. Refusing here writes nothing; without a previous
    checkpoint, or where the filesystem does not report its free space, the save goes ahead and a full disk is
    caught as it fails."""
    m, _ = read_manifest(os.path.join(d, prev)) if prev else (None, None)
    free = atomic.free_bytes(d)
    need = sum(e["bytes"] for e in m["files"]) if m else 0
    if free is not None and free < need:
        return True, f"not enough space on {d} ({free} bytes free, the last checkpoint {prev} took {need})"
    return None


def read_latest(d):
    """The tag `latest` names, or None (missing or unreadable)."""
    try:
        with open(os.path.join(d, "latest")) as f:
            tag = f.read().strip()
    except OSError:
        return None
    return tag if step_of(tag) is not None else None


def save(engine, cfg, step, client_state, keep_last=None):
    """Every rank: write checkpoint `step`, verify-able (manifest.json), commit it (`latest`), prune older ones to
    keep_last (default cfg.keep_last, else 3; 0 keeps all). Returns its path. Less free space than the last
    checkpoint took is refused before anything is written; a failed write (disk full: an OSError, or torch's zip
    writer's RuntimeError; permissions) is a one-line TrainingError on the failing rank(s), with its temporary files
    removed (rank 0) and the previous checkpoint and `latest` left usable."""
    d = ckpt_dir(cfg)
    tag, tmp_tag = tag_for(step), TMP_PREFIX + tag_for(step)
    tmp, final = os.path.join(d, tmp_tag), os.path.join(d, tag)
    rank, world = _dist()
    prev = read_latest(d)
    failure = None
    if rank == 0:
        try:
            os.makedirs(d, exist_ok=True)
            _sweep_tmp(d)
            failure = _short_of_space(d, prev)
        except OSError as e:
            failure = atomic.write_failure(e, d)
    failure = _bcast(failure)  # rank 0's verdict on every rank; also the barrier before anyone writes
    if failure:
        raise TrainingError(_save_error(failure, tag, prev))
    state = dict(client_state, torch_rng=torch.get_rng_state())
    try:
        engine.save_checkpoint(d, tag=tmp_tag, client_state=state, save_latest=False)
    except (OSError, RuntimeError) as e:
        # A real full disk fails inside torch's zip writer as a RuntimeError, not an OSError (atomic.write_failure).
        # No collective after a failure: another rank may have succeeded and wait in DeepSpeed's barrier; this
        # rank exits with the message and the launcher stops the others. The next save sweeps any leftovers.
        failure = atomic.write_failure(e, d)  # before the partial files go: removing them frees the space
        if failure is None:
            raise
        if rank == 0:
            atomic._remove(tmp)
        raise TrainingError(_save_error(failure, tag, prev)) from None
    _barrier()
    rels = _bcast(list_files(tmp) if rank == 0 else None)
    digests = _hash_all_ranks(tmp, rels)
    err = None
    if rank == 0:
        renamed = False
        try:
            write_manifest(tmp, step, _world_of(engine, world), digests)
            if os.path.exists(final):
                atomic._remove(final)
            os.replace(tmp, final)
            renamed = True
            atomic.write_text(os.path.join(d, "latest"), tag)
        except OSError as e:
            err = _save_error(atomic.write_failure(e, d), tag, prev)
            atomic._remove(final if renamed else tmp)
    err = _bcast(err)
    if err:
        raise TrainingError(err)
    if rank == 0:
        keep = getattr(cfg, "keep_last", KEEP_LAST) if keep_last is None else keep_last
        try:
            prune(d, keep)
        except OSError as e:  # pruning is housekeeping: the new checkpoint is committed
            warn(f"could not prune old checkpoints in {d}: {e}")
    _barrier()
    return final


def _world_of(engine, world):
    return int(getattr(engine, "dp_world_size", None) or world)


def list_checkpoints(d):
    """Tags of the stepNNNNNNNN directories in d, newest (highest step) first."""
    if not os.path.isdir(d):
        return []
    tags = [n for n in os.listdir(d) if step_of(n) is not None and os.path.isdir(os.path.join(d, n))]
    return sorted(tags, key=step_of, reverse=True)


def prune(d, keep_last):
    """Remove complete checkpoints (with a manifest) older than the newest `keep_last` at or below the one `latest`
    names; never that one, never one without a manifest (a pre-manifest checkpoint is kept), never a later step.
    keep_last <= 0 keeps all. Each is renamed to tmp-prune-* first, so a killed prune leaves no half checkpoint.
    Returns the removed tags."""
    latest = read_latest(d)
    if keep_last <= 0 or latest is None:
        return []
    top = step_of(latest)
    complete = [t for t in list_checkpoints(d)
                if step_of(t) <= top and os.path.isfile(os.path.join(d, t, MANIFEST))]
    keep = set(complete[:keep_last]) | {latest}
    removed = []
    for t in complete:
        if t not in keep:
            gone = os.path.join(d, f"{TMP_PREFIX}prune-{t}")
            os.replace(os.path.join(d, t), gone)
            atomic._remove(gone)
            removed.append(t)
    return removed


# ---------------------------------------------------------------------------- resume
def find_resume(cfg, checksums=True):
    """(load_dir, tag) to resume from, or None for a fresh start. Every rank calls it (rank 0 decides, the others
    get its answer); verification reads every file once (split over the ranks) when checksums=True.

    resume="" -> None. resume=auto -> the checkpoint `latest` names if intact, else the newest intact one below it
    (warning; the newest intact one of all when `latest` names one that does not exist), None if the run has no
    checkpoint yet, TrainingError if none is intact. resume=<dir> -> that
    checkpoint if intact, else TrainingError (no silent substitute for an explicit choice)."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        path = cfg.resume.rstrip("/")
        if not os.path.isdir(path):
            raise ConfigError(f"resume={cfg.resume!r} is not a checkpoint directory; use resume=auto or a "
                              f"runs/<name>/checkpoints/stepNNNNNNNN path")
        why = _verify_all_ranks(path, checksums)
        if why:
            raise TrainingError(f"checkpoint {path} is not intact: {why}; pick another (resume=auto or "
                                f"resume=<dir>), or `python -m distillery.checkpoint --adopt {path}` if you know "
                                f"it is complete")
        return os.path.dirname(path), os.path.basename(path)
    d = ckpt_dir(cfg)
    rank, _ = _dist()
    plan = _bcast(_candidates(d) if rank == 0 else None)   # (latest, [tags to try, best first], [later tags])
    latest, cands, later = plan
    if latest is None and not cands:
        return None
    problems = [] if latest is None or latest in cands else [f"{latest} named by {d}/latest does not exist"]
    for tag in cands:
        why = _verify_all_ranks(os.path.join(d, tag), checksums)
        if why is None:
            if problems:
                warn(f"checkpoint {problems[0]}; resuming from {tag} (step {step_of(tag)}) instead")
            return d, tag
        problems.append(f"{tag} in {d} is not intact: {why}")
    # Nothing intact at or below `latest`. resume='' is no way out (resume.check refuses it for a run that trained).
    intact = [t for t in later if _verify_all_ranks(os.path.join(d, t), checksums) is None]
    if intact:
        raise TrainingError(f"no intact checkpoint at or below {latest}, the one `latest` names "
                            f"({'; '.join(problems)}); later checkpoint(s) not named by `latest`: {', '.join(intact)}; "
                            f"to continue from one, resume={os.path.join(d, intact[0])} (the run then goes on from "
                            f"there), or start a new run with another name=")
    raise TrainingError(f"no intact checkpoint to resume from ({'; '.join(problems)}); start a new run with another "
                        f"name=, or check the filesystem")


def _candidates(d):
    """(tag `latest` names or None, tags to try in order, later tags not tried). Normally `latest` first, then
    earlier steps, newest first; later steps are an abandoned branch. Without a readable `latest`, or when it names a
    checkpoint that does not exist (a stale `latest`: it can no longer be trusted), every checkpoint, newest first."""
    tags = list_checkpoints(d)
    latest = read_latest(d)
    if latest is None:
        if tags and os.path.isfile(os.path.join(d, "latest")):
            warn(f"{d}/latest is unreadable; trying the checkpoints newest first")
        return None, tags, []
    if latest not in tags:
        return latest, tags, []
    top = step_of(latest)
    return latest, [t for t in tags if step_of(t) <= top], [t for t in tags if step_of(t) > top]


def is_universal(where):
    """True if the checkpoint (load_dir, tag) or path is a universal one (made by to_universal)."""
    path = os.path.join(*where) if isinstance(where, (tuple, list)) else where
    m, _ = read_manifest(path)
    return bool(m and m.get("universal"))


def ds_config_for_resume(ds_config, where):
    """The student's DeepSpeed config for resuming from `where`: with checkpoint.load_universal set when `where` is a
    universal checkpoint (DeepSpeed reads that flag when the engine is built, so call this before init_student)."""
    if where is None or not is_universal(where):
        return ds_config
    return dict(ds_config, checkpoint=dict(ds_config.get("checkpoint", {}), load_universal=True))


def check_world_size(path, world_size, engine_universal=False):
    """One-line ConfigError, before anything is loaded, if the checkpoint at `path` was written by another number of
    ranks (ZeRO partitions parameters and optimizer per rank; DeepSpeed re-partitions only universal checkpoints),
    or is universal and the engine was not built to load one."""
    m, _ = read_manifest(path)
    if m and m.get("universal"):
        if not engine_universal:
            raise ConfigError(f"checkpoint {path} is a universal checkpoint but the engine was built without "
                              f"checkpoint.load_universal; build it with checkpoint.ds_config_for_resume(ds, where)")
        return
    saved = m.get("world_size") if m else None
    if saved is not None and int(saved) != int(world_size):
        raise ConfigError(f"checkpoint {path} was saved by {saved} ranks, this run has {world_size}: ZeRO shards "
                          f"it per rank; resume with {saved} ranks, or convert it: {CONVERT_CMD.format(src=path)} "
                          f"then resume={path}{UNIVERSAL_SUFFIX}")


def to_universal(src, dst=None):
    """Convert the intact checkpoint `src` into a DeepSpeed universal checkpoint `dst` (default src + '-universal',
    written atomically, with its own manifest) that loads at any world size. Returns dst."""
    src = src.rstrip("/")
    dst = (dst or src + UNIVERSAL_SUFFIX).rstrip("/")
    why = verify(src)
    if why:
        raise TrainingError(f"cannot convert {src}: it is not intact: {why}; convert an intact checkpoint")
    m, _ = read_manifest(src)
    if m.get("universal"):
        raise ConfigError(f"{src} is already a universal checkpoint; resume from it directly")
    import subprocess
    with atomic.atomic_path(dst) as tmp:
        p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
                            "--output_folder", tmp, "--num_extract_workers", "1", "--num_merge_workers", "1"],
                           capture_output=True, text=True)
        if p.returncode:
            tail = _one_line((p.stderr or p.stdout)[-400:])
            raise TrainingError(f"ds_to_universal failed on {src}: {tail}")
        write_manifest(tmp, m["step"], m["world_size"], universal=True)
    # ds_to_universal names its (temporary) output in <parent>/latest_universal; name the final one
    atomic.write_text(os.path.join(os.path.dirname(os.path.abspath(dst)), "latest_universal"), os.path.basename(dst))
    return dst


def load(engine, cfg, where, checksums=False):
    """Every rank: load (load_dir, tag) into the engine (optimizer, LR schedule, RNG) and return the client state.
    Checks before anything is loaded: manifest and sizes (sha256 too if checksums=True: find_resume has already
    done it), the world size, and after loading, the config keys that must not change."""
    load_dir, tag = where
    path = os.path.join(load_dir, tag)
    rank, world = _dist()
    why = _verify_all_ranks(path, checksums)
    if why:
        raise TrainingError(f"checkpoint {path} is not intact: {why}; resume=auto falls back to an intact one")
    universal = bool(getattr(engine, "load_universal_checkpoint", lambda: False)())
    check_world_size(path, _world_of(engine, world), universal)
    hyper = _group_hyperparameters(engine) if universal else None
    loaded, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    if loaded is None:
        raise ConfigError(f"could not load checkpoint {path}; it is missing or incomplete")
    if universal:
        _repair_universal_load(engine, hyper)
    saved = client.get("config", {})
    changed = [k for k in FIXED_ON_RESUME if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"resume changes {', '.join(f'{k} ({saved[k]!r} -> {getattr(cfg, k)!r})' for k in changed)}"
                          f"; start a new run name instead")
    if "torch_rng" in client:
        torch.set_rng_state(client["torch_rng"])
    return client


def _repair_universal_load(engine, hyper):
    """Put back the two pieces of optimizer state DeepSpeed 0.19.8's ZeRO-3 universal loader
    (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3) loses, so the resume continues exactly:

    - it copies param group 0's hyperparameters into every group, so the no-decay group (norms, biases:
      engines.param_groups) would be decayed from here on. Each group gets its own back: this engine's, built from
      the same run-defining weight_decay / betas / eps as the checkpoint (lr is the schedule's).
    - it gives every parameter sub-group the *same* Adam `step` tensor, which torch's AdamW increments in place once
      per sub-group: the step count then grows by the number of sub-groups per optimizer step, and the bias
      correction of every group after the first is wrong from the first step on. Each gets its own copy.

    Measured before this repair (docs/reliability.md): after a 2-rank checkpoint converted with --to-universal and
    resumed for 8 steps, all 21 tensors of the micro student off, norms by up to 9e-4, losses by up to 2.7e-4."""
    for g, h in zip(engine.optimizer.param_groups, hyper or []):
        g.update(h)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer ZeRO-3 drives
    for st in getattr(inner, "state", {}).values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def _group_hyperparameters(engine):
    """Each optimizer param group's settings but its parameters and lr (the LR schedule sets those)."""
    groups = getattr(getattr(engine, "optimizer", None), "param_groups", None) or []
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]


# ---------------------------------------------------------------------------- tool
def main(argv=None):
    """python -m distillery.checkpoint <checkpoints dir or checkpoint dir> [--sizes-only] | --adopt DIR |
    --to-universal DIR"""
    import argparse
    ap = argparse.ArgumentParser(description="verify Distillery checkpoints against their manifests")
    ap.add_argument("path", nargs="?", help="runs/<name>/checkpoints, or one stepNNNNNNNN directory")
    ap.add_argument("--sizes-only", action="store_true", help="skip the sha256 (sizes and presence only)")
    ap.add_argument("--to-universal", metavar="DIR", help="convert a checkpoint into a universal one (DIR-universal) "
                                                          "that resumes at any world size")
    ap.add_argument("--adopt", metavar="DIR", help="write a manifest for a complete checkpoint that has none "
                                                   "(saved before manifests); world size from its files")
    args = ap.parse_args(argv)
    if args.to_universal:
        dst = to_universal(args.to_universal)
        print(f"ok: wrote {dst}; resume with resume={dst} (any world size)")
        return 0
    if args.adopt:
        path = args.adopt.rstrip("/")
        n = sum(1 for f in os.listdir(path) if re.match(r"zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$", f))
        m = write_manifest(path, step_of(os.path.basename(path)) or 0, max(1, n))
        print(f"ok: wrote {os.path.join(path, MANIFEST)} ({len(m['files'])} files, world size {m['world_size']})")
        return 0
    if args.path is None:
        ap.error("give a checkpoints directory, or --adopt DIR")
    path = args.path.rstrip("/")
    tags = [os.path.basename(path)] if step_of(os.path.basename(path)) is not None else list_checkpoints(path)
    root = os.path.dirname(path) if step_of(os.path.basename(path)) is not None else path
    bad = 0
    for t in tags:
        t0 = time.perf_counter()
        why = verify(os.path.join(root, t), checksums=not args.sizes_only)
        bad += why is not None
        print(f"{'ok' if why is None else 'BAD'}: {t}" + (f": {why}" if why else f" ({time.perf_counter() - t0:.1f} s)"))
    return 1 if bad else 0


if __name__ == "__main__":
    from distillery.errors import cli
    sys.exit(cli(main))
