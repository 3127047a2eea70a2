"""Offline teacher cache (issue 13): the on-disk format, the encoders that turn teacher log-probs into sparse targets,
and the reader the trainer uses instead of a live teacher. Generator: data_prep/teacher_cache.py. Loss on the sparse
targets: distillery/sparse_kd.py. Storage and compute: docs/teacher_cache.md.

A cache directory looks like
    <cache>/index.json              what is here (below); written last, atomically: no index, no cache
    <cache>/shards/00000.bin        rows [first_row, first_row + rows) of the training split, one record per row

What a row holds (seq_len S, K entries per position), as `CacheReader.take` hands it to the loss:
    ids   [S, K]   token ids (< kd_vocab)
    vals  [S, K]   topk: log p_t^T(id), sorted descending;  sampled: weight of id (count / K)
    rest  [S]      topk: log of the teacher's mass outside the K ids (-inf when K = kd_vocab);
                   sampled: the teacher's entropy H(p_t^T) in nats (so kd_sum can report a KL)
How a shard stores it: index.json's "version" names the layout (distillery/cache_layout.py): v1 "fixed", int32 ids and
float32 values, 8 K + 4 bytes per token; v2 "compact" (new caches), bit-packed ids, a sampled position's distinct ids
and their counts only, 16-bit values, and a row offset table per shard. Position t of a row holds the teacher's
distribution at temperature T for predicting token t + 1 (the target at t, distillery.loss_parts.shift_targets); the
last position (no target) is stored too, so rows stay aligned with the training rows position for position.

Sampled: K ids drawn i.i.d. with replacement from p_t^T (inverse CDF on float64 uniforms from a numpy PCG64 stream
seeded by (seed, global row index), so a row's draws do not depend on the world size, batch or chunking). The
distinct ids are stored first, ascending, with weight count / K; the unused slots repeat the first id with weight 0.
sum_k w_k f(id_k) is then an unbiased estimate of E_{p_t^T}[f] for any f (Anshumann et al., ACL 2025, 'Random
Sampling KD' with the teacher as its own proposal, so every importance weight is 1 / K).

Value precision (compact layout; cache_layout.py): sampled ids and weights are exact (bit-identical gradients), the
entropy is fp32 or fixed16 (within ln(kd_vocab) / 131070 nats); top-k log-probs are fp16 by default (measured: ~3e-4
relative on the gradients), or fp32, with which a K = vocab cache equals online KD to fp32 rounding.

index.json:
    {"format": "distillery.teacher_cache", "version": 1 | 2, "method": "topk" | "sampled", "k": K, "temperature": T,
     "seed": s, "doc_mask": bool, "eos_id": id, "kd_vocab": v, "seq_len": S, "rows": R, "rows_per_shard": N,
     "teacher": {"path", "config_sha256", "weights_sha256", "model_type", "vocab_size", "config"},
     "data": {"dir", "tokenizer", "vocab_hash", "split": "train", "seq_len", "rows", "shards_digest"},
     "layout": {...} (v2: cache_layout.spec), "record": {...}, "bytes_per_token": bytes / tokens,
     "build": {...generator settings...},
     "files": [{"path": "shards/00000.bin", "first_row", "rows", "bytes", "sha256"}], "tokens", "bytes"}
`shards_digest` is the sha256 of the training split's file list (paths, token counts, sha256s): another data set, a
rebuilt one, or the same rows cut differently all change it.
"""
import hashlib
import json
import math
import os

import numpy as np
import torch

from distillery import atomic, cache_layout, shards
from distillery.cache_layout import merge_sorted_draws
from distillery.errors import ConfigError, DataError

FORMAT = "distillery.teacher_cache"
VERSION = cache_layout.COMPACT                          # the layout new caches get
VERSIONS = (cache_layout.FIXED, cache_layout.COMPACT)   # the layouts the reader reads
METHODS = ("topk", "sampled")
SHARD_DIR = "shards"


# ---------------------------------------------------------------------------- format
def record_dtype(seq_len, k):
    """numpy dtype of one row's record in the v1 fixed layout."""
    return cache_layout.Fixed("topk", k, seq_len, 1).dtype


def bytes_per_token(k):
    """Bytes per token of the v1 fixed layout (the compact layout's depend on the data: the index says them)."""
    return 8 * int(k) + 4


def layout_of(ix):
    """The row codec (distillery/cache_layout.py) of the cache whose index is ix."""
    return cache_layout.layout_of(ix["method"], ix["k"], ix["seq_len"], ix["kd_vocab"], ix["version"],
                                  ix.get("layout"))


def shard_path(j):
    return f"{SHARD_DIR}/{j:05d}.bin"


def data_identity(data_dir, index=None):
    """What ties a cache to its training rows: tokenizer hash, row layout and a digest of the train shards' checksums."""
    index = index or shards.read_index(data_dir)
    split = index["splits"].get("train")
    if split is None or split.get("kind") != "rows":
        raise DataError(f"data set {data_dir!r} has no 'train' rows split; rebuild it with data_prep")
    files = [[e["path"], int(e["tokens"]), e["sha256"]] for e in split["files"]]
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {"dir": os.path.abspath(data_dir), "tokenizer": index["tokenizer"].get("name"),
            "vocab_hash": index["tokenizer"]["vocab_hash"], "split": "train", "seq_len": int(split["seq_len"]),
            "rows": int(split["tokens"]) // int(split["seq_len"]), "shards_digest": digest}


def teacher_identity(teacher_dir):
    """Path, a hash of config.json (canonical JSON: the architecture), the content hash of the safetensors weights
    (distillery.models.weights_sha256: two teachers of one architecture trained differently differ only there;
    read from the export's record, else computed once per build) and the config itself (the FLOPs of the cache's
    forward, distillery/flops.py, without the teacher directory)."""
    from distillery.models import weights_sha256
    conf, config_sha256 = _teacher_config(teacher_dir)
    return {"path": os.path.abspath(teacher_dir), "config_sha256": config_sha256,
            "weights_sha256": weights_sha256(teacher_dir), "model_type": conf.get("model_type"),
            "vocab_size": conf.get("vocab_size"), "config": conf}


def _teacher_config(teacher_dir):
    """(config.json as a dict, sha256 of its canonical JSON)."""
    fn = os.path.join(teacher_dir, "config.json")
    try:
        with open(fn) as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"teacher {fn} cannot be read ({type(e).__name__}); give a Hugging Face-format "
                        f"directory") from None
    return conf, hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest()


def storage_entries(version, spec, method, S, k, files):
    """The index entries that describe how the rows are stored: version, layout, record, files, bytes, tokens."""
    if version == cache_layout.FIXED:
        record = {"ids": f"int32 [{S}, {k}]", "vals": f"float32 [{S}, {k}]", "rest": f"float32 [{S}]"}
    elif method == "topk":
        record = {"rest": f"{spec['vals']} [{S}]", "vals": f"{spec['vals']} [{S}, {k}]",
                  "ids": f"{spec['id_bits']}-bit packed [{S}, {k}]", "table": "uint64 [rows + 1] row offsets"}
    else:
        record = {"rest": f"{spec['rest']} [{S}]", "mask": f"{k - 1} bits per position: sorted draw j starts a new id",
                  "ids": f"{spec['id_bits']}-bit packed, the distinct ids of each position, ascending",
                  "table": "uint64 [rows + 1] row offsets"}
    record["vals_meaning"] = ("log p_t^T(id), descending" if method == "topk" else
                              "weight count/K of id (distinct ids first)")
    record["rest_meaning"] = ("log teacher mass outside the ids (-inf: none)" if method == "topk" else
                              "teacher entropy H(p_t^T), nats")
    nbytes, tokens = sum(e["bytes"] for e in files), sum(e["rows"] for e in files) * S
    out = {"version": version, **({"layout": spec} if spec else {}), "record": record,
           "bytes_per_token": round(nbytes / max(1, tokens), 4), "files": files, "tokens": tokens, "bytes": nbytes}
    return out


def write_cache(cache_dir, index, batches):
    """A one-shard cache from rows already encoded (benches; the builder is data_prep/teacher_cache.py): index holds
    method, k, seq_len, kd_vocab, temperature, doc_mask, version and (compact) layout; batches yields (ids [b, S, K],
    vals [b, S, K], rest [b, S]) numpy arrays. Returns its CacheReader."""
    layout = layout_of(index)
    f = cache_layout.ShardFile(os.path.join(cache_dir, shard_path(0)), layout)
    for ids, vals, rest in batches:
        f.write(*layout.pack(ids, vals, rest))
    rows = f.rows
    nbytes, sha = f.close()
    files = [{"path": shard_path(0), "first_row": 0, "rows": rows, "bytes": nbytes, "sha256": sha}]
    atomic.write_json(os.path.join(cache_dir, "index.json"), {
        "format": FORMAT, "rows": rows, **index,
        **storage_entries(index["version"], index.get("layout"), index["method"], index["seq_len"], index["k"], files)})
    return CacheReader(cache_dir)


# ---------------------------------------------------------------------------- encoders (generator and tests)
def encode_topk(logp, k):
    """logp [C, V] fp32 log-probs at temperature T -> (ids int32 [C, k], vals fp32 [C, k] descending, rest fp32 [C]):
    rest = log of the mass outside the k ids, a logsumexp over the others (exact even when the top k hold ~all of
    it), -inf when k = V."""
    vals, ids = logp.topk(k, dim=-1)
    if k < logp.shape[-1]:
        rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    else:
        rest = torch.full(logp.shape[:1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return ids.int(), vals.float(), rest.float()


def row_uniforms(seed, row, seq_len, k):
    """float64 [seq_len, k] uniforms in [0, 1) of one global row: numpy PCG64 seeded by (seed, row), so the draws of
    a row are the same whatever the world size, batch or chunking."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(row)])))
    return torch.from_numpy(rng.random((seq_len, k)))


def encode_sampled(logp, u):
    """logp [C, V] log-probs at T, u [C, K] float64 uniforms -> (ids int32 [C, K], weights fp32 [C, K], entropy fp32
    [C]). K i.i.d. draws from p = exp(logp) by inverse CDF (float64 cumsum, the uniforms scaled by its total so the
    draw is from p exactly as normalised here); distinct ids first, ascending, weight count / K; unused slots repeat
    the first id with weight 0. E[sum_k w_k f(id_k)] = E_p[f]."""
    p = logp.float().exp()
    cdf = p.double().cumsum(-1)                                                      # [C, V] float64
    u = u.to(cdf.device, torch.float64) * cdf[:, -1:]
    # right=True: a uniform never lands on a token whose cdf step is empty (zero probability)
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=logp.shape[-1] - 1)   # [C, K]
    s, _ = draws.sort(-1)
    ids, w = merge_sorted_draws(s)
    entropy = -(p * logp.float()).nan_to_num(0.0).sum(-1)
    return ids.int(), w, entropy.float()


# ---------------------------------------------------------------------------- reader
def read_cache_index(cache_dir):
    path = os.path.join(cache_dir, "index.json")
    if not os.path.isfile(path):
        hint = (" (a build is in progress or was killed: rerun the same data_prep.teacher_cache command)"
                if os.path.isdir(os.path.join(cache_dir, "progress")) else "")
        raise DataError(f"no teacher cache at {cache_dir!r} (missing index.json){hint}; build it with "
                        f"`python -m data_prep.teacher_cache --teacher <dir> --data <dir> --out {cache_dir} ...`")
    return shards.read_versioned(path, FORMAT, VERSIONS, "the cache", "data_prep.teacher_cache")


class CacheReader:
    """Random access to a teacher cache, aligned with distillery.shards.TokenRows rows (same global row indices, as
    distillery.sampler.GlobalOrder returns them). Either layout (index.json's version; distillery/cache_layout.py):
    take() hands the loss the same tensors. Reading rows touches only their bytes (and, compact, their two entries
    of the shard's offset table): shards are memory-mapped.

        reader = CacheReader(cfg.teacher_cache)
        reader.check(cfg.data, cfg.temperature, cfg.doc_mask)                 # one-line DataError / ConfigError
        ids, vals, rest = reader.take(row_indices)                            # [n, S, K] int64, [n, S, K], [n, S]
    """

    def __init__(self, cache_dir, verify=False):
        self.dir = cache_dir
        self.notes = []            # one-line remarks from check() the trainer prints (rank 0)
        self.index = ix = read_cache_index(cache_dir)
        self.method, self.k, self.temperature = ix["method"], int(ix["k"]), float(ix["temperature"])
        self.seq_len, self.kd_vocab, self.doc_mask = int(ix["seq_len"]), int(ix["kd_vocab"]), bool(ix["doc_mask"])
        self.layout = layout_of(ix)
        self.maps, self.offsets, starts = [], [], [0]
        for e in ix["files"]:
            path = os.path.join(cache_dir, e["path"])
            if not os.path.isfile(path):
                raise DataError(f"teacher cache shard {path} is missing; rerun data_prep.teacher_cache with the same "
                                f"arguments to rebuild it")
            rows = int(e["rows"])
            if not self.layout.table and int(e["bytes"]) != rows * self.layout.row_bytes:
                raise DataError(f"teacher cache index {cache_dir}/index.json says shard {e['path']} holds "
                                f"{e['bytes']} bytes for {rows} rows of {self.layout.row_bytes} (corrupt index); "
                                f"rebuild the cache")
            if verify and shards.sha256_file(path) != e["sha256"]:
                raise DataError(f"teacher cache shard {path} fails its checksum (corrupt); delete it and rerun "
                                f"data_prep.teacher_cache")
            if int(e["first_row"]) != starts[-1]:
                raise DataError(f"teacher cache {cache_dir}: shard {e['path']} starts at row {e['first_row']}, "
                                f"expected {starts[-1]}; rebuild the cache")
            mm, offs = cache_layout.open_shard(path, rows, int(e["bytes"]), self.layout)
            self.maps.append(mm)
            self.offsets.append(offs)
            starts.append(starts[-1] + rows)
        self.starts = np.asarray(starts, dtype=np.int64)
        if self.starts[-1] != int(ix["rows"]):
            raise DataError(f"teacher cache {cache_dir} holds {self.starts[-1]} rows, index says {ix['rows']}; "
                            f"rebuild the cache")

    def __len__(self):
        return int(self.starts[-1])

    def verify(self):
        """sha256 of every shard against the index (a full read)."""
        for e in self.index["files"]:
            if shards.sha256_file(os.path.join(self.dir, e["path"])) != e["sha256"]:
                raise DataError(f"teacher cache shard {os.path.join(self.dir, e['path'])} fails its checksum "
                                f"(corrupt); delete it and rerun data_prep.teacher_cache")

    def check(self, data_dir, temperature, doc_mask, k_needed=None, method=None, teacher=None, mode=None):
        """Refuse, in one line, a cache that was not made for this run: other training rows (tokenizer, row length,
        shard checksums), another temperature or document masking, fewer entries than `k_needed`, another `method`
        ('topk' | 'sampled'), a top-k `mode` (tail, support) for a sampled cache, which has one estimator, or, when
        `teacher` (a directory) is given, another teacher (config, then weights: check_teacher)."""
        ix, where = self.index, f"teacher cache {self.dir!r}"
        fix = "rebuild it with data_prep.teacher_cache for this run, or point teacher_cache= at the matching one"
        want = data_identity(data_dir)
        have = ix["data"]
        if have["vocab_hash"] != want["vocab_hash"]:
            raise DataError(f"{where} was made for tokenizer {have['tokenizer']!r} (vocab hash "
                            f"{have['vocab_hash'][:12]}), data {data_dir!r} uses {want['tokenizer']!r} "
                            f"({want['vocab_hash'][:12]}); {fix}")
        if have["seq_len"] != want["seq_len"] or have["rows"] != want["rows"]:
            raise DataError(f"{where} holds {have['rows']} rows of {have['seq_len']} tokens, data {data_dir!r} has "
                            f"{want['rows']} rows of {want['seq_len']}; {fix}")
        if have["shards_digest"] != want["shards_digest"]:
            raise DataError(f"{where} was made from other training shards than {data_dir!r} (shard checksums "
                            f"differ: another or rebuilt data set); {fix}")
        if not math.isclose(float(temperature), self.temperature, rel_tol=0, abs_tol=1e-12):
            raise ConfigError(f"{where} holds the teacher at temperature {self.temperature:g}, the run uses "
                              f"temperature={float(temperature):g}; set temperature={self.temperature:g} or {fix}")
        if bool(doc_mask) != self.doc_mask:
            raise ConfigError(f"{where} was made with doc_mask={str(self.doc_mask).lower()}, the run uses "
                              f"doc_mask={str(bool(doc_mask)).lower()} (the teacher must see the student's "
                              f"positions); set doc_mask={str(self.doc_mask).lower()} or {fix}")
        if method is not None and method != self.method:
            raise ConfigError(f"{where} holds {self.method} targets, the run asks for {method}; {fix}")
        if mode in ("tail", "support") and self.method == "sampled":
            raise ConfigError(f"{where} holds sampled targets, which have one (unbiased) estimator; "
                              f"teacher_cache_mode={mode} is for top-k caches: drop it")
        if k_needed is not None:
            k_needed = int(k_needed)
            if k_needed > self.k:
                raise ConfigError(f"{where} holds k={self.k} entries per token, the run needs {k_needed}; lower "
                                  f"the run's k or {fix}")
            if k_needed < self.k and self.method != "topk":
                raise ConfigError(f"{where} holds {self.k} sampled draws; a sample cannot be cut to "
                                  f"{k_needed} (only top-k caches can): use k={self.k} or {fix}")
        if teacher is not None:
            self.check_teacher(teacher)
        return self

    def check_teacher(self, teacher):
        """Refuse, in one line, a teacher directory that did not make this cache: another config.json (checked
        first, cheap), or the same architecture with other weights (content hash). A cache from before weight
        hashes can only be checked on the config: that is said in self.notes."""
        have, where = self.index["teacher"], f"teacher cache {self.dir!r}"
        fix = "give the teacher that made it (or leave teacher= at its default), or rebuild the cache"
        if _teacher_config(teacher)[1] != have["config_sha256"]:
            raise ConfigError(f"{where} was made by teacher {have['path']!r}, whose config differs from "
                              f"{teacher!r}; {fix}")
        if not have.get("weights_sha256"):
            self.notes.append(f"{where} predates weight hashes: teacher={teacher} was checked on its config only "
                              f"(same architecture); rebuild the cache to check the weights too")
            return
        from distillery.models import weights_sha256
        mine = weights_sha256(teacher)
        if mine != have["weights_sha256"]:
            raise ConfigError(f"{where} was made by teacher {have['path']!r} (weights sha256 "
                              f"{have['weights_sha256'][:12]}); teacher={teacher!r} has the same config but other "
                              f"weights ({mine[:12]}); {fix}")

    @property
    def teacher_config(self):
        """The config.json (dict) of the teacher that made the cache, for FLOP accounting: stored in the index,
        else (a cache from before that) read from the teacher directory the index names, if it is here."""
        t = self.index["teacher"]
        if isinstance(t.get("config"), dict):
            return t["config"]
        fn = os.path.join(t["path"], "config.json")
        if os.path.isfile(fn):
            with open(fn) as f:
                return json.load(f)
        raise ConfigError(f"teacher cache {self.dir!r} predates stored teacher configs and its teacher "
                          f"{t['path']!r} is not here, so the FLOPs of its forward are unknown; rebuild the cache")

    def row_bytes(self, rows):
        """The stored bytes of the given global row indices, back to back (+ cache_layout.PAD zeros), and each row's
        [start, end) in them. Only those rows' bytes (and their offset-table entries) are read."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        files = np.searchsorted(self.starts, idx, side="right") - 1
        local = idx - self.starts[files]
        lo, hi = np.empty(idx.size, np.int64), np.empty(idx.size, np.int64)
        for f in np.unique(files).tolist():
            sel = files == f
            if self.layout.table:
                lo[sel], hi[sel] = self.offsets[f][local[sel]], self.offsets[f][local[sel] + 1]
            else:
                lo[sel] = local[sel] * self.layout.row_bytes
                hi[sel] = lo[sel] + self.layout.row_bytes
        lens = hi - lo
        ends = np.cumsum(lens)
        starts = ends - lens
        buf = np.empty(int(ends[-1] if idx.size else 0) + cache_layout.PAD, dtype=np.uint8)
        buf[buf.size - cache_layout.PAD:] = 0
        for f, a, b, s in zip(files.tolist(), lo.tolist(), hi.tolist(), starts.tolist()):
            if b < a or b > self.maps[f].size:
                raise DataError(f"teacher cache {self.dir}: the row table of {self.index['files'][f]['path']} "
                                f"points outside the shard (corrupt); delete it and rerun data_prep.teacher_cache")
            buf[s:s + b - a] = self.maps[f][a:b]
        return buf, starts, ends

    def take(self, rows, k=None):
        """(ids int64 [n, S, K], vals float32 [n, S, K], rest float32 [n, S]) of the given global row indices.
        vals/rest mean what the module docstring says for the cache's method. `k` < K (top-k only) keeps the k most
        likely entries and folds the others into rest, which is exactly the top-k cache of that k."""
        buf, starts, ends = self.row_bytes(rows)
        ids, vals, rest = self.layout.unpack(buf, starts, ends)
        if k is not None and int(k) != self.k:
            k = int(k)
            if self.method != "topk" or not 1 <= k <= self.k:
                raise ConfigError(f"teacher cache {self.dir!r}: cannot take k={k} from a {self.method} cache of "
                                  f"k={self.k} (top-k caches can give any k <= {self.k})")
            rest = torch.logaddexp(rest.double(), vals[..., k:].double().logsumexp(-1)).float()
            ids, vals = ids[..., :k].contiguous(), vals[..., :k].contiguous()
        return ids, vals, rest


def open_cache(cfg, say=True):
    """The run's teacher cache (cfg.teacher_cache), checked against the run (data, tokenizer, temperature, doc_mask,
    k, mode) before any work. A teacher= given (not the default) that exists here must be the cache's teacher, by
    config and weights (check_teacher); one that does not exist here is not needed (the point of a cache). The
    default teacher= is no claim (it exists on any machine that ran the offline study): the run records the cache's
    own teacher in cfg.teacher, so config.yaml, the report and compute_match name what made its targets. `say`:
    print check()'s notes (rank 0)."""
    from distillery.config import Config
    if cfg.divergence != "forward_kl":
        raise ConfigError(f"teacher_cache distills with the cache's sparse forward KL (teacher_cache_mode="
                          f"{cfg.teacher_cache_mode}); divergence={cfg.divergence} needs the live teacher: drop "
                          f"teacher_cache")
    given = cfg.teacher not in ("", Config.teacher)  # teacher= empty or the default: no claim
    cache = CacheReader(cfg.teacher_cache).check(cfg.data, cfg.temperature, cfg.doc_mask,
                                                 k_needed=cfg.teacher_cache_k or None, mode=cfg.teacher_cache_mode,
                                                 teacher=cfg.teacher if given and os.path.isdir(cfg.teacher) else None)
    if not given:
        cfg.teacher = cache.index["teacher"]["path"]
    for n in cache.notes if say else ():
        print(f"note: {n}")
    return cache
