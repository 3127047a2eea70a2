"""The offline default corpus: real text every fresh machine has, no network.

    python -m data_prep.offline --out data/offline [--vocab_size 4096] [--seq_len 256]

Sources (all from this Python installation, so the corpus is fixed for a given Python version):
  train / heldout  the standard library's own .py sources, split by a hash of each file's content (heldout ~3%)
  ood_english      the English reference documentation shipped as pydoc_data.topics (excluded from training)
  ood_c            CPython's C headers (include/*.h), when the installation ships them
Built by data_prep.prepare (source `offline`, tokenizer `bpe:VOCAB`): a byte-level BPE trained with `tokenizers`
on the training side only; documents joined by EOS and packed into rows of seq_len tokens (train) or kept as
streams (evaluation sets). Resumable and deterministic like any prepare.py build.
"""
import argparse
import glob
import os
import sys
import sysconfig

from data_prep import encode, prepare

EOS = prepare.BPE_EOS


def heldout_by_hash(text, frac):
    """Kept for callers of the old name; the rule lives in data_prep.encode (one rule for every source)."""
    return encode.heldout_by_hash(text, frac)


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def all_documents(max_bytes=None):
    """The stdlib .py sources in a fixed order, exact duplicates dropped (train/held-out is decided later, by
    content hash, in the pipeline). max_bytes caps the total text, for quick test corpora."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        # prune while walking: site-packages can hold 10x the stdlib's files (1 s of globbing for nothing)
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "pydoc_data", "__pycache__")]
        files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    files.sort()
    seen, total = set(), 0
    for p in files:
        text = read_text(p)
        if not text.strip() or text in seen:
            continue
        if max_bytes and total >= max_bytes:
            return
        seen.add(text)
        total += len(text)
        yield text


def ood_sets():
    """Out-of-domain evaluation streams: English prose and C, neither of which is in training."""
    from pydoc_data.topics import topics
    sets = {"ood_english": [topics[k] for k in sorted(topics)]}
    include = sysconfig.get_paths().get("include")
    headers = sorted(glob.glob(os.path.join(include, "**", "*.h"), recursive=True)) if include else []
    if headers:
        sets["ood_c"] = [read_text(p) for p in headers]
    return sets


def build(out, vocab_size=4096, seq_len=256, heldout_frac=0.03, max_train_bytes=None, rows_per_shard=4096,
          workers=None, progress=True):
    src = "offline" + (f",max_mb={max_train_bytes / 2 ** 20:g}" if max_train_bytes else "")
    return prepare.run([src], f"bpe:{vocab_size}", out, seq_len=seq_len, heldout_frac=heldout_frac,
                       workers=workers, rows_per_shard=rows_per_shard, tokenizer_name=f"offline-bpe-{vocab_size}",
                       extra_streams=ood_sets(), progress=progress,
                       source_meta={"name": "offline", "python": sys.version.split()[0],
                                    "heldout_frac": heldout_frac})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/offline")
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--heldout_frac", type=float, default=0.03)
    ap.add_argument("--max_train_mb", type=float, default=None, help="cap the training text (MB of source)")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    build(a.out, a.vocab_size, a.seq_len, a.heldout_frac,
          int(a.max_train_mb * 2 ** 20) if a.max_train_mb else None, workers=a.workers)


if __name__ == "__main__":
    main()
