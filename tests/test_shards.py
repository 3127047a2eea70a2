import json
import os

import numpy as np
import pytest

from distillery import shards


def make_set(tmp_path, n_rows=50, seq_len=8, rows_per_file=16, vocab=70000):
    out = tmp_path / "ds"
    os.makedirs(out / "train")
    os.makedirs(out / "heldout")
    dtype = shards.dtype_for_vocab(vocab)
    rows = (np.arange(n_rows * seq_len, dtype=np.int64) * 7919 % vocab).reshape(n_rows, seq_len)
    files = []
    for i, a in enumerate(range(0, n_rows, rows_per_file)):
        rel = f"train/{i:05d}.bin"
        files.append({"path": rel, **shards.write_tokens(str(out / rel), rows[a:a + rows_per_file], dtype)})
    held = np.arange(100) % vocab
    hfile = {"path": "heldout/00000.bin", **shards.write_tokens(str(out / "heldout/00000.bin"), held, dtype)}
    shards.atomic_write_json(str(out / "index.json"), {
        "format": shards.FORMAT, "version": shards.VERSION, "dtype": dtype, "vocab_size": vocab, "eos_id": 0,
        "tokenizer": {"name": "fake", "vocab_hash": shards.vocab_hash({"a": 0, "b": 1})},
        "splits": {"train": {"kind": "rows", "seq_len": seq_len, "rows": n_rows, "tokens": rows.size,
                             "documents": 3, "files": files},
                   "heldout": {"kind": "stream", "tokens": 100, "documents": 1, "files": [hfile]}}})
    return str(out), rows, held


def one_line_error(fn, match):
    with pytest.raises(shards.DataError, match=match) as e:
        fn()
    assert "\n" not in str(e.value) and "data_prep" in str(e.value)  # names the fix
    return e


def test_rows_random_access_across_files(tmp_path):
    data, rows, held = make_set(tmp_path)
    r = shards.TokenRows(data)
    assert len(r) == 50 and r.seq_len == 8 and r.maps[0].dtype == np.uint32
    idx = [49, 0, 16, 15, 33, 16]
    assert np.array_equal(r.take(idx), rows[idx]) and r.take(idx).dtype == np.int64
    assert np.array_equal(r[17], rows[17])
    assert np.array_equal(shards.load_stream(data, "heldout"), held)
    with pytest.raises(IndexError):
        r.take([50])
    assert shards.verify_all(data)["vocab_size"] == 70000


def test_flipped_byte_fails_checksum(tmp_path):
    data, _, _ = make_set(tmp_path)
    p = os.path.join(data, "train/00001.bin")
    b = bytearray(open(p, "rb").read())
    b[10] ^= 0x01
    open(p, "wb").write(bytes(b))
    shards.TokenRows(data)  # size still right: the cheap open passes, the checksum catches it
    one_line_error(lambda: shards.verify_all(data), "00001.bin fails its checksum")
    one_line_error(lambda: shards.TokenRows(data, verify=True), "checksum")


def test_truncated_shard(tmp_path):
    data, _, _ = make_set(tmp_path)
    p = os.path.join(data, "train/00002.bin")
    os.truncate(p, os.path.getsize(p) - 3)
    one_line_error(lambda: shards.TokenRows(data), "truncated")


def test_missing_index_and_missing_shard_and_bad_index(tmp_path):
    data, _, _ = make_set(tmp_path)
    os.remove(os.path.join(data, "heldout/00000.bin"))
    one_line_error(lambda: shards.load_stream(data, "heldout"), "missing")
    one_line_error(lambda: shards.load_stream(data, "nope"), "no split 'nope'")
    open(os.path.join(data, "index.json"), "w").write("{not json")
    one_line_error(lambda: shards.read_index(data), "corrupt")
    os.remove(os.path.join(data, "index.json"))
    one_line_error(lambda: shards.TokenRows(data), "missing index.json")


def test_tokenizer_mismatch_is_one_line_and_names_who(tmp_path):
    data, _, _ = make_set(tmp_path)
    same = {"b": 1, "a": 0}
    assert shards.check_tokenizer(data, {"name": "x", "vocab_hash": shards.vocab_hash(same), "vocab_size": 2})
    with pytest.raises(shards.DataError, match="teacher tokenizer 'other'.*'fake'") as e:
        shards.check_tokenizer(data, {"name": "other", "vocab_hash": shards.vocab_hash({"a": 1, "b": 0}),
                                      "vocab_size": 2}, who="teacher")
    assert "\n" not in str(e.value) and "--tokenizer other" in str(e.value)


def test_writes_are_atomic(tmp_path, monkeypatch):
    p = str(tmp_path / "x.bin")
    real = os.replace

    def killed(src, dst):  # the process dies between write and rename
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        shards.write_tokens(p, np.arange(10), "uint16")
    monkeypatch.setattr(os, "replace", real)
    assert not os.path.exists(p)  # only a temp name exists, which no reader opens
    e = shards.write_tokens(p, np.arange(10), "uint16")
    assert e["tokens"] == 10 and e["sha256"] == shards.sha256_file(p)
    shards.atomic_write_json(str(tmp_path / "i.json"), {"a": 1})
    assert json.load(open(tmp_path / "i.json")) == {"a": 1}


def test_vocab_hash_is_order_free_and_object_agnostic():
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    assert shards.vocab_hash(tok) == shards.vocab_hash({"[UNK]": 2, "b": 1, "a": 0})
    assert shards.vocab_hash(tok) != shards.vocab_hash({"a": 1, "b": 0, "[UNK]": 2})


def test_verify_cli_prints_one_line(tmp_path, capsys):
    from data_prep import verify
    data, _, _ = make_set(tmp_path)
    assert verify.main([data]) == 0 and capsys.readouterr().out.startswith("ok: ")
    p = os.path.join(data, "train/00000.bin")
    b = bytearray(open(p, "rb").read())
    b[0] ^= 0x80
    open(p, "wb").write(bytes(b))
    assert verify.main([data]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("error: ") and "checksum" in out


# ---------------------------------------------------------------------------- start-of-run checks (issue 9)
def copy_of(data_dir, tmp_path):
    """A private copy of the session's small offline data set (tests/conftest.py) to corrupt."""
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(data_dir, out)
    return str(out)


def rewrite_shard(data, rel, tokens):
    """Replace a shard *and* its index entry (a consistent file with a valid checksum)."""
    index = shards.read_index(data)
    entry = shards.write_tokens(os.path.join(data, rel), tokens, index["dtype"])
    for split in index["splits"].values():
        for e in split["files"]:
            if e["path"] == rel:
                e.update(entry)
    shards.atomic_write_json(os.path.join(data, "index.json"), index)


def test_verify_split_passes_a_good_set_and_counts_bytes(data_dir):
    index = shards.read_index(data_dir)
    train_bytes = sum(e["tokens"] for e in index["splits"]["train"]["files"]) * np.dtype(index["dtype"]).itemsize
    assert shards.verify_split(data_dir, "train") == train_bytes > 0
    assert shards.verify_split(data_dir, None) > train_bytes  # every split
    assert shards.check_token_ids(data_dir) > train_bytes


def test_zeroed_bytes_inside_a_shard_fail_the_checksum(data_dir, tmp_path):
    data = copy_of(data_dir, tmp_path)
    rel = shards.read_index(data)["splits"]["train"]["files"][0]["path"]
    p = os.path.join(data, rel)
    with open(p, "r+b") as f:  # a hole of zeros (a lost page, a sparse-file crash): size and id range still fine
        f.seek(os.path.getsize(p) // 2)
        f.write(b"\0" * 4096)
    shards.TokenRows(data)  # the cheap open does not see it ...
    shards.check_token_ids(data)  # ... nor the id range (0 is a valid id) ...
    one_line_error(lambda: shards.verify_split(data, "train"), rf"shard .*{rel} fails its checksum")  # ... this does
    one_line_error(lambda: shards.verify_all(data), "fails its checksum")


def test_token_id_out_of_vocab_is_caught_by_both_checks(data_dir, tmp_path):
    data = copy_of(data_dir, tmp_path)
    index = shards.read_index(data)
    V, seq = index["vocab_size"], index["splits"]["train"]["seq_len"]
    e = index["splits"]["train"]["files"][-1]
    tokens = np.array(np.memmap(os.path.join(data, e["path"]), dtype=index["dtype"], mode="r"))
    tokens[seq + 3] = V + 5  # written with another (larger) tokenizer: checksum consistent, ids not
    rewrite_shard(data, e["path"], tokens)
    msg = rf"shard .*{e['path']} holds token id {V + 5} >= vocab_size {V} .*; rebuild the data set with data_prep"
    one_line_error(lambda: shards.check_token_ids(data, "train"), msg)
    one_line_error(lambda: shards.verify_split(data, "train"), msg)
    one_line_error(lambda: shards.verify_all(data), "holds token id")
    shards.check_token_ids(data, "heldout")  # other splits are fine
    shards.check_token_ids(data, "train", vocab_size=V + 6)  # a model with more embedding rows than the tokenizer


def test_start_checks_report_size_and_missing_split(tmp_path):
    data, _, _ = make_set(tmp_path)
    one_line_error(lambda: shards.verify_split(data, "nope"), "no split 'nope'")
    p = os.path.join(data, "train/00001.bin")
    os.truncate(p, 0)
    one_line_error(lambda: shards.check_token_ids(data), r"00001.bin has 0 bytes, index says \d+ \(truncated")
    os.remove(p)
    one_line_error(lambda: shards.verify_split(data), "00001.bin is missing")
