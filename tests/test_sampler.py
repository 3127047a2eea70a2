import os

import numpy as np
import pytest

from distillery import sampler, shards


def test_each_epoch_is_a_fresh_permutation_and_deterministic():
    o = sampler.GlobalOrder(1000, seed=43)
    e0, e1 = o.indices(0, 1000), o.indices(1000, 1000)
    assert sorted(e0.tolist()) == list(range(1000)) and sorted(e1.tolist()) == list(range(1000))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(sampler.GlobalOrder(1000, seed=43).indices(0, 2000), o.indices(0, 2000))
    assert not np.array_equal(sampler.GlobalOrder(1000, seed=42).indices(0, 1000), e0)


def test_indices_across_epoch_boundary_match_index():
    o = sampler.GlobalOrder(37, seed=1)
    got = o.indices(30, 100)  # spans epochs 0..3
    assert got.tolist() == [o.index(k) for k in range(30, 130)]


def test_resume_from_counter_equals_continuing():
    full = sampler.GlobalOrder(500, seed=7).indices(0, 1700)
    resumed = sampler.GlobalOrder(500, seed=7).indices(1234, 466)  # a fresh process knows only the counter
    assert np.array_equal(full[1234:], resumed)


def test_rank_slices_partition_each_step():
    G, W, mb, ga = 24, 3, 4, 2
    for step in range(3):
        got = []
        for r in range(W):
            sl = sampler.rank_slice(step * G, G, r, W, mb, ga)
            assert len(sl) == ga and all(c == mb for _, c in sl)
            got += [s + i for s, c in sl for i in range(c)]
        assert sorted(got) == list(range(step * G, (step + 1) * G))
    with pytest.raises(ValueError, match="global_batch"):
        sampler.rank_slice(0, 25, 0, 3, 4, 2)


def test_world_size_change_keeps_global_order():
    o = sampler.GlobalOrder(100, seed=3)
    G = 8
    one = [o.indices(s, c) for s, c in sampler.rank_slice(G, G, 0, 1, 4, 2)]
    two = [o.indices(s, c) for r in range(2) for s, c in sampler.rank_slice(G, G, r, 2, 4, 1)]
    assert np.array_equal(np.concatenate(one), np.concatenate(two))


def test_permutation_cache_is_bounded_and_reused():
    o = sampler.GlobalOrder(6_000_000, seed=43)
    p = o.permutation(0)
    assert p.dtype == np.int32 and o.permutation(0) is p  # cached: the O(n) cost is once per epoch
    o.permutation(1), o.permutation(2)
    assert len(o._cache) == 2 and 0 not in o._cache


def _tiny_dataset(tmp_path, texts, vocab_size=300, seq_len=16):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    out = tmp_path / "ds"
    os.makedirs(out / "train")
    eos = tok.token_to_id("<eos>")
    stream = np.concatenate([np.array(e.ids + [eos]) for e in tok.encode_batch(texts)])
    rows = stream[: len(stream) // seq_len * seq_len]
    dtype = shards.dtype_for_vocab(tok.get_vocab_size())
    entry = shards.write_tokens(str(out / "train" / "00000.bin"), rows, dtype)
    shards.atomic_write_json(str(out / "index.json"), {
        "format": shards.FORMAT, "version": shards.VERSION, "dtype": dtype, "vocab_size": tok.get_vocab_size(),
        "eos_id": eos, "tokenizer": {"name": "tiny-bpe", "vocab_hash": shards.vocab_hash(tok)},
        "splits": {"train": {"kind": "rows", "seq_len": seq_len, "rows": len(rows) // seq_len,
                             "tokens": len(rows), "documents": len(texts),
                             "files": [{"path": "train/00000.bin", **entry}]}}})
    return str(out), tok, rows.reshape(-1, seq_len)


def test_rank_reader_reads_its_slice_and_checks_tokenizers(tmp_path):
    texts = [f"document {i} says {'hello ' * (i % 7)}and counts {i * 17}." for i in range(200)]
    data, tok, rows = _tiny_dataset(tmp_path, texts)
    readers = [sampler.RankReader(data, seed=43, rank=r, world=2, student_tokenizer=tok) for r in range(2)]
    order = sampler.GlobalOrder(len(rows), 43)
    for r, rd in enumerate(readers):
        mbs = list(rd.step_batches(5 * 8, 8, micro_batch=2, grad_accum=2))
        want = rows[order.indices(5 * 8 + r * 4, 4)]
        assert np.array_equal(np.concatenate(mbs), want)
    other_texts = [t.upper() + " ZZZ" for t in texts]
    _, other, _ = _tiny_dataset(tmp_path / "o", other_texts, vocab_size=280)
    with pytest.raises(shards.DataError, match="teacher tokenizer .* does not match") as e:
        sampler.RankReader(data, seed=43, student_tokenizer=tok, teacher_tokenizer=other)
    assert "\n" not in str(e.value)
    with pytest.raises(shards.DataError, match="student"):
        shards.check_tokenizer(data, other, who="student")
    with pytest.raises(shards.DataError, match="embedding rows"):
        shards.check_tokenizer(data, tok, who="student", model_vocab_size=10)
    assert shards.check_tokenizer(data, tok, model_vocab_size=4096)["vocab_hash"] == shards.vocab_hash(tok)
