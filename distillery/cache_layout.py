"""How a teacher cache's shards store their rows (issue 23): the two layouts, their encoders and decoders, and the shard
file writer. What the rows mean (ids, vals, rest per method), the index and the reader: distillery/teacher_cache.py.

Every layout stores, for each training row of S positions, what `CacheReader.take` hands the loss: ids [S, K],
vals [S, K], rest [S] (teacher_cache.py's docstring). index.json's "version" names the layout.

v1 "fixed" (issue 13): each row one record ids int32 [S, K] | vals float32 [S, K] | rest float32 [S], little-endian;
  a shard is its rows' records back to back. 8 K + 4 bytes per token.

v2 "compact" (default): a shard is its rows' records back to back (each a whole number of bytes, no padding between
  them), zero padding to a multiple of 8 bytes, then the offset table uint64 [rows + 1] (offsets[i] = first byte of
  row i, offsets[rows] = end of the last row): reading row i touches offsets[i : i + 2] and the row's own bytes.
  Token ids are bit-packed at b = id_bits(kd_vocab) bits each (17 at 128256, 11 at 2048), little-endian bit order:
  value j of a run of b-bit fields occupies bits [j b, (j + 1) b) of the section, bit i of a section being bit i % 8
  of its byte i // 8.
  sampled row:  rest   [S]  the teacher entropy, "fixed16" (uint16 code c, H = c * ln(kd_vocab) / 65535) or "fp32"
                mask   S (K - 1) bits: bit t (K - 1) + j - 1 (j = 1 .. K - 1) is 1 when the j-th of position t's K
                       sorted draws differs from the one before (a new distinct id); the counts are the run lengths
                ids    the distinct ids of each position, ascending, position after position (n_t = 1 + the ones
                       of position t's mask bits), b bits each
                -> K - 1 + b n_t bits + 16 (or 32) per position, n_t the distinct ids among the K draws.
                The counts need no more: the mask is the sorted draws' run boundaries, so the reader rebuilds the
                sorted draws and merges them with the encoder's own code (`merge_sorted_draws`): ids and weights are
                bit for bit what v1 stores.
  top-k row:    rest   [S]     log of the mass outside the K ids, in "fp16" (default), "bf16" or "fp32"
                vals   [S, K]  log-probs, same precision
                ids    [S, K]  b bits each
                -> K (b + 16) + 16 bits per position at fp16.

Precision. Sampled: ids and counts are exact, so `take` gives v1's ids and weights bit for bit and the loss's
gradients are bit-identical (the entropy is a constant of the loss). The entropy sets only the reported kd value:
fixed16 is within ln(V) / 131070 nats of the fp32 entropy (9.0e-5 at V = 128256, 5.8e-5 at 2048), so kd_sum moves by
at most T^2 * that per token; fp32 keeps loss values bit-identical. Top-k: fp16 log-probs carry a relative rounding
error <= 2^-11; measured on the offline teacher (bench/cache_size.py) it moves the sparse loss's gradients by <= 4.8e-4
relative and kd by <= 1.3e-5; bf16 (same bytes) moves them by <= 4.0e-3, 8x more, so fp16 is the default.
"""
import functools
import hashlib
import math
import os

import numpy as np
import torch

from distillery import atomic
from distillery.errors import DataError

FIXED, COMPACT = 1, 2                 # index.json "version"
NAMES = {FIXED: "fixed", COMPACT: "compact"}
VALS = ("fp16", "bf16", "fp32")       # compact top-k: precision of log-probs and rest
ENTROPY = ("fixed16", "fp32")         # compact sampled: precision of the entropy
CODE_MAX = 65535                      # fixed16's largest code
PAD = 64                              # zero bytes after the rows handed to unpack: no field read runs off them
LANES_MIN = 1024                      # runs of at least this many fields are read lane by lane (unpack_fields)


def id_bits(kd_vocab):
    """Bits that hold every id < kd_vocab (17 at 128256)."""
    return max(1, (int(kd_vocab) - 1).bit_length())


def spec(version, method, kd_vocab, vals=None, entropy=None):
    """What index.json's "layout" records for a compact cache (None for the fixed layout, which has no such entry)."""
    if version == FIXED:
        return None
    if method == "topk":
        return {"name": "compact", "id_bits": id_bits(kd_vocab), "vals": vals or "fp16"}
    return {"name": "compact", "id_bits": id_bits(kd_vocab), "rest": entropy or "fixed16",
            "rest_max": math.log(max(2, int(kd_vocab)))}


# ---------------------------------------------------------------------------- bits and half floats
def pack_bits(values, b):
    """values (non-negative ints < 2^b, b <= 32) [N] -> uint8 [ceil(N b / 8)]: value j at bits [j b, (j + 1) b)."""
    v = np.ascontiguousarray(values, dtype="<u4").reshape(-1, 1).view(np.uint8)                  # [N, 4]
    bits = np.unpackbits(v, axis=1, bitorder="little")[:, :b]                                     # [N, b]
    return np.packbits(bits.reshape(-1), bitorder="little")


def at_bytes(buf, dtype):
    """v with v[a] = the little-endian `dtype` value stored at byte a of buf (uint8, contiguous): an overlapping
    stride-1 view, no copy, so one gather reads values at any byte offsets."""
    dt = np.dtype(dtype)
    return np.ndarray(shape=(buf.size - dt.itemsize + 1,), dtype=dt, buffer=buf, strides=(1,))


def unpack_bits(buf, pos, b):
    """buf uint8 (PAD zero bytes past its last field), pos int64 [N] bit offsets -> int64 [N], the b-bit fields
    (b <= 57: a field and its shift fit in the 8 bytes one gather reads)."""
    w = at_bytes(buf, "<u8")[pos >> 3]
    return ((w >> (pos & 7).astype(np.uint64)) & np.uint64((1 << b) - 1)).astype(np.int64)


def _lanes(buf, first, stride, n, count, b):
    """int64 [n, count]: run r's fields, the run starting at byte first + r * stride. Eight b-bit fields fill b
    bytes, so field 8 i + l of a run sits at byte (l b) // 8 + i b, bit (l b) % 8: lane l is one strided view, read
    with one shift and mask, no gather (~4x faster than unpack_bits on long runs). Reads up to b + 8 bytes past a
    run's last field (the PAD)."""
    m = -(-int(count) // 8)
    out = np.empty((n, m * 8), dtype=np.int64)
    dt, mask = ("<u8" if b + 7 > 32 else "<u4"), (1 << b) - 1
    for lane in range(8):
        o, sh = (lane * b) >> 3, (lane * b) & 7
        v = np.ndarray(shape=(n, m), dtype=dt, buffer=buf, offset=int(first) + o, strides=(int(stride), b))
        out[:, lane::8] = (v >> sh) & mask
    return out[:, :count]


def unpack_fields(buf, bases, counts, b):
    """int64 [sum counts]: the b-bit fields of runs r = 0.., counts[r] fields from byte bases[r] (byte-aligned runs
    packed by pack_bits), concatenated. Equal, equally spaced runs (top-k rows) are read lane by lane in one go,
    long runs lane by lane each, short ones by one gather (unpack_bits)."""
    bases, counts = np.asarray(bases, np.int64), np.asarray(counts, np.int64)
    if bases.size == 0 or counts.sum() == 0:
        return np.zeros(0, np.int64)
    step = np.diff(bases)
    if (counts == counts[0]).all() and (step == (step[0] if step.size else 0)).all() and counts[0] >= 8:
        return _lanes(buf, bases[0], step[0] if step.size else 0, bases.size, counts[0], b).reshape(-1)
    if counts.min() >= LANES_MIN:
        return np.concatenate([_lanes(buf, f, 0, 1, c, b).reshape(-1) for f, c in zip(bases.tolist(),
                                                                                     counts.tolist())])
    j = np.arange(int(counts.sum()), dtype=np.int64)
    return unpack_bits(buf, np.repeat(bases * 8 - (np.cumsum(counts) - counts) * b, counts) + j * b, b)


def _half(x, kind):
    """float32 array -> its bytes at precision kind (fp16: numpy's round to nearest even; bf16: torch's)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == "fp32":
        return x.view(np.uint8).reshape(*x.shape[:-1], -1)
    if kind == "fp16":
        h = x.astype("<f2")
    else:
        h = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    return h.view(np.uint8).reshape(*x.shape[:-1], -1)


def _unhalf(raw, kind):
    """uint8 [..., n * size] at precision kind -> float32 [..., n] (exact: every value is a float32)."""
    raw = np.ascontiguousarray(raw)
    if kind == "fp32":
        return raw.view("<f4")
    if kind == "fp16":
        return raw.view("<f2").astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------- the sampled merge (encoder and reader)
def merge_sorted_draws(s):
    """s [C, K] int64, each row's K draws in ascending order -> (ids [C, K], weights fp32 [C, K]): distinct ids first,
    ascending, weight count / K; unused slots repeat the first id with weight 0. The one merge of the project: the
    encoder stores its output (v1) and the compact reader recomputes it from the same sorted draws, so both hand
    the loss the same bits."""
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = first.long().cumsum(-1) - 1                                               # distinct-id rank of each draw
    K = s.shape[-1]
    counts = torch.zeros(s.shape, dtype=torch.float64, device=s.device).scatter_add_(
        -1, slot, torch.ones(s.shape, dtype=torch.float64, device=s.device))
    # every draw writes its id into its slot (draws sharing a slot write the same id); unused slots keep the first id
    ids = s[:, :1].expand_as(s).clone().scatter_(-1, slot, s)
    return ids, (counts / K).float()


# ---------------------------------------------------------------------------- layouts
class Layout:
    """The row codec of one cache: pack(ids, vals, rest) for the writer (numpy [n, S, K], [n, S, K], [n, S] -> the
    rows' bytes uint8 and each row's length [n]); unpack(buf, starts, ends) for the reader: buf uint8 holds n rows
    back to back (row i in [starts[i], ends[i]), starts[0] = 0) and PAD zero bytes after them -> (ids int64
    [n, S, K], vals float32 [n, S, K], rest float32 [n, S]) torch tensors.
    table: whether shards end with the offset table (compact) or rows have one fixed size (fixed)."""

    table = True
    row_bytes = None                  # fixed size of a row, where rows have one

    def __init__(self, method, k, seq_len, kd_vocab, layout=None):
        self.method, self.k, self.S, self.kd_vocab, self.layout = method, int(k), int(seq_len), int(kd_vocab), layout

    def max_bytes_per_token(self):
        raise NotImplementedError

    def _check_len(self, starts, ends, want):
        bad = np.nonzero(ends - starts != want)[0]
        if bad.size:
            raise DataError(f"a teacher cache row holds {int(ends[bad[0]] - starts[bad[0]])} bytes, its layout says "
                            f"{int(want if np.isscalar(want) else want[bad[0]])} (corrupt shard); run "
                            f"CacheReader(..., verify=True), delete the failing shard and rerun data_prep.teacher_cache")


class Fixed(Layout):
    """v1: ids int32 | vals float32 | rest float32, one fixed-size record per row."""

    table = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.dtype = np.dtype([("ids", "<i4", (self.S, self.k)), ("vals", "<f4", (self.S, self.k)),
                               ("rest", "<f4", (self.S,))])
        self.row_bytes = self.dtype.itemsize

    def max_bytes_per_token(self):
        return 8 * self.k + 4

    def pack(self, ids, vals, rest):
        rec = np.empty(len(ids), dtype=self.dtype)
        rec["ids"], rec["vals"], rec["rest"] = ids, vals, rest
        return rec.view(np.uint8), np.full(len(ids), self.row_bytes, dtype=np.int64)

    def unpack(self, buf, starts, ends):
        self._check_len(starts, ends, self.row_bytes)
        rec = buf[:len(starts) * self.row_bytes].view(self.dtype)                      # rows are back to back
        return (torch.from_numpy(rec["ids"].astype(np.int64)), torch.from_numpy(np.ascontiguousarray(rec["vals"])),
                torch.from_numpy(np.ascontiguousarray(rec["rest"])))


class CompactTopk(Layout):
    """v2 top-k: rest [S] | vals [S, K] at `vals` precision | ids [S, K] at id_bits."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.b, self.kind = int(self.layout["id_bits"]), self.layout["vals"]
        if self.kind not in VALS:
            raise DataError(f"teacher cache layout stores top-k values as {self.kind!r}, this reader knows "
                            f"{', '.join(VALS)}; update Distillery or rebuild the cache")
        self.vsz = {"fp16": 2, "bf16": 2, "fp32": 4}[self.kind]
        self.head = self.S * (self.k + 1) * self.vsz                                   # rest + vals bytes
        self.row_bytes = self.head + -(-self.S * self.k * self.b // 8)

    def max_bytes_per_token(self):
        return self.row_bytes / self.S

    def pack(self, ids, vals, rest):
        n = len(ids)
        out = np.zeros((n, self.row_bytes), dtype=np.uint8)
        out[:, :self.S * self.vsz] = _half(rest, self.kind)
        out[:, self.S * self.vsz:self.head] = _half(vals.reshape(n, -1), self.kind)
        for r in range(n):
            out[r, self.head:] = pack_bits(ids[r].reshape(-1), self.b)
        return out.reshape(-1), np.full(n, self.row_bytes, dtype=np.int64)

    def unpack(self, buf, starts, ends):
        self._check_len(starts, ends, self.row_bytes)
        n, S, K, sv = len(starts), self.S, self.k, self.S * self.vsz
        rows = buf[:n * self.row_bytes].reshape(n, self.row_bytes)                     # rows are back to back
        rest = _unhalf(rows[:, :sv], self.kind)
        vals = _unhalf(rows[:, sv:self.head], self.kind).reshape(n, S, K)
        ids = unpack_fields(buf, starts + self.head, np.full(n, S * K), self.b).reshape(n, S, K)
        return torch.from_numpy(ids), torch.from_numpy(vals), torch.from_numpy(rest)


class CompactSampled(Layout):
    """v2 sampled: rest [S] (fixed16 or fp32) | run-boundary mask S (K - 1) bits | distinct ids at id_bits."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.b, self.kind = int(self.layout["id_bits"]), self.layout["rest"]
        if self.kind not in ENTROPY:
            raise DataError(f"teacher cache layout stores the entropy as {self.kind!r}, this reader knows "
                            f"{', '.join(ENTROPY)}; update Distillery or rebuild the cache")
        self.esz = 2 if self.kind == "fixed16" else 4
        self.scale = float(self.layout["rest_max"]) / CODE_MAX                         # nats per fixed16 code
        self.mb = -(-self.S * (self.k - 1) // 8)                                      # mask bytes
        self.head = self.S * self.esz + self.mb

    def max_bytes_per_token(self):
        return (self.head + -(-self.S * self.k * self.b // 8)) / self.S

    def _rest_bytes(self, rest):
        if self.kind == "fp32":
            return _half(rest, "fp32")
        code = np.clip(np.rint(rest.astype(np.float64) / self.scale), 0, CODE_MAX) if self.scale > 0 else rest * 0
        return code.astype("<u2").view(np.uint8).reshape(len(rest), -1)

    def pack(self, ids, vals, rest):
        """ids [n, S, K], vals = count / K [n, S, K] (distinct ids first, ascending; 0 after), rest [n, S]."""
        n, S, K = ids.shape
        counts = np.rint(vals.astype(np.float64) * K).astype(np.int64)                  # [n, S, K]
        used = counts > 0
        nd = used.sum(-1)                                                             # [n, S] distinct ids
        ok = (counts.sum(-1) == K) & (used == (np.arange(K) < nd[..., None])).all(-1)
        d = np.diff(np.where(used, ids.astype(np.int64), np.iinfo(np.int64).max), axis=-1)
        ok &= ((d > 0) | ~used[..., 1:]).all(-1)
        if not ok.all():
            raise DataError("sampled teacher-cache targets are not K draws merged into ascending distinct ids with "
                            "weights count / K (a corrupt or foreign cache); rebuild it with data_prep.teacher_cache")
        flags = np.zeros((n * S, K + 1), dtype=bool)                                   # new-id flag of each draw
        start = (np.cumsum(counts, -1) - counts).reshape(n * S, K)                     # first draw of each slot
        flags[np.repeat(np.arange(n * S), K), np.where(used.reshape(-1, K), start, K).reshape(-1)] = True
        mask = flags[:, 1:K].reshape(n, S * (K - 1))
        parts, lens = [], np.empty(n, dtype=np.int64)
        head = self._rest_bytes(rest)
        for r in range(n):
            row_ids = ids[r][used[r]]                                                  # position-major, ascending
            row = np.concatenate([head[r], np.packbits(mask[r], bitorder="little"), pack_bits(row_ids, self.b)])
            parts.append(row)
            lens[r] = row.size
        return np.concatenate(parts), lens

    def unpack(self, buf, starts, ends):
        n, S, K, se = len(starts), self.S, self.k, self.S * self.esz
        raw = np.concatenate([buf[a:a + se] for a in starts.tolist()])                  # [n S] entropies
        rest = raw.view("<f4") if self.kind == "fp32" else \
            (raw.view("<u2").astype(np.float64) * self.scale).astype(np.float32)
        table = _patterns(K) if K <= TABLE_K else None
        if table is not None:       # position t's K - 1 mask bits as one integer, its pattern of new-id draws
            nd_of, ids_of, w_of = table
            pat = unpack_fields(buf, starts + se, np.full(n, S), K - 1) if K > 1 else np.zeros(n * S, np.int64)
            nd = nd_of[pat]                                                           # [n S] distinct ids
        else:                       # the mask bits themselves, the ranks by a cumulative sum
            mb = buf[(starts + se)[:, None] + np.arange(self.mb)]                       # [n, mask bytes]
            new = np.ones((n * S, K), dtype=np.int64)
            new[:, 1:] = np.unpackbits(mb, axis=1, bitorder="little")[:, :S * (K - 1)].reshape(n * S, K - 1)
            rank = new.cumsum(-1) - 1
            nd = rank[:, -1] + 1
        ends_t = np.cumsum(nd)
        row_end = ends_t[S - 1::S]
        n_row = np.diff(row_end, prepend=0)                                           # [n]
        self._check_len(starts, ends, self.head + -(-n_row * self.b // 8))
        distinct = unpack_fields(buf, starts + self.head, n_row, self.b)               # [sum n_t]
        first = (ends_t - nd)[:, None]                                                # [n S, 1] its first one
        if table is not None:       # (table rows gathered as whole records: one copy each, not K)
            ids = distinct[first + ids_of[pat].view(np.int64).reshape(-1, K)]
            ids, w = torch.from_numpy(ids), torch.from_numpy(w_of[pat].view(np.float32).reshape(-1, K))
        else:                       # merge the sorted draws themselves
            ids, w = merge_sorted_draws(torch.from_numpy(distinct[first + rank]))
        return ids.reshape(n, S, K), w.reshape(n, S, K), torch.from_numpy(rest.reshape(n, S))


TABLE_K = 16       # sampled K up to which the decoder looks every mask pattern up in a table (2^(K-1) rows)


@functools.lru_cache(maxsize=None)
def _patterns(K):
    """Per mask pattern p (K - 1 bits), P = 2^(K-1): nd_of [P] its distinct ids, and merge_sorted_draws of its sorted
    draws' distinct ranks, ids_of [P] (K int64 records: the rank each output slot holds) and w_of [P] (K float32
    records: the weights). merge only compares
    neighbouring draws and copies them, and a position's distinct ids ascend with their rank, so merging the
    position's draws distinct[first + rank] gives ids distinct[first + ids_of[p]] and weights w_of[p] exactly: the
    table is the merge, evaluated once per pattern (K <= TABLE_K: at most 32768 x 16)."""
    P = 1 << (K - 1)
    new = np.ones((P, K), dtype=np.int64)
    new[:, 1:] = (np.arange(P)[:, None] >> np.arange(K - 1)) & 1
    ranks = new.cumsum(-1) - 1
    ids, w = merge_sorted_draws(torch.from_numpy(ranks))
    rec = lambda x: np.ascontiguousarray(x).view(np.dtype((np.void, x.shape[1] * x.itemsize))).reshape(P)  # noqa
    return ranks[:, -1] + 1, rec(ids.numpy()), rec(w.numpy())


def layout_of(method, k, seq_len, kd_vocab, version, layout=None):
    """The codec of a cache (index.json's method, k, seq_len, kd_vocab, version, layout)."""
    if version == FIXED:
        return Fixed(method, k, seq_len, kd_vocab)
    if version != COMPACT or not isinstance(layout, dict) or layout.get("name") != "compact":
        raise DataError(f"teacher cache layout v{version} {layout!r} is unknown to this reader; update Distillery "
                        f"or rebuild the cache")
    return (CompactTopk if method == "topk" else CompactSampled)(method, k, seq_len, kd_vocab, layout)


# ---------------------------------------------------------------------------- shard files
def table_start(rows_end):
    """Offset of the offset table after rows that end at byte rows_end (zero padding to a multiple of 8)."""
    return -(-int(rows_end) // 8) * 8


class ShardFile:
    """One shard written under a temporary name (sha256 on the fly) and renamed when complete: the builder, the
    converter and the benches write through it."""

    def __init__(self, path, layout):
        self.path, self.layout = path, layout
        self.tmp = atomic.tmp_name(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.ends = [0]

    def _put(self, b):
        self.f.write(b)
        self.h.update(b)

    def write(self, blob, lengths):
        """Rows packed by layout.pack: their bytes back to back and each row's length."""
        self._put(np.ascontiguousarray(blob).tobytes())
        self.ends.extend((self.ends[-1] + np.cumsum(lengths)).tolist())

    @property
    def rows(self):
        return len(self.ends) - 1

    def close(self):
        """-> (bytes, sha256) of the finished file, now under its final name."""
        if self.layout.table:
            end = self.ends[-1]
            self._put(bytes(table_start(end) - end) + np.asarray(self.ends, dtype="<u8").tobytes())
        self.f.flush()
        os.fsync(self.f.fileno())
        size = self.f.tell()
        self.f.close()
        os.replace(self.tmp, self.path)
        return size, self.h.hexdigest()

    def abort(self):
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def open_shard(path, rows, nbytes, layout):
    """(memmap uint8 of the shard, row offsets uint64 [rows + 1]) after the cheap checks: the size the index says and,
    for a table, its two ends (the whole table is read row by row as rows are taken)."""
    size = os.path.getsize(path)
    if size != nbytes:
        raise DataError(f"teacher cache shard {path} has {size} bytes, index says {nbytes} (truncated or replaced); "
                        f"delete it and rerun data_prep.teacher_cache")
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    if not layout.table:
        return mm, None
    t0 = size - 8 * (rows + 1)
    offs = np.memmap(path, dtype="<u8", mode="r", offset=t0, shape=(rows + 1,)) if t0 >= 0 else None
    if offs is None or int(offs[0]) != 0 or table_start(offs[-1]) != t0:
        raise DataError(f"teacher cache shard {path} has a broken row table (corrupt); delete it and rerun "
                        f"data_prep.teacher_cache")
    return mm, offs
