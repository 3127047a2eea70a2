"""Tokenisation worker: text chunks in, flat token arrays out. Kept apart from prepare.py so that spawned worker
processes import only numpy + tokenizers (~0.2 s), not datasets/transformers (~3 s each).

Each document is encoded on its own (no context across documents), with EOS appended, so the output does not
depend on how documents are grouped into chunks or how chunks are spread over workers: byte-identical shards
for any worker count. Special-token strings inside a document's text (a web page quoting "<|end_of_text|>")
are encoded as plain text, never as the control token, so text cannot forge document boundaries.
"""
import hashlib
import os

import numpy as np

_STATE = {}


def heldout_by_hash(text, frac):
    """Stable train/held-out decision from the document's content alone: unchanged when the corpus grows or is
    reordered, and exact duplicates always land on the same side (they cannot leak across the split)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "little")
    return h / 2 ** 64 < frac


def init(tokenizer_json, eos_id, dtype, heldout_frac):
    # one core per worker: the Rust tokenizer's own thread pool would fight the other workers for the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    _STATE.update(tok=tok, eos=int(eos_id), dtype=np.dtype(dtype), frac=float(heldout_frac))


def encode_chunk(texts):
    """-> (tokens [sum(lens)] in the shard dtype, lens [n] int64 incl. the EOS, heldout [n] bool)."""
    s = _STATE
    encs = s["tok"].encode_batch_fast(texts, add_special_tokens=False) if hasattr(s["tok"], "encode_batch_fast") \
        else s["tok"].encode_batch(texts, add_special_tokens=False)
    lens = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
    out = np.empty(int(lens.sum()), dtype=s["dtype"])
    ends = np.cumsum(lens)
    pos = 0
    for e, end in zip(encs, ends.tolist()):
        out[pos:end - 1] = e.ids
        out[end - 1] = s["eos"]
        pos = end
    held = np.fromiter((heldout_by_hash(t, s["frac"]) for t in texts), dtype=bool, count=len(texts)) \
        if s["frac"] > 0 else np.zeros(len(texts), bool)
    return out, lens, held
