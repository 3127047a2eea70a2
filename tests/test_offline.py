import glob
import os

import numpy as np
import pytest

from data_prep import encode, offline
from distillery import sampler, shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("off") / "offline")
    offline.main(["--out", out, "--max_train_mb", "0.5", "--vocab_size", "600", "--seq_len", "64",
                  "--workers", "1"])
    return out


def files(out):
    return {os.path.relpath(p, out): open(p, "rb").read()
            for p in sorted(glob.glob(f"{out}/**/*.bin", recursive=True)) + [f"{out}/index.json"]}


def test_layout_and_names(built):
    idx = shards.verify_all(built)
    assert {"train", "heldout", "ood_english"} <= set(idx["splits"]) and idx["splits"]["train"]["kind"] == "rows"
    assert idx["tokenizer"]["name"] == "offline-bpe-600" and idx["vocab_size"] == 600 and idx["dtype"] == "uint16"
    assert idx["splits"]["train"]["seq_len"] == 64 and len(shards.TokenRows(built)) > 100
    assert idx["source"]["name"] == "offline"
    assert not os.path.exists(os.path.join(built, "progress.json"))


def test_tokenizer_dir_is_a_hf_tokenizer_matching_the_index(built):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(built, "tokenizer"))
    assert tok.eos_token == offline.EOS and tok.eos_token_id == shards.read_index(built)["eos_id"]
    ident = shards.check_tokenizer(built, os.path.join(built, "tokenizer"), who="student")
    assert ident["name"] == "offline-bpe-600"
    shards.check_tokenizer(built, tok, who="teacher")
    rows = sampler.RankReader(built, seed=42, student_tokenizer=tok).batch(0, 4)
    assert rows.shape == (4, 64) and rows.max() < 600


def test_ood_text_is_not_trained_on_and_heldout_follows_the_hash(built):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(built, "tokenizer"))
    held = shards.load_stream(built, "heldout")
    docs = [tok.decode(p[:-1]) for p in np.split(held, np.where(held == tok.eos_token_id)[0] + 1) if len(p)]
    want = [d for d in offline.all_documents(int(0.5 * 2 ** 20)) if encode.heldout_by_hash(d, 0.03)]
    assert docs == want and shards.read_index(built)["splits"]["heldout"]["documents"] == len(want)
    train_text = tok.decode(np.asarray(shards.TokenRows(built).maps[0][:20000]).tolist())
    assert "def " in train_text  # python source
    eng = offline.ood_sets()["ood_english"]
    assert not any(e[:200] in train_text for e in eng[:50])


def test_rebuild_is_a_noop_and_deterministic(built, tmp_path):
    before = files(built)
    offline.build(built, vocab_size=600, seq_len=64, max_train_bytes=int(0.5 * 2 ** 20), progress=False)
    assert files(built) == before  # already built: untouched
    offline.build(str(tmp_path / "again"), vocab_size=600, seq_len=64, max_train_bytes=int(0.5 * 2 ** 20),
                  workers=0, progress=False)
    assert files(str(tmp_path / "again")) == before  # same bytes, other worker count
