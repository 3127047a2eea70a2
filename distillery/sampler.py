"""Deterministic training order over packed rows, and each data-parallel rank's share of it.

Global sample k (the k-th row the run consumes, counted across epochs and ranks) maps to a row index through
a permutation of the rows seeded by (seed, epoch), epoch = k // n_rows: every epoch is a fresh shuffle, and
the whole order is a pure function of (n_rows, seed). Resuming therefore needs only the sample counter: no
replay of earlier batches, no sampler state in the checkpoint.

Cost: one permutation per epoch, O(n_rows) time and 4 bytes/row (int32 below 2^31 rows); 6M rows (50B tokens
at 8192) is ~0.5 s and 24 MB per rank, paid once per epoch and cached (the two most recent epochs, because a
batch can straddle an epoch boundary).

Step s of a run with global batch G over W ranks (G = W * micro_batch * grad_accum) uses samples
[s*G, (s+1)*G); rank r takes the contiguous slice [s*G + r*G/W, s*G + (r+1)*G/W), cut into grad_accum
micro-batches of micro_batch samples. Changing the world size at a step boundary keeps the global order
(the same samples are consumed, by different ranks).
"""
import numpy as np

from distillery import shards


class GlobalOrder:
    """Global sample index -> row index, reshuffled each epoch by a permutation seeded with (seed, epoch)."""

    def __init__(self, n_rows: int, seed: int, cache_epochs: int = 2):
        if n_rows <= 0:
            raise shards.DataError(f"cannot order {n_rows} rows; the training split is empty, rebuild it with "
                                   f"more text or a shorter --seq_len")
        self.n_rows, self.seed, self.cache_epochs = int(n_rows), int(seed), cache_epochs
        self._dtype = np.int32 if n_rows < 2 ** 31 else np.int64
        self._cache = {}  # epoch -> permutation; insertion order = age

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            # SeedSequence([seed, epoch]) gives independent streams per epoch and per seed (teachers 42,
            # students 43 in the paper: same corpus, different order).
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
            perm = rng.permutation(self.n_rows).astype(self._dtype, copy=False)
            perm.setflags(write=False)
            self._cache[epoch] = perm
            while len(self._cache) > self.cache_epochs:
                self._cache.pop(next(iter(self._cache)))
        return perm

    def index(self, k: int) -> int:
        if k < 0:
            raise IndexError(f"sample index {k} < 0")
        epoch, pos = divmod(int(k), self.n_rows)
        return int(self.permutation(epoch)[pos])

    def indices(self, start: int, count: int) -> np.ndarray:
        """Row indices of global samples [start, start + count) as int64 (may span epochs)."""
        if start < 0 or count < 0:
            raise IndexError(f"bad sample range start={start} count={count}")
        out = np.empty(count, dtype=np.int64)
        k, filled = int(start), 0
        while filled < count:
            epoch, pos = divmod(k, self.n_rows)
            take = min(count - filled, self.n_rows - pos)
            out[filled:filled + take] = self.permutation(epoch)[pos:pos + take]
            filled += take
            k += take
        return out

    def epoch_of(self, k: int) -> int:
        return int(k) // self.n_rows


def rank_slice(step_start_sample, global_batch, rank, world, micro_batch, grad_accum):
    """[(start, count)] of global sample indices for each of rank's grad_accum micro-batches in the optimizer
    step that begins at global sample `step_start_sample` (= step * global_batch for a fixed batch size)."""
    if global_batch != world * micro_batch * grad_accum:
        raise ValueError(f"global_batch {global_batch} != world {world} x micro_batch {micro_batch} x "
                         f"grad_accum {grad_accum}; fix the batch settings")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    base = int(step_start_sample) + rank * (global_batch // world)
    return [(base + m * micro_batch, micro_batch) for m in range(grad_accum)]


class RankReader:
    """What the trainer iterates: the packed rows of a data set in GlobalOrder, this rank's slice only.

        reader = RankReader("data/fineweb", seed=43, rank=r, world=W, student_tokenizer=tok)
        for mb in reader.step_batches(step * G, G, micro_batch, grad_accum): ...   # int64 [micro_batch, seq_len]

    Resume = call with the saved sample counter. The tokenizer checks run at construction, before training."""

    def __init__(self, data_dir, seed, rank=0, world=1, split="train", student_tokenizer=None,
                 teacher_tokenizer=None, verify=False):
        self.rows = shards.TokenRows(data_dir, split, verify=verify)
        if student_tokenizer is not None:
            shards.check_tokenizer(self.rows.index, student_tokenizer, who="student", data_dir=data_dir)
        if teacher_tokenizer is not None:
            shards.check_tokenizer(self.rows.index, teacher_tokenizer, who="teacher", data_dir=data_dir)
        self.order = GlobalOrder(len(self.rows), seed)
        self.rank, self.world = rank, world
        self.seq_len = self.rows.seq_len

    def __len__(self):
        return len(self.rows)

    def batch(self, start, count):
        """Rows of global samples [start, start + count): int64 [count, seq_len]."""
        return self.rows.take(self.order.indices(start, count))

    def step_indices(self, step_start_sample, global_batch, micro_batch, grad_accum):
        """Row indices of this rank's micro-batches of the step: [int64 [micro_batch]] x grad_accum."""
        return [self.order.indices(start, count) for start, count in
                rank_slice(step_start_sample, global_batch, self.rank, self.world, micro_batch, grad_accum)]

    def step_batches(self, step_start_sample, global_batch, micro_batch, grad_accum):
        for idx in self.step_indices(step_start_sample, global_batch, micro_batch, grad_accum):
            yield self.rows.take(idx)
