import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import encode, prepare, sources
from distillery import shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_docs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "teacher", "student", "tokens", "déjà", "vu", "数据", "loss", "alpha", "\n", "  ", "x=1;"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(3, 80)))) + f" #{i}" for i in range(n)]
    docs[5] = "a document quoting <|endoftext|> as text must stay one document"
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs()
    with open(d / "a.jsonl", "w") as f:
        for t in docs[:70]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    with open(d / "b.jsonl", "w") as f:
        for t in docs[70:]:
            f.write(json.dumps({"text": t, "id": 2}) + "\n")
    hf = prepare.wrap_bpe(prepare.train_bpe(docs, 400))
    hf.save_pretrained(str(d / "tok"))
    return d, docs, hf


def run(corpus, out, **kw):
    d, docs, hf = corpus
    args = dict(seq_len=32, rows_per_shard=8, heldout_frac=0.2, workers=0, progress=False)
    args.update(kw)
    return prepare.run([f"files:{d}/*.jsonl"], str(d / "tok"), str(out), **args)


def expected(docs, hf, frac):
    tok = hf.backend_tokenizer
    tok.encode_special_tokens = True
    eos = hf.eos_token_id
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids + [eos]
    held = [encode.heldout_by_hash(t, frac) for t in docs]
    train = [x for t, h in zip(docs, held) for x in enc(t) if not h]
    heldout = [x for t, h in zip(docs, held) for x in enc(t) if h]
    return np.array(train), np.array(heldout), held


def file_bytes(out):
    return {os.path.relpath(p, out): open(p, "rb").read()
            for p in sorted(glob.glob(f"{out}/**/*", recursive=True)) if os.path.isfile(p)}


def test_round_trip_and_split(corpus, tmp_path):
    d, docs, hf = corpus
    index = run(corpus, tmp_path / "o")
    train, heldout, held = expected(docs, hf, 0.2)
    rows = shards.TokenRows(str(tmp_path / "o"))
    got = rows.take(range(len(rows))).reshape(-1)
    assert len(train) - len(got) < 32 and np.array_equal(got, train[: len(got)])
    assert index["splits"]["train"]["tail_tokens_dropped"] == len(train) - len(got)
    assert np.array_equal(shards.load_stream(str(tmp_path / "o"), "heldout"), heldout)
    assert 0 < sum(held) < len(docs)
    # every document in exactly one split: decode the streams back into documents
    eos = hf.eos_token_id
    split_docs = lambda s: [hf.decode(p) for p in np.split(s, np.where(s == eos)[0] + 1) if len(p)]
    tr = [t.removesuffix(hf.eos_token) for t in split_docs(train)]
    ho = [t.removesuffix(hf.eos_token) for t in split_docs(heldout)]
    assert sorted(tr + ho) == sorted(docs) and not set(tr) & set(ho)
    assert index["splits"]["train"]["documents"] + index["splits"]["heldout"]["documents"] == len(docs)
    assert docs[5] in tr + ho  # the quoted special token did not cut it in two
    assert index["tokenizer"]["vocab_hash"] == shards.vocab_hash(hf)
    assert shards.verify_all(str(tmp_path / "o"))["dtype"] == "uint16"


def test_heldout_is_stable_when_corpus_grows(corpus, tmp_path):
    d, docs, hf = corpus
    more = make_docs(200, seed=1)[120:]  # new documents appended
    assert [encode.heldout_by_hash(t, 0.2) for t in docs] == [encode.heldout_by_hash(t, 0.2) for t in
                                                              (docs + more)[:len(docs)]]


def test_identical_across_worker_counts_and_runs(corpus, tmp_path):
    outs = []
    for i, w in enumerate([0, 1, 2, 2]):
        run(corpus, tmp_path / f"w{i}", workers=w, chunk_mb=0.001)
        outs.append(file_bytes(tmp_path / f"w{i}"))
    assert all(o == outs[0] for o in outs[1:])


def test_killed_run_resumes_to_identical_output(corpus, tmp_path):
    run(corpus, tmp_path / "full", chunk_mb=0.0005)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, tmp_path / "killed", chunk_mb=0.0005, stop_after_commits=2)
    assert not os.path.exists(tmp_path / "killed" / "index.json")
    assert not glob.glob(str(tmp_path / "killed" / "**" / "*.tmp-*"), recursive=True)
    with pytest.raises(shards.DataError, match="missing index.json"):
        shards.TokenRows(str(tmp_path / "killed"))  # a partial build is not a data set
    run(corpus, tmp_path / "killed", chunk_mb=0.0005)
    assert file_bytes(tmp_path / "killed") == file_bytes(tmp_path / "full")
    with pytest.raises(shards.DataError, match="other arguments"):
        run(corpus, tmp_path / "full", seq_len=16)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun(corpus, tmp_path):
    d, _, _ = corpus
    cmd = [sys.executable, "-m", "data_prep.prepare", "--source", f"files:{d}/*.jsonl", "--tokenizer",
           str(d / "tok"), "--seq_len", "8", "--rows_per_shard", "1", "--workers", "1", "--quiet",
           "--heldout_frac", "0.2"]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], cwd=ROOT, check=True)
    p = subprocess.Popen(cmd + ["--out", str(tmp_path / "k")], cwd=ROOT)
    import time
    while not glob.glob(str(tmp_path / "k" / "train" / "0001*.bin")) and p.poll() is None:
        time.sleep(0.01)
    p.kill()
    p.wait()
    subprocess.run(cmd + ["--out", str(tmp_path / "k")], cwd=ROOT, check=True)
    assert file_bytes(tmp_path / "k") == file_bytes(tmp_path / "full")


def test_budget_and_mixture_weights(corpus, tmp_path):
    d, docs, hf = corpus
    index = prepare.run([f"files:{d}/a.jsonl,weight=3", f"files:{d}/b.jsonl,weight=1"], str(d / "tok"),
                        str(tmp_path / "m"), seq_len=16, max_tokens=640, heldout_frac=0.0, workers=0,
                        progress=False)
    assert index["splits"]["train"]["tokens"] == 640
    a, b = index["sources"]
    assert (a["quota_tokens"], b["quota_tokens"]) == (480, 160)
    assert a["train_tokens"] >= 480 and b["train_tokens"] >= 160  # whole documents, cut at the quota's doc
    assert a["train_tokens"] - 480 < 200 and b["train_tokens"] - 160 < 200
    with pytest.raises(shards.DataError, match="--max_tokens"):
        prepare.run([f"files:{d}/a.jsonl,weight=3", f"files:{d}/b.jsonl"], str(d / "tok"), str(tmp_path / "n"),
                    seq_len=16, workers=0, progress=False)


def test_local_formats_and_hub_code_path(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d, docs, hf = corpus
    pq.write_table(pa.table({"body": docs[:30]}), tmp_path / "x.parquet")
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as f, pa.ipc.new_stream(f, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": docs[:30]}))
    os.makedirs(tmp_path / "txt")
    for i, t in enumerate(docs[:30]):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(t)
    os.makedirs(tmp_path / "hubrepo" / "data")  # a dataset repo laid out as on the hub, loaded by path
    with open(tmp_path / "hubrepo" / "data" / "train.jsonl", "w") as f:
        for t in docs[:30]:
            f.write(json.dumps({"text": t}) + "\n")
    got = {}
    for name, spec in [("pq", f"files:{tmp_path}/x.parquet,field=body"), ("arrow", f"files:{tmp_path}/x.arrow"),
                       ("txt", f"files:{tmp_path}/txt/*.txt"), ("hf", f"hf:{tmp_path}/hubrepo,split=train")]:
        prepare.run([spec], str(d / "tok"), str(tmp_path / name), seq_len=16, heldout_frac=0.0, workers=0,
                    progress=False)
        got[name] = open(tmp_path / name / "train" / "00000.bin", "rb").read()
    assert len(set(got.values())) == 1  # same documents -> same tokens whatever the container
    with pytest.raises(shards.DataError, match="no field 'nope'") as e:
        prepare.run([f"files:{tmp_path}/x.parquet,field=nope"], str(d / "tok"), str(tmp_path / "bad"),
                    seq_len=16, workers=0, progress=False)
    assert "\n" not in str(e.value)


def test_source_spec_parsing():
    s = sources.parse("fineweb-edu,weight=2")
    assert (s.kind, s.target, s.opts["config"], s.weight) == ("hf", "HuggingFaceFW/fineweb-edu", "sample-350BT", 2)
    with pytest.raises(shards.DataError, match="kind must be"):
        sources.parse("s3://bucket/x")
    with pytest.raises(shards.DataError, match="no files match"):
        sources.local_files("/nonexistent/*.jsonl")


def test_uint32_for_large_vocab():
    assert shards.dtype_for_vocab(128256) == "uint32" and shards.dtype_for_vocab(65536) == "uint16"


def test_fineweb_alias_streams_from_the_hub(corpus, tmp_path, monkeypatch):
    import datasets
    d, docs, hf = corpus
    calls = []

    def fake_load(path, name=None, split=None, revision=None, streaming=False, **kw):  # stands in for the hub
        calls.append((path, name, split, streaming))
        return [{"text": t, "id": i, "score": 3.0} for i, t in enumerate(docs[:20])]
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    idx = prepare.run(["fineweb-edu"], str(d / "tok"), str(tmp_path / "fw"), seq_len=16, max_tokens=64,
                      heldout_frac=0.0, workers=0, progress=False)
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-350BT", "train", True)
    assert idx["splits"]["train"]["tokens"] == 64
