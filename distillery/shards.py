"""Token shard format: fixed-length packed rows for training, flat token streams for evaluation sets.

A data directory looks like
    data/<name>/index.json          what is here (below); written last, atomically: no index, no data set
    data/<name>/tokenizer/          the tokenizer (Hugging Face format), so runs and exports can carry it
    data/<name>/<split>/00000.bin   raw little-endian uint16 (vocab <= 65536) or uint32 tokens

index.json:
    {"format": "distillery.shards", "version": 1, "dtype": "uint16", "vocab_size": 4096, "eos_id": 0,
     "tokenizer": {"name": "...", "vocab_hash": "<sha256 of the token->id map>"},
     "splits": {"train":   {"kind": "rows",   "seq_len": 256, "rows": R, "tokens": R*256, "documents": D,
                            "files": [{"path": "train/00000.bin", "tokens": n, "sha256": "..."}]},
                "heldout": {"kind": "stream", "tokens": n, "documents": D, "files": [...]}}}
"rows" splits are documents joined by EOS and cut into rows of seq_len tokens (what the trainer reads);
"stream" splits keep the raw token stream (what windowed perplexity reads). The JSON index can grow new keys
without breaking readers; `version` changes only when an old reader would misread the bytes.
"""
import hashlib
import json
import os

import numpy as np

from distillery import atomic
from distillery.errors import DataError  # noqa: F401  (raised here, imported from here by data_prep)

FORMAT, VERSION = "distillery.shards", 1




def dtype_for_vocab(vocab_size):
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def vocab_hash(tokenizer):
    """Identity of a tokenizer: sha256 of its sorted token -> id map (tokenizers.Tokenizer or HF tokenizer)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def atomic_write_json(path, obj):
    atomic.write_json(path, obj)


def sha256_file(path, bufsize=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def write_tokens(path, tokens, dtype):
    """Write one shard file under a temporary name, then rename: a killed writer never leaves a file that looks
    complete. Returns its index entry (without 'path')."""
    arr = np.ascontiguousarray(tokens, dtype=dtype)
    atomic.write_bytes(path, arr.tobytes())
    return {"tokens": int(arr.size), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}


def read_index(data_dir):
    path = os.path.join(data_dir, "index.json")
    if not os.path.isfile(path):
        raise DataError(f"no data set at {data_dir!r} (missing index.json); build it with "
                        f"`python -m data_prep.offline --out {data_dir}` or `python -m data_prep.prepare ... --out {data_dir}`")
    return read_versioned(path, FORMAT, VERSION, "the data set", "data_prep")


def read_versioned(path, fmt, version, what, tool):
    """An existing index.json of format `fmt` v`version`, or a one-line DataError naming `tool` to rebuild `what`
    with: corrupt JSON, or another format or version (`version`: one int, or a tuple of the versions read). (Data sets
    here; teacher caches in teacher_cache.py.)"""
    try:
        with open(path) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"corrupt {path}: {e}; rebuild {what} with {tool}") from None
    versions = version if isinstance(version, tuple) else (version,)
    if index.get("format") != fmt or index.get("version") not in versions:
        raise DataError(f"{path} is not a {fmt} v{'/v'.join(map(str, versions))} index (got {index.get('format')} "
                        f"v{index.get('version')}); rebuild it with this version of {tool}")
    return index


def _open_files(data_dir, index, split, verify):
    if split not in index["splits"]:
        raise DataError(f"data set {data_dir!r} has no split {split!r} (it has: {', '.join(index['splits'])}); "
                        f"rebuild it with data_prep or pick another set")
    dtype = np.dtype(index["dtype"])
    maps = []
    for entry in index["splits"][split]["files"]:
        path = os.path.join(data_dir, entry["path"])
        if not os.path.isfile(path):
            raise DataError(f"shard {path} is missing; rebuild the data set with data_prep")
        size = os.path.getsize(path)
        if size != entry["tokens"] * dtype.itemsize:
            raise DataError(f"shard {path} has {size} bytes, index says {entry['tokens'] * dtype.itemsize} "
                            f"(truncated or replaced); rebuild the data set with data_prep")
        if verify and sha256_file(path) != entry["sha256"]:
            raise DataError(f"shard {path} fails its checksum (corrupt); rebuild the data set with data_prep")
        maps.append(np.memmap(path, dtype=dtype, mode="r") if entry["tokens"] else np.zeros(0, dtype))
    return maps


class TokenRows:
    """Random access to the packed rows of a 'rows' split: rows[i] -> np.ndarray [seq_len]. Memory-mapped."""

    def __init__(self, data_dir, split="train", verify=False):
        self.index = read_index(data_dir)
        meta = self.index["splits"].get(split, {})
        if meta and meta.get("kind") != "rows":
            raise DataError(f"split {split!r} of {data_dir!r} is a token stream, not packed rows")
        self.maps = _open_files(data_dir, self.index, split, verify)
        self.seq_len = meta["seq_len"]
        self.vocab_size = self.index["vocab_size"]
        for m, e in zip(self.maps, meta["files"]):
            if e["tokens"] % self.seq_len:
                raise DataError(f"shard {e['path']} holds {e['tokens']} tokens, not a multiple of seq_len "
                                f"{self.seq_len}; rebuild the data set with data_prep")
        self.rows_per_file = np.array([m.size // self.seq_len for m in self.maps], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.rows_per_file)])
        if self.starts[-1] == 0:
            raise DataError(f"split {split!r} of {data_dir!r} has no rows; give data_prep more text or a "
                            f"shorter --seq_len")

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        f = int(np.searchsorted(self.starts, i, side="right") - 1)
        r = i - int(self.starts[f])
        return self.maps[f][r * self.seq_len:(r + 1) * self.seq_len]

    def take(self, indices):
        """[len(indices), seq_len] int64 array of the given global row indices (one searchsorted for the batch,
        then one memmap slice per row: a batch of 8 rows costs tens of microseconds plus page faults)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        files = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((idx.size, self.seq_len), dtype=np.int64)
        L = self.seq_len
        for j, (f, i) in enumerate(zip(files.tolist(), idx.tolist())):
            r = i - int(self.starts[f])
            out[j] = self.maps[f][r * L:(r + 1) * L]
        return out


def load_stream(data_dir, split, verify=False):
    """The whole token stream of a 'stream' split as one 1-D array (memory-mapped when a single file)."""
    index = read_index(data_dir)
    maps = _open_files(data_dir, index, split, verify)
    if not maps:  # e.g. a held-out split that drew no documents
        return np.zeros(0, dtype=index["dtype"])
    return maps[0] if len(maps) == 1 else np.concatenate(maps)


def check_eval_windows(data_dir, index, names, window, knob="eval_window"):
    """Before any step: every named stream split holds at least one evaluation window of `window` tokens (a window
    scores window - 1 targets; eval/ppl.py make_windows). Otherwise a one-line DataError naming the short sets, so a
    run does not train to its end and fail in the final evaluation. `knob` names the setting to lower."""
    short = [f"{n} ({index['splits'][n]['tokens']} tokens)" for n in names
             if n in index["splits"] and index["splits"][n]["tokens"] < window]
    if short:
        raise DataError(f"eval set(s) {', '.join(short)} in {data_dir}: shorter than one window of {knob}={window}; "
                        f"evaluation would fail (after training): lower {knob}, evaluate other sets (eval_sets=), "
                        f"or build more data with data_prep")


def verify_all(data_dir):
    """Check every shard's size, checksum and token ids (< vocab_size); raises DataError on the first bad one."""
    index = read_index(data_dir)
    for split in index["splits"]:
        _open_files(data_dir, index, split, verify=False)  # presence and sizes first: the cheap, common faults
        for entry in index["splits"][split]["files"]:
            _check_file(data_dir, index, entry, checksum=True, vocab_size=index["vocab_size"])
    return index


# ---------------------------------------------------------------------------- start-of-run checks
def _max_id_error(path, mx, vocab_size):
    return DataError(f"shard {path} holds token id {mx} >= vocab_size {vocab_size} (another tokenizer or corrupt "
                     f"data); rebuild the data set with data_prep")


def _check_file(data_dir, index, entry, checksum=True, vocab_size=None, bufsize=1 << 22):
    """One pass over one shard: sha256 against the index and/or the largest token id. Returns its bytes."""
    path = os.path.join(data_dir, entry["path"])
    dtype = np.dtype(index["dtype"])
    want = entry["tokens"] * dtype.itemsize
    if not os.path.isfile(path):
        raise DataError(f"shard {path} is missing; rebuild the data set with data_prep")
    size = os.path.getsize(path)
    if size != want:
        raise DataError(f"shard {path} has {size} bytes, index says {want} (truncated or replaced); rebuild the "
                        f"data set with data_prep")
    if not size:
        return 0
    if not checksum:  # ids only: one vectorised max over the memory map
        mx = int(np.memmap(path, dtype=dtype, mode="r").max())
        if vocab_size is not None and mx >= vocab_size:
            raise _max_id_error(path, mx, vocab_size)
        return size
    h, mx = hashlib.sha256(), 0
    bufsize -= bufsize % dtype.itemsize
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
            if vocab_size is not None:
                mx = max(mx, int(np.frombuffer(chunk, dtype=dtype).max()))
    if h.hexdigest() != entry["sha256"]:
        raise DataError(f"shard {path} fails its checksum (corrupt: changed or zeroed bytes); rebuild the data set "
                        f"with data_prep")
    if vocab_size is not None and mx >= vocab_size:
        raise _max_id_error(path, mx, vocab_size)
    return size


def _run_checks(data_dir, split, checksum, vocab_size, distributed, workers):
    index = read_index(data_dir)
    splits = list(index["splits"]) if split is None else [split]
    for s in splits:
        if s not in index["splits"]:
            raise DataError(f"data set {data_dir!r} has no split {s!r} (it has: {', '.join(index['splits'])}); "
                            f"rebuild it with data_prep or pick another set")
    entries = [e for s in splits for e in index["splits"][s]["files"]]
    vocab = index["vocab_size"] if vocab_size is None else vocab_size
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    mine = entries[rank::world]  # every rank reads a share of the files
    err, nbytes = None, 0
    try:
        from concurrent.futures import ThreadPoolExecutor  # hashlib and numpy release the GIL on large buffers
        with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as ex:
            nbytes = sum(ex.map(lambda e: _check_file(data_dir, index, e, checksum, vocab), mine))
    except DataError as e:
        err = str(e)
    if world > 1:  # the first problem found by any rank is raised on every rank (rank 0 prints it)
        import torch.distributed as dist
        found = [None] * world
        dist.all_gather_object(found, (err, nbytes))
        err = next((e for e, _ in found if e), None)
        nbytes = sum(n for _, n in found)
    if err:
        raise DataError(err)
    return nbytes


def verify_split(data_dir, split="train", vocab_size=None, distributed=True, workers=None):
    """Before the first step: every shard of `split` (None: every split) has the size and sha256 its index records,
    and no token id >= vocab_size (default: the index's; checked in the same read). With a process group up, every
    rank reads its share of the files and the first problem is raised on every rank, so call it on every rank (or
    with distributed=False on one). One-line DataError naming the file and the fix. Returns the bytes read (all
    ranks). Cost: a full read of the split (docs/reliability.md)."""
    return _run_checks(data_dir, split, True, vocab_size, distributed, workers)


def check_token_ids(data_dir, split=None, vocab_size=None, distributed=True, workers=None):
    """Every shard of `split` (None: every split) holds only token ids < vocab_size (default: the index's; pass the
    model's embedding rows to check against the model): a vectorised max over each memory-mapped file, no hashing.
    Same rank sharing and errors as verify_split. Returns the bytes read (all ranks)."""
    return _run_checks(data_dir, split, False, vocab_size, distributed, workers)


def tokenizer_identity(tokenizer):
    """{"name", "vocab_hash", "vocab_size"} of a tokenizer given as a directory or tokenizer.json path, a Hugging
    Face hub id, a transformers tokenizer, a tokenizers.Tokenizer, or an identity dict (returned as is)."""
    if isinstance(tokenizer, dict):
        return tokenizer
    name = ref = None
    if isinstance(tokenizer, (str, os.PathLike)):
        name = ref = str(tokenizer)  # ref: what to pass to --tokenizer to rebuild with it
        path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
        if os.path.isfile(path) and path.endswith(".json"):
            from tokenizers import Tokenizer  # the fast path: no transformers import, no hub
            tokenizer = Tokenizer.from_file(path)
            # a data set's own tokenizer dir carries its recorded name in the index one level up
            parent_index = os.path.join(os.path.dirname(os.path.abspath(path)), "..", "index.json")
            if os.path.isfile(parent_index):
                with open(parent_index) as f:
                    name = json.load(f).get("tokenizer", {}).get("name", name)
        else:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(name)
    if name is None:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    vocab = tokenizer.get_vocab()
    return {"name": name, "vocab_hash": vocab_hash(vocab), "vocab_size": len(vocab), "ref": ref or name}


def check_tokenizer(index, tokenizer, who="student", data_dir=None, model_vocab_size=None):
    """Refuse a data set whose tokens were made by another tokenizer than `who`'s (student or teacher).

    Identity is the sha256 of the token -> id map, not the name: the same vocabulary under two names passes,
    the same name with a different vocabulary fails. `model_vocab_size` (the embedding rows) may exceed the
    tokenizer's vocabulary (padded embeddings, e.g. 128256 rounded up) but not fall short of the ids in the data.
    `index` may be a loaded index dict or a data directory. Returns the tokenizer identity."""
    if isinstance(index, (str, os.PathLike)):
        data_dir, index = str(index), read_index(index)
    where = f" {data_dir!r}" if data_dir else ""
    ident = tokenizer_identity(tokenizer)
    want = index["tokenizer"]
    if ident["vocab_hash"] != want["vocab_hash"]:
        raise DataError(f"{who} tokenizer {ident['name']!r} (vocab hash {ident['vocab_hash'][:12]}, "
                        f"{ident['vocab_size']} tokens) does not match data set{where} made with "
                        f"{want['name']!r} (vocab hash {want['vocab_hash'][:12]}, {index['vocab_size']} tokens); "
                        f"use a {who} with that tokenizer or rebuild the data with --tokenizer "
                        f"{ident.get('ref', ident['name'])}")
    if model_vocab_size is not None and model_vocab_size < index["vocab_size"]:
        raise DataError(f"{who} model has {model_vocab_size} embedding rows but data set{where} has "
                        f"{index['vocab_size']} token ids; set the {who}'s vocab_size >= {index['vocab_size']}")
    return ident
