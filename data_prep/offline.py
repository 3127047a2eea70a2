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
import sys

from data_prep import prepare
from distillery.errors import cli
from data_prep.stdlib_corpus import all_documents, ood_sets  # noqa: F401  (the corpus, re-exported)

EOS = prepare.BPE_EOS


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
    cli(main)
