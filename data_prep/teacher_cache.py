"""Run a teacher once over the training rows and store sparse targets (issue 13; format: distillery/teacher_cache.py).

    python -m data_prep.teacher_cache --teacher runs/teacher/export --data data/offline --out data/offline-tc \
        --k 64 --method topk                                   # CPU, a world of one
    deepspeed --num_gpus 8 -m data_prep.teacher_cache --ds_config ds_configs/zero3.json --teacher <dir> \
        --data data/fineweb-edu --out data/fineweb-edu-tc-8b --k 64 --method sampled --seed 0

The teacher is the trainer's, in the trainer's placement (distillery/placement.py: --teacher_placement auto |
replicated | partitioned | offload; auto picks from the teacher's size and the memory per rank), document-masked
positions when the data has an EOS (distillery/packing.py, as training does by default), and its output layer applied
chunk by chunk to the last hidden states (gathered like the trainer's KD head when partitioned), so no [rows, S, V]
tensor exists. Per position: top-k of log p_t^T plus the log of the remaining mass, or K ids drawn
from p_t^T with their weights (count / K) plus the teacher's entropy.

Work split: the cache is cut into shards of --rows_per_shard training rows (global row order); shards still to do are
split into contiguous ranges, one per rank; every rank runs its shards' fixed batches (--batch_size rows of one
shard) and all ranks run the same number of forwards (a partitioned teacher gathers parameters collectively; a rank
out of work runs a dummy one). A batch's rows, their positions and their sampling (a generator seeded by (seed, row
index)) do not depend on the world size or the teacher's placement, so the bytes do not either.

Resume: a shard is written to a temporary name and renamed, then its record (rows, bytes, sha256) is written to
progress/; a rerun with the same arguments checks every finished shard's size and checksum (each rank a share), redoes
any that fail, and computes only the rest. index.json is written last: no index, no cache.

Layout (distillery/cache_layout.py): --layout compact (default; --vals fp16|bf16|fp32 for top-k log-probs, --entropy
fixed16|fp32 for the sampled entropy) or --layout fixed (v1: int32 ids, float32 values). An existing cache converts to
another layout without the teacher, shard by shard (sources verified against their checksums first):
    python -m data_prep.teacher_cache --convert data/offline-tc --out data/offline-tc-v2 [--layout ...]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from distillery import atomic, cache_layout, shards
from distillery import teacher_cache as tc
from distillery.errors import ConfigError, DataError, cli

PROGRESS = "progress"


def auto_rows_per_shard(seq_len, bytes_per_token):
    """~1 GiB shards (at the layout's largest row): few files at 50B tokens, little lost to a kill."""
    return max(1, int((2 ** 30) // (seq_len * bytes_per_token)))


def layout_spec(a, kd_vocab):
    """The compact layout's index entry for these arguments (None: the fixed layout)."""
    version = cache_layout.COMPACT if a.layout == "compact" else cache_layout.FIXED
    return version, cache_layout.spec(version, a.method, kd_vocab, vals=a.vals, entropy=a.entropy)


def auto_chunk(vocab):
    """Positions per teacher-logits chunk: ~2^24 logits (64 MiB fp32 per [C, V] buffer; the float64 CDF of
    sampling doubles it)."""
    return max(16, 2 ** 24 // max(1, vocab))


def fingerprint(a, data_id, teacher_id, kd_vocab, eos_id, rows_per_shard, chunk, bf16):
    """Everything the bytes depend on; a rerun with another value is refused (delete --out or use another). The
    fixed layout adds no key, so a v1 build (before issue 23) resumes with --layout fixed."""
    fp = {"teacher": teacher_id, "data": data_id, "k": a.k, "method": a.method, "temperature": a.temperature,
          "seed": a.seed, "doc_mask": a.doc_mask, "eos_id": eos_id if a.doc_mask else None, "kd_vocab": kd_vocab,
          "rows_per_shard": rows_per_shard, "batch_size": a.batch_size, "chunk": chunk, "bf16": bf16}
    layout = layout_spec(a, kd_vocab)[1]
    return fp if layout is None else {**fp, "layout": layout}


def _check_layout_args(a, method):
    """--vals is the top-k precision, --entropy the sampled one, both compact only (cache_layout.spec fills their
    defaults)."""
    for flag, val, choices, needs in (("--vals", a.vals, cache_layout.VALS, "topk"),
                                      ("--entropy", a.entropy, cache_layout.ENTROPY, "sampled")):
        if val is not None and (method != needs or a.layout != "compact"):
            raise ConfigError(f"{flag} sets the precision of a compact {needs} cache; drop it for a "
                              f"{a.layout} {method} cache")
        if val is not None and val not in choices:
            raise ConfigError(f"{flag} {val!r} unknown; use one of {', '.join(choices)}")


def _check_args(a):
    if a.teacher_offload:
        raise ConfigError("--teacher_offload was replaced by --teacher_placement offload")
    for flag in ("teacher", "data", "k", "method"):
        if getattr(a, flag) is None:
            raise ConfigError(f"--{flag} is required to build a cache (or give --convert <cache> to convert one)")
    _check_layout_args(a, a.method)
    if a.method not in tc.METHODS:
        raise ConfigError(f"--method {a.method!r} unknown; use topk or sampled")
    if a.k < 1:
        raise ConfigError(f"--k {a.k} must be >= 1")
    if not a.temperature > 0:
        raise ConfigError(f"--temperature {a.temperature} must be > 0")
    if a.batch_size < 1:
        raise ConfigError(f"--batch_size {a.batch_size} must be >= 1")


class ShardWriter:
    """One shard's file (cache_layout.ShardFile: temporary name, sha256 on the fly, renamed when complete), then
    committed by its record in progress/."""

    def __init__(self, out, j, first_row, rows, layout):
        self.out, self.j, self.first_row, self.rows = out, j, first_row, rows
        self.rel = tc.shard_path(j)
        self.file = cache_layout.ShardFile(os.path.join(out, self.rel), layout)

    def write(self, packed):
        self.file.write(*packed)

    @property
    def written(self):
        return self.file.rows

    def close(self):
        assert self.written == self.rows, (self.written, self.rows)
        nbytes, sha = self.file.close()
        entry = {"path": self.rel, "first_row": self.first_row, "rows": self.rows, "bytes": nbytes, "sha256": sha}
        atomic.write_json(os.path.join(self.out, PROGRESS, f"{self.j:05d}.json"), entry)
        return entry

    def abort(self):
        self.file.abort()


def _finished(out, j, n_rows):
    """The committed record of shard j if its file is there with the size it records, else None."""
    meta = os.path.join(out, PROGRESS, f"{j:05d}.json")
    if not os.path.isfile(meta):
        return None
    with open(meta) as f:
        e = json.load(f)
    path = os.path.join(out, e["path"])
    if e.get("rows") != n_rows or not os.path.isfile(path) or os.path.getsize(path) != e.get("bytes"):
        return None
    return e


def encode_batch(h, w, rows, a, chunk, v, seq_len, layout):
    """h [b, S, H] teacher hidden states, w [>=v, H] its output weight -> the rows packed by `layout` (bytes, row
    lengths). Logits chunk by chunk over the flattened positions; the sampling uniforms come per row from (seed, row
    index)."""
    import torch
    b = h.shape[0]
    hf = h.reshape(b * seq_len, -1)
    wv = w[:v]
    u = torch.cat([tc.row_uniforms(a.seed, r, seq_len, a.k) for r in rows]) if a.method == "sampled" else None
    ids = torch.empty(b * seq_len, a.k, dtype=torch.int32)
    vals = torch.empty(b * seq_len, a.k, dtype=torch.float32)
    rest = torch.empty(b * seq_len, dtype=torch.float32)
    for s in range(0, b * seq_len, chunk):
        e = min(b * seq_len, s + chunk)
        logits = (hf[s:e] @ wv.to(hf.dtype).t()).float()
        logp = torch.log_softmax(logits / a.temperature if a.temperature != 1.0 else logits, -1)
        if a.method == "topk":
            i, x, r = tc.encode_topk(logp, a.k)
        else:
            i, x, r = tc.encode_sampled(logp, u[s:e])
        ids[s:e], vals[s:e], rest[s:e] = i.cpu(), x.cpu(), r.cpu()
    return layout.pack(ids.reshape(b, seq_len, a.k).numpy(), vals.reshape(b, seq_len, a.k).numpy(),
                       rest.reshape(b, seq_len).numpy())


def convert(a):
    """Rewrite the cache a.convert into a.out in the layout the arguments name, shard by shard (each source shard's
    checksum verified first; the same rows per shard), into a temporary directory renamed onto a.out at the end: a
    killed conversion leaves no a.out. Converted equals built: the same shard bytes and index entries as a build with
    these arguments (tests/test_teacher_cache.py). Returns the new index."""
    for flag in ("teacher", "data", "k", "method"):
        if getattr(a, flag) is not None:
            raise ConfigError(f"--convert takes the cache's own settings; drop --{flag}")
    src = tc.CacheReader(a.convert)
    ix = src.index
    _check_layout_args(a, ix["method"])
    if os.path.exists(a.out):
        raise DataError(f"{a.out} exists; delete it or pick another --out for the converted cache")
    a.method = ix["method"]
    version, spec = layout_spec(a, src.kd_vocab)
    layout = cache_layout.layout_of(ix["method"], src.k, src.seq_len, src.kd_vocab, version, spec)
    chunk = max(1, 2 ** 24 // (src.seq_len * src.k))                  # rows per read: ~128 MiB of int64 ids
    say = (lambda *x: print(*x, file=sys.stderr, flush=True)) if not a.quiet else (lambda *x: None)
    files = []
    with atomic.atomic_path(a.out) as tmp:
        for e in ix["files"]:
            if shards.sha256_file(os.path.join(a.convert, e["path"])) != e["sha256"]:
                raise DataError(f"teacher cache shard {os.path.join(a.convert, e['path'])} fails its checksum "
                                f"(corrupt); rebuild the cache before converting it")
            w = cache_layout.ShardFile(os.path.join(tmp, e["path"]), layout)
            try:
                r0, r1 = int(e["first_row"]), int(e["first_row"]) + int(e["rows"])
                for r in range(r0, r1, chunk):
                    ids, vals, rest = src.take(np.arange(r, min(r1, r + chunk)))
                    w.write(*layout.pack(ids.numpy(), vals.numpy(), rest.numpy()))
                nbytes, sha = w.close()
            except BaseException:
                w.abort()
                raise
            files.append({"path": e["path"], "first_row": r0, "rows": r1 - r0, "bytes": nbytes, "sha256": sha})
        build = {k: v for k, v in (ix.get("build") or {}).items() if k != "layout"}
        build = {**build, "layout": spec} if spec else build
        storage = tc.storage_entries(version, spec, ix["method"], src.seq_len, src.k, files)
        keep = {k: v for k, v in ix.items() if k not in ("version", "layout", "record", "bytes_per_token", "files",
                                                         "tokens", "bytes", "build")}
        index = {**keep, **storage, "build": build, "converted_from": {"path": os.path.abspath(a.convert),
                                                                         "version": ix["version"],
                                                                         "bytes": ix["bytes"]}}
        atomic.write_json(os.path.join(tmp, "index.json"), index)
    say(f"converted {a.convert} (v{ix['version']}, {ix['bytes']:,} bytes) -> {a.out} ({cache_layout.NAMES[version]} "
        f"v{version}, {index['bytes']:,} bytes = {index['bytes_per_token']:.2f} bytes/token)")
    return index


def run(a):
    """Build (or resume, or confirm) the cache described by the parsed arguments `a`. Returns the index."""
    t_start = time.time()
    _check_args(a)
    index = shards.read_index(a.data)
    data_id = tc.data_identity(a.data, index)
    S, R = data_id["seq_len"], data_id["rows"]
    from distillery.models import check_model_dir
    kd_vocab = check_model_dir(a.teacher, index, who="teacher")
    if a.k > kd_vocab:
        raise ConfigError(f"--k {a.k} exceeds the shared vocab {kd_vocab}; use --k <= {kd_vocab} (--k {kd_vocab} "
                          f"with topk stores the whole distribution)")
    eos_id = index.get("eos_id")
    if a.doc_mask and eos_id is None:
        raise DataError(f"document masking needs the data's EOS id and {a.data}/index.json has none; rebuild the "
                        f"data with data_prep, or pass --no_doc_mask (and train with doc_mask=false)")
    teacher_id = tc.teacher_identity(a.teacher)
    version, spec = layout_spec(a, kd_vocab)
    layout = cache_layout.layout_of(a.method, a.k, S, kd_vocab, version, spec)
    rows_per_shard = a.rows_per_shard or auto_rows_per_shard(S, layout.max_bytes_per_token())
    chunk = a.chunk_size or auto_chunk(kd_vocab)
    from distillery.engines import load_ds_config
    ds_base = load_ds_config(a.ds_config)
    bf16 = bool((ds_base.get("bf16") or ds_base.get("bfloat16") or {}).get("enabled"))
    fp = fingerprint(a, data_id, teacher_id, kd_vocab, eos_id, rows_per_shard, chunk, bf16)
    say = (lambda *x: print(*x, file=sys.stderr, flush=True)) if not a.quiet else (lambda *x: None)

    index_path = os.path.join(a.out, "index.json")
    if os.path.isfile(index_path):
        have = tc.read_cache_index(a.out)
        if have["version"] != version:
            name = cache_layout.NAMES[have["version"]]
            raise DataError(f"{a.out} already holds a teacher cache in the {name} layout (v{have['version']}); convert "
                            f"it with `python -m data_prep.teacher_cache --convert {a.out} --out <new dir>`, or rerun "
                            f"with --layout {name}")
        if have.get("build") != fp:
            raise DataError(f"{a.out} already holds a teacher cache built with other arguments; delete it or pick "
                            f"another --out")
        say(f"{a.out} already built; nothing to do (delete it to rebuild)")
        return have
    claim = os.path.join(a.out, PROGRESS, "build.json")
    if os.path.isfile(claim):
        with open(claim) as f:
            if json.load(f) != fp:
                raise DataError(f"{a.out} holds a partial teacher cache with other arguments; rerun with the same "
                                f"arguments or delete {a.out}")

    if a.doc_mask:  # the teacher's kernel keeps packed documents apart at --batch_size, or stop: nothing written yet
        from distillery import maskprobe
        from distillery.models import attn_implementation
        maskprobe.check_dir(a.teacher, attn_implementation("auto", True), a.batch_size, ds_base, a.trust_remote_code,
                            say=say)

    import torch
    import torch.distributed as dist
    from distillery.launch import init_distributed
    rank, world = init_distributed()
    n_shards = -(-R // rows_per_shard)
    bounds = [(j * rows_per_shard, min(R, (j + 1) * rows_per_shard)) for j in range(n_shards)]
    if rank == 0:
        os.makedirs(os.path.join(a.out, tc.SHARD_DIR), exist_ok=True)
        os.makedirs(os.path.join(a.out, PROGRESS), exist_ok=True)
        for d in (tc.SHARD_DIR, PROGRESS):  # temporary files of a killed run: never a final name, rewritten
            for fn in os.listdir(os.path.join(a.out, d)):
                if ".tmp-" in fn:
                    os.remove(os.path.join(a.out, d, fn))
        if not os.path.isfile(claim):
            atomic.write_json(claim, fp)
    dist.barrier()

    # finished shards: size from the record, checksum re-read (each rank a share); a bad one is redone
    done = {j: e for j in range(n_shards) if (e := _finished(a.out, j, bounds[j][1] - bounds[j][0]))}
    mine = sorted(done)[rank::world]
    bad = [j for j in mine if shards.sha256_file(os.path.join(a.out, done[j]["path"])) != done[j]["sha256"]]
    every = [None] * world
    dist.all_gather_object(every, bad)
    bad = sorted(j for b in every for j in b)
    for j in bad:
        say(f"note: shard {tc.shard_path(j)} fails its checksum; recomputing it")
        done.pop(j)
    dist.barrier()
    if rank == 0:
        for j in bad:
            os.remove(os.path.join(a.out, PROGRESS, f"{j:05d}.json"))
    todo = [j for j in range(n_shards) if j not in done]
    lo, hi = len(todo) * rank // world, len(todo) * (rank + 1) // world
    my_shards = todo[lo:hi]
    batches = [(j, r, min(bounds[j][1], r + a.batch_size)) for j in my_shards
               for r in range(bounds[j][0], bounds[j][1], a.batch_size)]
    steps = torch.tensor([len(batches)], dtype=torch.int64)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    n_steps = int(steps.item())
    todo_rows = sum(bounds[j][1] - bounds[j][0] for j in todo)
    if todo and done:
        say(f"resuming {a.out}: {len(done)} of {n_shards} shards done and verified, {len(todo)} to go")

    # the teacher, exactly as the trainer builds it, in the placement the trainer would pick (distillery/placement.py)
    from distillery.config import Config
    from distillery.models import attn_implementation
    from distillery.packing import doc_positions
    from distillery.placement import build_teacher, decide
    import deepspeed
    cfg = Config(teacher=a.teacher, micro_batch_size=a.batch_size, seq_len=S, teacher_placement=a.teacher_placement,
                 trust_remote_code=a.trust_remote_code)
    cfg.attn_impl = attn_implementation(cfg.attn_impl, a.doc_mask)
    placed = decide(cfg, ds_base, world, a.teacher)  # no student: the device is the teacher's alone
    cfg.teacher_placement = placed.placement
    if rank == 0:
        say(placed.line)
    engine = build_teacher(cfg, ds_base)
    dev = engine.device
    rows_src = shards.TokenRows(a.data)
    w_head = engine.module.head_weight

    writer, written, t0, last = None, 0, time.time(), 0.0
    local_rows = torch.zeros(1, dtype=torch.int64)
    local_bytes = 0                                   # this rank's row bytes so far (the progress line's bytes/token)
    try:
        for step in range(n_steps):
            job = batches[step] if step < len(batches) else None
            if job is not None:
                j, r0, r1 = job
                x = torch.from_numpy(rows_src.take(np.arange(r0, r1))).to(dev)
            else:  # out of work: a forward all the same, ZeRO-3 gathers parameters collectively
                x = torch.zeros(1, S, dtype=torch.long, device=dev)
            pos = doc_positions(x, eos_id) if a.doc_mask else None
            with torch.no_grad():
                h = engine(x, position_ids=pos)
                with deepspeed.zero.GatheredParameters([w_head], modifier_rank=None):
                    rec = encode_batch(h, w_head, range(r0, r1), a, chunk, kd_vocab, S, layout) if job else None
            if job is not None:
                if writer is None:
                    writer = ShardWriter(a.out, j, bounds[j][0], bounds[j][1] - bounds[j][0], layout)
                writer.write(rec)
                local_rows += r1 - r0
                local_bytes += int(rec[1].sum())
                if r1 == bounds[j][1]:
                    writer.close()
                    writer = None
                    written += 1
                    if a.stop_after_shards and written >= a.stop_after_shards:
                        raise KeyboardInterrupt("simulated kill (--stop_after_shards)")
            tot = local_rows.clone()
            dist.all_reduce(tot)  # one integer per step: the global progress (a forward costs far more)
            now = time.time()
            if rank == 0 and (now - last >= a.progress_every or step == n_steps - 1):
                last = now
                tok = int(tot.item()) * S
                rate = tok / max(now - t0, 1e-9)
                left = (todo_rows * S - tok) / rate if rate > 0 else float("inf")
                bpt = local_bytes / max(1, int(local_rows.item()) * S)
                say(f"[teacher_cache] {tok:,}/{todo_rows * S:,} tokens  {rate:,.0f} tok/s  ETA {left:,.0f}s  "
                    f"{bpt:.2f} bytes/token")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    dist.barrier()

    index = None
    if rank == 0:
        files = []
        for j in range(n_shards):
            e = _finished(a.out, j, bounds[j][1] - bounds[j][0])
            if e is None:
                raise DataError(f"shard {tc.shard_path(j)} of {a.out} is missing after the build (another process "
                                f"removed it?); rerun the same command")
            files.append(e)
        index = {"format": tc.FORMAT, "method": a.method, "k": a.k,
                 "temperature": a.temperature, "seed": a.seed, "doc_mask": a.doc_mask,
                 "eos_id": eos_id if a.doc_mask else None, "kd_vocab": kd_vocab, "seq_len": S, "rows": R,
                 "rows_per_shard": rows_per_shard, "teacher": teacher_id, "data": data_id,
                 **tc.storage_entries(version, spec, a.method, S, a.k, files), "build": fp}
        nbytes = index["bytes"]
        atomic.write_json(index_path, index)
        for fn in os.listdir(os.path.join(a.out, PROGRESS)):
            os.remove(os.path.join(a.out, PROGRESS, fn))
        os.rmdir(os.path.join(a.out, PROGRESS))
        dt = time.time() - t_start
        say(f"built {a.out} in {dt:.1f}s: {R:,} rows x {S} tokens, {a.method} k={a.k} T={a.temperature:g}, "
            f"{nbytes:,} bytes = {index['bytes_per_token']:.2f} bytes/token ({cache_layout.NAMES[version]} layout)")
    dist.barrier()
    return index if index is not None else tc.read_cache_index(a.out)


def parse_args(argv=None):
    import torch
    from distillery.config import PLACEMENTS
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="Hugging Face-format teacher directory (required to build)")
    ap.add_argument("--data", help="data set (data_prep output); its 'train' rows are cached (required to build)")
    ap.add_argument("--out", required=True, help="cache directory")
    ap.add_argument("--k", type=int, help="entries per position (required to build)")
    ap.add_argument("--method", choices=tc.METHODS, help="(required to build)")
    ap.add_argument("--layout", default="compact", choices=("compact", "fixed"),
                    help="compact (default: packed ids, distinct sampled ids, 16-bit values) or fixed (v1: int32 + "
                         "float32); distillery/cache_layout.py")
    ap.add_argument("--vals", choices=cache_layout.VALS, help="compact top-k: log-prob precision (default fp16)")
    ap.add_argument("--entropy", choices=cache_layout.ENTROPY,
                    help="compact sampled: entropy precision (default fixed16; fp32 keeps loss values bit-identical)")
    ap.add_argument("--convert", metavar="CACHE", help="rewrite an existing cache into --out in the layout the "
                                                        "arguments name (no teacher needed)")
    ap.add_argument("--temperature", type=float, default=1.0, help="the run's temperature (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (sampled)")
    ap.add_argument("--no_doc_mask", dest="doc_mask", action="store_false",
                    help="teacher sees each row as one causal sequence (for runs with doc_mask=false)")
    ap.add_argument("--batch_size", type=int, default=8, help="rows per teacher forward (part of the "
                                                                "determinism: keep it on a rerun)")
    ap.add_argument("--rows_per_shard", type=int, default=0, help="rows per cache shard (0: ~1 GiB)")
    ap.add_argument("--chunk_size", type=int, default=0, help="positions per logits chunk (0: ~2^24 logits)")
    ap.add_argument("--ds_config", default="ds_configs/zero3.json" if gpu else "ds_configs/cpu.json")
    ap.add_argument("--teacher_placement", default="auto", choices=PLACEMENTS,
                    help="the trainer's teacher_placement: replicated on every rank, ZeRO-3 partitioned, ZeRO-3 "
                         "offloaded to CPU, or auto (picked from sizes and memory)")
    ap.add_argument("--teacher_offload", action="store_true", help=argparse.SUPPRESS)  # replaced: refused below
    ap.add_argument("--trust_remote_code", action="store_true")
    ap.add_argument("--progress_every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--stop_after_shards", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulated kill
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)      # set by the launcher
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    return convert(a) if a.convert else run(a)


if __name__ == "__main__":
    from distillery.launch import shutdown
    cli(main)
    shutdown()  # after success only (see distillery/launch.py)
