"""The teacher cache's storage layouts (distillery/cache_layout.py, issue 23), on rows encoded by the generator's own
encoders (distillery/teacher_cache.py), without a model:

* bit packing: the documented bit order, and pack / unpack are inverses at every width up to 32;
* compact sampled rows decode to the encoder's ids and weights bit for bit (any K, flat and peaked teachers, 2048 and
  128256 tokens, rows read in any order); the entropy exactly (fp32) or within ln(V) / 131070 (fixed16); a row holds
  exactly rest + K - 1 mask bits per position + its distinct ids at id_bits;
* compact top-k rows: exact ids, values rounded to fp16 / bf16 exactly as the formats round, fp32 exact;
* corrupt input is refused in one line: a row of the wrong length, targets that are not K merged draws.
"""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distillery import cache_layout as cl  # noqa: E402
from distillery import teacher_cache as tc  # noqa: E402
from distillery.errors import DataError  # noqa: E402


def test_bit_order_and_roundtrip():
    # values 1, 2, 3 at 2 bits: bits 01 | 10 | 11 from bit 0 of byte 0 upwards = 0b00111001
    assert cl.pack_bits(np.array([1, 2, 3]), 2).tolist() == [0b00111001]
    assert cl.id_bits(128256) == 17 and cl.id_bits(2048) == 11 and cl.id_bits(2049) == 12 and cl.id_bits(1) == 1
    rng = np.random.default_rng(0)
    for b in (1, 3, 8, 9, 11, 17, 24, 31, 32):
        v = rng.integers(0, 2 ** b, size=1001, dtype=np.int64)
        v[:2] = [0, 2 ** b - 1]
        packed = cl.pack_bits(v, b)
        assert packed.size == math.ceil(1001 * b / 8)
        buf = np.concatenate([packed, np.zeros(cl.PAD, np.uint8)])
        assert np.array_equal(cl.unpack_bits(buf, np.arange(1001, dtype=np.int64) * b, b), v), b
        # runs as the layouts store them (each byte-aligned): equal and equally spaced (one lane pass), long ones
        # (lanes per run), short ones of unequal length (one gather)
        for counts in ([300, 300, 300], [2000, 1500], [5, 0, 40, 13]):
            runs = [rng.integers(0, 2 ** b, size=c, dtype=np.int64) for c in counts]
            blobs = [cl.pack_bits(r, b) if len(r) else np.zeros(0, np.uint8) for r in runs]
            size = max(len(x) for x in blobs)
            buf = np.zeros(size * len(runs) + cl.PAD, np.uint8)
            for i, x in enumerate(blobs):
                buf[i * size:i * size + len(x)] = x
            got = cl.unpack_fields(buf, np.arange(len(runs)) * size, counts, b)
            assert np.array_equal(got, np.concatenate(runs)), (b, counts)


def test_merge_sorted_draws():
    ids, w = cl.merge_sorted_draws(torch.tensor([[3, 3, 5, 7], [2, 2, 2, 2]]))
    assert ids.tolist() == [[3, 5, 7, 3], [2, 2, 2, 2]]
    assert w.tolist() == [[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]]


def sampled_rows(n, S, V, K, peak, seed=0):
    """(ids, weights, entropy) numpy [n, S, K], [n, S, K], [n, S] as the builder stores them."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n * S, V, generator=g) * peak, -1)
    u = torch.rand(n * S, K, generator=g, dtype=torch.float64)
    ids, w, ent = tc.encode_sampled(logp, u)
    return ids.reshape(n, S, K).numpy(), w.reshape(n, S, K).numpy(), ent.reshape(n, S).numpy()


def roundtrip(layout, ids, vals, rest, order):
    """Pack all rows, then read the rows `order` back to back, as CacheReader.row_bytes hands them to unpack."""
    blob, lens = layout.pack(ids, vals, rest)
    ends = np.cumsum(lens)
    parts = [blob[e - n:e] for e, n in zip(ends[order], lens[order])]
    buf = np.concatenate(parts + [np.zeros(cl.PAD, np.uint8)])
    e2 = np.cumsum(lens[order])
    return layout.unpack(buf, e2 - lens[order], e2), blob, lens


@pytest.mark.parametrize("V,K,peak", [(2048, 12, 1.0), (2048, 12, 6.0), (128256, 12, 1.0), (512, 1, 1.0),
                                      (512, 13, 4.0), (512, 64, 2.0)])
def test_compact_sampled_is_exact(V, K, peak):
    n, S = 5, 37
    ids, w, ent = sampled_rows(n, S, V, K, peak)
    order = np.array([3, 0, 4, 4, 1])
    b = cl.id_bits(V)
    for rest in cl.ENTROPY:
        layout = cl.layout_of("sampled", K, S, V, cl.COMPACT, cl.spec(cl.COMPACT, "sampled", V, entropy=rest))
        (i2, w2, r2), blob, lens = roundtrip(layout, ids, w, ent, order)
        assert torch.equal(i2, torch.from_numpy(ids[order].astype(np.int64)))
        assert torch.equal(w2, torch.from_numpy(w[order]))                          # bit for bit
        err = np.abs(r2.numpy().astype(np.float64) - ent[order]).max()
        if rest == "fp32":
            assert err == 0
        else:                                                                       # half a code, + fp32 rounding
            assert err <= math.log(V) / 131070 + ent.max() * 2.0 ** -24, err
        # the size: rest + (K - 1) mask bits per position + the distinct ids at b bits, each row whole bytes
        distinct = (w > 0).sum(-1)
        want = S * (2 if rest == "fixed16" else 4) + math.ceil(S * (K - 1) / 8) + np.ceil(distinct.sum(-1) * b / 8)
        assert np.array_equal(lens, want.astype(np.int64)) and blob.size == lens.sum()


def test_compact_topk_rounds_values_as_the_format_does():
    n, S, V, K = 4, 29, 2048, 12
    logp = torch.log_softmax(torch.randn(n * S, V) * 3, -1)
    ids, vals, rest = (x.numpy() for x in tc.encode_topk(logp, K))
    ids, vals, rest = ids.reshape(n, S, K), vals.reshape(n, S, K), rest.reshape(n, S)
    rounded = {"fp32": lambda x: x, "fp16": lambda x: x.astype(np.float16).astype(np.float32),
               "bf16": lambda x: torch.from_numpy(x).to(torch.bfloat16).float().numpy()}
    for kind in cl.VALS:
        layout = cl.layout_of("topk", K, S, V, cl.COMPACT, cl.spec(cl.COMPACT, "topk", V, vals=kind))
        (i2, v2, r2), blob, lens = roundtrip(layout, ids, vals, rest, np.array([2, 1]))
        assert torch.equal(i2, torch.from_numpy(ids[[2, 1]].astype(np.int64)))
        assert np.array_equal(v2.numpy(), rounded[kind](vals[[2, 1]]))
        assert np.array_equal(r2.numpy(), rounded[kind](rest[[2, 1]]))
        vsz = 4 if kind == "fp32" else 2
        assert (lens == S * (K + 1) * vsz + math.ceil(S * K * 11 / 8)).all()
    fixed = cl.layout_of("topk", K, S, V, cl.FIXED)                                   # v1: everything exact
    (i2, v2, r2), blob, _ = roundtrip(fixed, ids, vals, rest, np.array([0, 1, 2, 3]))
    assert blob.size == n * S * (8 * K + 4) and np.array_equal(v2.numpy(), vals) and torch.equal(
        i2, torch.from_numpy(ids.astype(np.int64)))


def test_corrupt_rows_are_refused():
    n, S, V, K = 3, 16, 512, 6
    ids, w, ent = sampled_rows(n, S, V, K, 1.0)
    layout = cl.layout_of("sampled", K, S, V, cl.COMPACT, cl.spec(cl.COMPACT, "sampled", V))
    blob, lens = layout.pack(ids, w, ent)
    buf = np.concatenate([blob, np.zeros(cl.PAD, np.uint8)])
    ends = np.cumsum(lens)
    with pytest.raises(DataError, match="corrupt shard") as e:
        layout.unpack(buf, ends - lens, ends - 1)                                        # a row one byte short
    assert "\n" not in str(e.value)
    bad = w.copy()
    bad[0, 0, 0] += 1 / K                                                              # counts no longer sum to K
    with pytest.raises(DataError, match="not K draws merged"):
        layout.pack(ids, bad, ent)
    r, t = np.argwhere(w[..., 1] > 0)[0]                                                # a position with 2+ ids
    swapped = ids.copy()
    swapped[r, t, [0, 1]] = swapped[r, t, [1, 0]]                                     # no longer ascending
    with pytest.raises(DataError, match="not K draws merged"):
        layout.pack(swapped, w, ent)
    with pytest.raises(DataError, match="unknown to this reader"):
        cl.layout_of("sampled", K, S, V, 3, {"name": "compact"})
