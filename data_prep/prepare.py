"""Corpus -> tokenizer -> packed, memory-mapped token shards (format: distillery/shards.py). One command:

    python -m data_prep.prepare --source fineweb-edu --tokenizer meta-llama/Llama-3.1-8B \
        --seq_len 8192 --max_tokens 50e9 --out data/fineweb-edu
    python -m data_prep.prepare --source 'files:corpus/*.jsonl,weight=3' --source offline,weight=1 \
        --tokenizer bpe:4096 --seq_len 256 --max_tokens 2e6 --out data/mix

Pipeline: the main process streams documents in source order and cuts them into ~256 KiB chunks; worker
processes encode each document on its own (+ EOS) and decide held-out by a hash of its text; the main process
takes the results back in submission order, so output bytes do not depend on the number of workers. Training
documents are packed into rows of seq_len tokens, written as shards of --rows_per_shard rows (temp name, then
rename); held-out documents go to a 'heldout' token stream.

Mixture: with --max_tokens, source i gets w_i / sum(w) of the training-token budget (a source that runs dry
leaves a shortfall, recorded in the index); sources are consumed one after another and the trainer's seeded
permutation mixes rows, so interleaving here would buy nothing. Without --max_tokens every source is read whole.

Resume: after each chunk that completed a shard, progress.json records the shards so far, the source cursor
(raw row position) and the packing carry (carry-N.bin); a rerun with the same arguments checks the finished
shards, skips the consumed rows without tokenising them and continues, so a killed-and-rerun build is
byte-identical to an uninterrupted one. index.json is written last: no index, no data set.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque

import numpy as np

from data_prep import encode, sources as sourcelib
from distillery import atomic, shards
from distillery.errors import cli

BPE_EOS = "<|endoftext|>"


# ---------------------------------------------------------------- tokenizers

def train_bpe(texts, vocab_size):
    """Byte-level BPE (GPT-2 style pre-tokenisation, all 256 byte symbols, EOS as the only special token):
    any text round-trips exactly, so it stands in for the Llama-3 tokenizer in offline work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_bpe(tok):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BPE_EOS, bos_token=BPE_EOS, unk_token=None)


def bpe_training_texts(srcs, heldout_frac, max_bytes):
    """The first max_bytes of training-side text (held-out documents excluded, so the tokenizer never sees
    them), split between sources by weight."""
    total_w = sum(s.weight for s in srcs)
    for s in srcs:
        budget, used = max_bytes * s.weight / total_w, 0
        for _, t in sourcelib.texts(s):
            if used >= budget:
                break
            if not encode.heldout_by_hash(t, heldout_frac):
                used += len(t)
                yield t


def _generic_class(path):
    cfg = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return True
    with open(cfg) as f:
        cls = json.load(f).get("tokenizer_class")
    return cls in (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(spec, srcs=(), heldout_frac=0.0, bpe_train_mb=64, name=None):
    """-> (transformers fast tokenizer, name). spec: a hub id or local path, or bpe:VOCAB to train one here."""
    if spec.startswith("bpe:"):
        vocab = int(spec.split(":", 1)[1])
        tok = train_bpe(bpe_training_texts(list(srcs), heldout_frac, bpe_train_mb * 2 ** 20), vocab)
        if name is None:
            key = json.dumps([[s.spec, s.weight] for s in srcs] + [heldout_frac, bpe_train_mb]).encode()
            name = f"bpe-{vocab}-{hashlib.sha256(key).hexdigest()[:8]}"
        return wrap_bpe(tok), name
    try:
        if os.path.isfile(os.path.join(spec, "tokenizer.json")) and _generic_class(spec):
            # a local generic fast tokenizer (Llama-3's is one): this class loads it without AutoTokenizer's
            # import of torch (~5 s); model-specific classes go through AutoTokenizer, which may rebuild them
            from transformers import PreTrainedTokenizerFast
            hf = PreTrainedTokenizerFast.from_pretrained(spec)
        else:
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise shards.DataError(f"cannot load tokenizer {spec!r} ({str(e).splitlines()[0]}); give a hub id, a "
                               f"local tokenizer directory, or bpe:VOCAB") from None
    if not getattr(hf, "is_fast", False):
        raise shards.DataError(f"tokenizer {spec!r} has no fast (Rust) version; convert it with "
                               f"transformers or use another")
    if hf.eos_token_id is None:
        raise shards.DataError(f"tokenizer {spec!r} defines no EOS token, which separates documents; pick a "
                               f"tokenizer with one")
    return hf, name or spec


# ---------------------------------------------------------------- pipeline

class Encoder:
    """Ordered parallel encoding with bounded look-ahead (Pool.imap would read the whole source ahead)."""

    def __init__(self, hf, eos_id, dtype, heldout_frac, workers):
        args = (hf.backend_tokenizer.to_str(), eos_id, dtype, heldout_frac)
        self.workers = workers
        if workers > 0:
            self.pool = mp.get_context("spawn").Pool(workers, initializer=encode.init, initargs=args)
        else:
            self.pool = None
            encode.init(*args)

    def map(self, chunks):
        """chunks: iterable of (payload, texts) -> yields (payload, (tokens, lens, heldout)) in order."""
        if self.pool is None:
            for payload, texts in chunks:
                yield payload, encode.encode_chunk(texts)
            return
        pending = deque()
        it = iter(chunks)
        for payload, texts in it:
            pending.append((payload, self.pool.apply_async(encode.encode_chunk, (texts,))))
            if len(pending) >= 2 * self.workers + 1:
                p, r = pending.popleft()
                yield p, r.get()
        while pending:
            p, r = pending.popleft()
            yield p, r.get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def chunked(doc_iter, chunk_bytes, max_docs=4096):
    """(positions, texts) chunks of about chunk_bytes of text; boundaries never change the output bytes."""
    pos, texts, size = [], [], 0
    for p, t in doc_iter:
        pos.append(p)
        texts.append(t)
        size += len(t)
        if size >= chunk_bytes or len(texts) >= max_docs:
            yield np.asarray(pos, dtype=np.int64), texts
            pos, texts, size = [], [], 0
    if texts:
        yield np.asarray(pos, dtype=np.int64), texts


def quotas(srcs, max_tokens):
    if max_tokens is None:
        if len({s.weight for s in srcs}) > 1:
            raise shards.DataError("mixture weights need a token budget; add --max_tokens")
        return [None] * len(srcs)
    total_w = sum(s.weight for s in srcs)
    q = [int(max_tokens * s.weight / total_w) for s in srcs]
    q[-1] = int(max_tokens) - sum(q[:-1])
    return q


class Build:
    """One output directory's state: committed shards, packing carry, cursors. Persisted in progress.json."""

    def __init__(self, out, fingerprint, dtype, seq_len, rows_per_shard, n_sources):
        self.out, self.fp, self.dtype = out, fingerprint, np.dtype(dtype)
        self.seq_len, self.shard_tokens = seq_len, rows_per_shard * seq_len
        self.state = {"fingerprint": fingerprint, "train_files": [], "heldout_files": [], "source": 0,
                      "pos": 0, "taken": [0] * n_sources, "docs": [0] * n_sources, "heldout_docs": 0,
                      "heldout_tokens": 0, "carry": None, "commits": 0}
        self.buf, self.nbuf = [], 0
        self.held, self.nheld = [], 0

    @property
    def progress_path(self):
        return os.path.join(self.out, "progress.json")

    def resume(self):
        """Load progress.json if a killed run left one; check its shards. Returns True when resumed."""
        if not os.path.isfile(self.progress_path):
            return False
        with open(self.progress_path) as f:
            st = json.load(f)
        if st.get("fingerprint") != self.fp:
            raise shards.DataError(f"{self.out} holds a partial build with other arguments; rerun with the same "
                                   f"arguments or delete {self.out}")
        files = st["train_files"] + st["heldout_files"]
        for i, e in enumerate(files):
            path = os.path.join(self.out, e["path"])
            if not os.path.isfile(path) or os.path.getsize(path) != e["tokens"] * self.dtype.itemsize:
                raise shards.DataError(f"partial build in {self.out}: shard {e['path']} is missing or resized; "
                                       f"delete {self.out} and rebuild")
        # size-check all, checksum the newest: a full re-hash of a 100 GB build on every resume would cost
        # minutes; the newest shard is the one a crash could have touched (the rest were renamed long ago)
        for e in st["train_files"][-1:]:
            if shards.sha256_file(os.path.join(self.out, e["path"])) != e["sha256"]:
                raise shards.DataError(f"partial build in {self.out}: shard {e['path']} fails its checksum; "
                                       f"delete {self.out} and rebuild")
        self.state = st
        if st["carry"]:
            carry = np.fromfile(os.path.join(self.out, st["carry"]), dtype=self.dtype)
            self.buf, self.nbuf = [carry], len(carry)
        return True

    def add(self, train_tokens, held_tokens):
        if len(train_tokens):
            self.buf.append(train_tokens)
            self.nbuf += len(train_tokens)
        if len(held_tokens):
            self.held.append(held_tokens)
            self.nheld += len(held_tokens)
        wrote = False
        while self.nbuf >= self.shard_tokens:
            flat = np.concatenate(self.buf)
            self._write_train(flat[:self.shard_tokens])
            rest = flat[self.shard_tokens:]
            self.buf, self.nbuf = ([rest] if len(rest) else []), len(rest)
            wrote = True
        return wrote

    def _write_train(self, tokens):
        rel = f"train/{len(self.state['train_files']):05d}.bin"
        self.state["train_files"].append({"path": rel, **shards.write_tokens(os.path.join(self.out, rel),
                                                                             tokens, self.dtype)})

    def _flush_heldout(self):
        if self.nheld:
            rel = f"heldout/{self.state['commits']:05d}.bin"
            self.state["heldout_files"].append(
                {"path": rel, **shards.write_tokens(os.path.join(self.out, rel), np.concatenate(self.held),
                                                    self.dtype)})
            self.state["heldout_tokens"] += self.nheld
            self.held, self.nheld = [], 0

    def commit(self):
        """Make the state durable: held-out part, carry file, then progress.json (the commit point)."""
        self._flush_heldout()
        old = self.state["carry"]
        self.state["commits"] += 1
        if self.nbuf:
            rel = f"carry-{self.state['commits']:05d}.bin"
            shards.write_tokens(os.path.join(self.out, rel), np.concatenate(self.buf), self.dtype)
            self.state["carry"] = rel
        else:
            self.state["carry"] = None
        shards.atomic_write_json(self.progress_path, self.state)
        if old and old != self.state["carry"]:
            os.remove(os.path.join(self.out, old))

    def finish(self, max_tokens):
        """Last full rows (within the budget) as a final shard; the tail shorter than a row is dropped."""
        written = sum(e["tokens"] for e in self.state["train_files"])
        flat = np.concatenate(self.buf) if self.buf else np.zeros(0, self.dtype)
        keep = len(flat) // self.seq_len * self.seq_len
        if max_tokens is not None:
            keep = min(keep, max(0, (int(max_tokens) - written) // self.seq_len * self.seq_len))
        if keep:
            self._write_train(flat[:keep])
        self._flush_heldout()
        return int(len(flat) - keep)


def fingerprint(srcs, tok_ident, seq_len, rows_per_shard, heldout_frac, max_tokens):
    return {"sources": [[s.spec, s.weight] for s in srcs], "tokenizer": tok_ident, "seq_len": seq_len,
            "rows_per_shard": rows_per_shard, "heldout_frac": heldout_frac,
            "max_tokens": None if max_tokens is None else int(max_tokens)}


def run(source_specs, tokenizer, out, seq_len=8192, max_tokens=None, heldout_frac=0.005, workers=None,
        rows_per_shard=None, chunk_mb=0.25, bpe_train_mb=64, tokenizer_name=None, extra_streams=None,
        source_meta=None, progress=True, stop_after_commits=None):
    """Build (or resume, or confirm) the data set in `out`. `tokenizer` is a spec string or an already built
    transformers fast tokenizer (then `tokenizer_name` names it). `extra_streams` {split: [texts]} adds
    evaluation streams (offline OOD sets). `stop_after_commits` simulates a kill (tests). Returns the index."""
    t0 = time.time()
    srcs = [sourcelib.parse(s) if isinstance(s, str) else s for s in source_specs]
    if not srcs:
        raise shards.DataError("no --source given; e.g. --source fineweb-edu or --source offline")
    if seq_len < 2:
        raise shards.DataError(f"--seq_len {seq_len} too short; rows need at least 2 tokens")
    workers = os.cpu_count() if workers is None else workers
    # ~64 MiB shards by default: few enough files for a 100 GB build, small enough that a crash loses little
    rows_per_shard = rows_per_shard or max(1, (32 * 2 ** 20) // seq_len)
    tok_dir = os.path.join(out, "tokenizer")
    if isinstance(tokenizer, str) and tokenizer.startswith("bpe:") and os.path.isfile(
            os.path.join(tok_dir, "tokenizer.json")) and os.path.isfile(os.path.join(out, "progress.json")):
        # resuming a bpe build: reuse the tokenizer trained by the killed run (training is deterministic, but
        # skipping it saves minutes)
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        with open(os.path.join(out, "progress.json")) as f:
            name = json.load(f)["fingerprint"]["tokenizer"]["name"]
    elif isinstance(tokenizer, str):
        hf, name = load_tokenizer(tokenizer, srcs, heldout_frac, bpe_train_mb, tokenizer_name)
    else:
        hf, name = tokenizer, tokenizer_name or getattr(tokenizer, "name_or_path", "tokenizer")
    vocab = hf.get_vocab()
    vocab_size = max(len(hf), max(vocab.values()) + 1)
    ident = {"name": name, "vocab_hash": shards.vocab_hash(vocab)}
    dtype = shards.dtype_for_vocab(vocab_size)
    eos_id = int(hf.eos_token_id)
    fp = fingerprint(srcs, ident, seq_len, rows_per_shard, heldout_frac, max_tokens)
    if extra_streams:
        fp["extra_streams"] = sorted(extra_streams)

    index_path = os.path.join(out, "index.json")
    if os.path.isfile(index_path):
        index = shards.read_index(out)
        if index.get("build") != fp:
            raise shards.DataError(f"{out} already holds a data set built with other arguments; delete it or "
                                   f"pick another --out")
        if progress:
            print(f"{out} already built; nothing to do (delete it to rebuild)", file=sys.stderr)
        return index

    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    os.makedirs(os.path.join(out, "heldout"), exist_ok=True)
    build = Build(out, fp, dtype, seq_len, rows_per_shard, len(srcs))
    resumed = build.resume()
    # a killed writer can leave its temp file (never a final name): drop those, they are rewritten
    import glob
    for stale in glob.glob(os.path.join(glob.escape(out), "**", "*.tmp-*"), recursive=True):
        if os.path.isfile(stale):
            os.remove(stale)
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")) or not resumed:
        with atomic.atomic_path(tok_dir) as tmp:
            hf.save_pretrained(tmp)
    if not resumed:
        shards.atomic_write_json(build.progress_path, build.state)  # claims the directory for these arguments
    st = build.state
    q = quotas(srcs, max_tokens)
    written_before = sum(e["tokens"] for e in st["train_files"]) + build.nbuf

    from tqdm import tqdm
    bar = tqdm(total=int(max_tokens) if max_tokens else None, initial=written_before, unit="tok",
               unit_scale=True, mininterval=1.0, smoothing=0.05, disable=not progress, desc=os.path.basename(out))
    enc = Encoder(hf, eos_id, dtype, heldout_frac, workers)
    exhausted = list(st.get("exhausted", [False] * len(srcs)))  # a source that ran dry before a resume
    try:
        for si in range(st["source"], len(srcs)):
            src, quota = srcs[si], q[si]
            if quota is not None and st["taken"][si] >= quota:
                continue
            skip = st["pos"] if si == st["source"] else 0
            st["source"], st["pos"] = si, skip
            done = False
            for positions, (tokens, lens, held) in enc.map(chunked(sourcelib.texts(src, skip),
                                                                   int(chunk_mb * 2 ** 20))):
                n = len(lens)
                if quota is not None:  # cut the chunk at the document that fills this source's quota
                    cum = np.cumsum(np.where(held, 0, lens))
                    need = quota - st["taken"][si]
                    if cum[-1] >= need:
                        n, done = int(np.searchsorted(cum, need, side="left")) + 1, True
                end = int(lens[:n].sum())
                tmask = np.repeat(~held[:n], lens[:n])
                train_tok, held_tok = tokens[:end][tmask], tokens[:end][~tmask]
                st["taken"][si] += len(train_tok)
                st["docs"][si] += int((~held[:n]).sum())
                st["heldout_docs"] += int(held[:n].sum())
                st["pos"] = int(positions[n - 1]) + 1
                if build.add(train_tok, held_tok):
                    build.commit()
                    if stop_after_commits and st["commits"] >= stop_after_commits:
                        raise KeyboardInterrupt("simulated kill")
                bar.update(len(train_tok))
                bar.set_postfix(docs=sum(st["docs"]), src=si, refresh=False)
                if done:
                    break
            exhausted[si] = not done
            st["source"], st["pos"], st["exhausted"] = si + 1, 0, exhausted
        tail = build.finish(max_tokens)
        extra = {}
        for name_, texts_ in (extra_streams or {}).items():
            arrs = [t for _, (t, _, _) in enc.map(((None, c) for _, c in chunked(enumerate(texts_), 2 ** 20)))]
            toks = np.concatenate(arrs) if arrs else np.zeros(0, dtype)
            os.makedirs(os.path.join(out, name_), exist_ok=True)
            rel = f"{name_}/00000.bin"
            extra[name_] = {"kind": "stream", "tokens": int(len(toks)), "documents": len(texts_),
                            "files": [{"path": rel, **shards.write_tokens(os.path.join(out, rel), toks, dtype)}]}
    finally:
        enc.close()
        bar.close()

    tf = st["train_files"]
    n_tok = sum(e["tokens"] for e in tf)
    splits = {"train": {"kind": "rows", "seq_len": seq_len, "rows": n_tok // seq_len, "tokens": n_tok,
                        "documents": sum(st["docs"]), "tail_tokens_dropped": tail, "files": tf},
              "heldout": {"kind": "stream", "tokens": sum(e["tokens"] for e in st["heldout_files"]),
                          "documents": st["heldout_docs"], "files": st["heldout_files"]}, **extra}
    index = {"format": shards.FORMAT, "version": shards.VERSION, "dtype": dtype, "vocab_size": vocab_size,
             "eos_id": eos_id, "tokenizer": ident,
             "source": source_meta or {"name": ",".join(s.spec for s in srcs)},
             "sources": [{"spec": s.spec, "weight": s.weight, "quota_tokens": q[i], "train_tokens": st["taken"][i],
                          "train_documents": st["docs"][i], "exhausted": exhausted[i]} for i, s in enumerate(srcs)],
             "heldout_frac": heldout_frac, "build": fp, "splits": splits}
    shards.atomic_write_json(index_path, index)
    if st["carry"]:
        os.remove(os.path.join(out, st["carry"]))
    os.remove(build.progress_path)
    if progress:
        dt = time.time() - t0
        print(f"built {out} in {dt:.1f}s: {n_tok:,} train tokens ({n_tok // seq_len:,} rows), "
              f"{splits['heldout']['tokens']:,} held-out tokens, vocab {vocab_size}", file=sys.stderr)
    warn_small_streams(index, out, seq_len)
    return index


def warn_small_streams(index, out, window, what="one window of seq_len"):
    """One `warning:` line (stderr) per evaluation stream of a built data set that is empty or shorter than
    `window` tokens: a run evaluating on it is refused at start (train.py check_data), so say it now, when the data
    is made, not after a training run was set up. Returns the names of those splits."""
    small = []
    for name, sp in index["splits"].items():
        if sp.get("kind") != "stream" or sp["tokens"] >= window:
            continue
        small.append(name)
        docs = f", {sp['documents']} documents" if "documents" in sp else ""
        if sp["tokens"] == 0:
            fix = ("build with more data or a larger --heldout_frac (held-out documents are picked by content hash)"
                   if name == "heldout" else "check its source")
            print(f"warning: split {name} of {out} is empty (0 tokens{docs}): a run cannot evaluate on it; {fix}, "
                  f"or evaluate on the other sets (eval_sets=)", file=sys.stderr)
        else:
            print(f"warning: split {name} of {out} has {sp['tokens']:,} tokens{docs}, fewer than {what} "
                  f"({window}): a run evaluating on it needs eval_window <= {sp['tokens']}", file=sys.stderr)
    return small


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=sourcelib.__doc__)
    ap.add_argument("--source", action="append", required=True, help="source spec (repeat for a mixture)")
    ap.add_argument("--tokenizer", required=True, help="hub id, local path, or bpe:VOCAB to train one here")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq_len", type=int, default=8192)
    ap.add_argument("--max_tokens", type=float, default=None, help="training-token budget (e.g. 50e9)")
    ap.add_argument("--heldout_frac", type=float, default=0.005)
    ap.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores; 0: "
                                                                 "in-process)")
    ap.add_argument("--rows_per_shard", type=int, default=None)
    ap.add_argument("--bpe_train_mb", type=float, default=64)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    run(a.source, a.tokenizer, a.out, a.seq_len, a.max_tokens, a.heldout_frac, a.workers, a.rows_per_shard,
        bpe_train_mb=a.bpe_train_mb, progress=not a.quiet)


if __name__ == "__main__":
    cli(main)
