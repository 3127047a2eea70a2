"""Each eval recipe on a tiny local fixture in its hub dataset's real schema (no hub here); the hub path is the same
datasets.load_dataset(streaming=True) call with the hub id."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import encode, evalsets, prepare
from distillery import shards

# rows in each dataset's schema, and the text the paper's recipe makes of them (written out by hand, not by the
# code under test)
FIX = {
    "c4": ([{"text": "Beginners BBQ Class.", "timestamp": "2019-04-25 12:57:54", "url": "https://a.b/c"},
            {"text": "Discussion in 'Mac OS X Lion' started.", "timestamp": "2019-04-21", "url": "https://x.y"}],
           ["Beginners BBQ Class.", "Discussion in 'Mac OS X Lion' started."]),
    "wikitext": ([{"text": " = Valkyria Chronicles III = \n"}, {"text": ""}, {"text": " Senjō no Valkyria 3 \n"}],
                 [" = Valkyria Chronicles III = \n", " Senjō no Valkyria 3 \n"]),
    "cnn_dailymail": ([{"article": "LONDON (CNN) -- Harry Potter star.", "highlights": "Radcliffe gets £20M",
                        "id": "42c027e4"}], ["LONDON (CNN) -- Harry Potter star."]),
    "dm_mathematics": ([{"question": "Solve -282*d + 929 - 178 = -1277 for d.\n", "answer": "7\n"}],
                       ["Solve -282*d + 929 - 178 = -1277 for d.\n7"]),
    "gsm8k": ([{"question": "Natalia sold clips to 48 friends?", "answer": "48/2 = 24\n#### 72"}],
              ["Natalia sold clips to 48 friends?\n\n48/2 = 24\n#### 72"]),
    "arxiv": ([{"id": "0704.0001", "submitter": "Pavel", "authors": "C. Balázs", "title": "QCD",
                "comments": "37 pages", "journal-ref": None, "doi": None, "report-no": None,
                "categories": ["hep-ph"], "versions": ["v1"],
                "abstract": "  A fully differential calculation in perturbative QCD.\n"}],
              ["A fully differential calculation in perturbative QCD."]),
    "humaneval": ([{"task_id": "HumanEval/0", "prompt": "def f(x):\n    \"\"\"Double.\"\"\"\n",
                    "canonical_solution": "    return 2 * x\n", "test": "assert f(1) == 2", "entry_point": "f"}],
                  ["def f(x):\n    \"\"\"Double.\"\"\"\n    return 2 * x\n"]),
    "codesearchnet": ([{"repository_name": "a/b", "func_path_in_repository": "m.py", "func_name": "g",
                        "whole_func_string": "def g():\n    \"\"\"Return one.\"\"\"\n    return 1",
                        "language": "python", "func_code_string": "def g():\n    return 1",
                        "func_code_tokens": ["def", "g"], "func_documentation_string": "Return one.",
                        "func_documentation_tokens": ["Return", "one"], "split_name": "test",
                        "func_code_url": "https://github.com/a/b"}],
                      ["Return one.\n\ndef g():\n    return 1"]),
    "pubmed_qa": ([{"pubid": 21645374, "question": "Do mitochondria play a role?",
                    "context": {"contexts": ["Programmed cell death."], "labels": ["BACKGROUND"],
                                "meshes": ["Apoptosis"], "reasoning_required_pred": ["yes"],
                                "reasoning_free_pred": ["yes"]},
                    "long_answer": "Results depicted mitochondrial involvement.", "final_decision": "yes"}],
                  ["Do mitochondria play a role?\nResults depicted mitochondrial involvement."]),
    "echr": ([{"text": ["11. At the beginning of the events.", "12. The applicant complained."], "labels": [3]}],
             ["11. At the beginning of the events.\n12. The applicant complained."]),
    "xquad_de": ([{"id": "56beb4343aeaaa14008c925c", "context": "Die Panthers hatten 24 Sacks.",
                   "question": "Wie viele Sacks?", "answers": {"text": ["24", "vierundzwanzig"],
                                                               "answer_start": [20, 20]}}],
                 ["Die Panthers hatten 24 Sacks.\nWie viele Sacks?\n24"]),
}


@pytest.fixture(scope="module")
def tok():
    texts = [t for rows, want in FIX.values() for t in want] * 3
    return prepare.wrap_bpe(prepare.train_bpe(texts, 400))


def write(tmp_path, name, rows, fmt):
    p = tmp_path / f"{name}.{fmt}"
    if fmt == "jsonl":
        with open(p, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), p)
    return str(p)


def decode(tok, ids):
    return tok.backend_tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def test_every_recipe_on_its_schema(tmp_path, tok):
    local = {n: write(tmp_path, n, rows, "parquet" if i % 2 else "jsonl") for i, (n, (rows, _)) in
             enumerate(FIX.items())}
    index = evalsets.build(tok, str(tmp_path / "ev"), list(FIX), local, progress=False)
    for name, (rows, want) in FIX.items():
        got = shards.load_stream(str(tmp_path / "ev"), name)
        assert decode(tok, got) == evalsets.JOIN.join(want), name
        assert index["splits"][name]["documents"] == len(want)
    assert shards.verify_all(str(tmp_path / "ev"))["tokenizer"]["vocab_hash"] == shards.vocab_hash(tok)
    assert set(evalsets.RECIPES) >= {f"xquad_{l}" for l in evalsets.XQUAD_LANGS} and len(evalsets.XQUAD_LANGS) == 12


def test_fineweb_heldout_only_and_token_cap(tmp_path, tok):
    docs = [f"Educational page number {i} about photosynthesis and light." for i in range(400)]
    rows = [{"text": t, "id": f"<urn:{i}>", "dump": "CC-MAIN-2024-10", "url": "u", "file_path": "f",
             "language": "en", "language_score": 0.9, "token_count": 12, "score": 3.1, "int_score": 3}
            for i, t in enumerate(docs)]
    local = {"fineweb_edu": write(tmp_path, "fw", rows, "parquet")}
    evalsets.build(tok, str(tmp_path / "ev"), ["fineweb_edu"], local, heldout_frac=0.05, progress=False)
    held = [t for t in docs if encode.heldout_by_hash(t, 0.05)]
    assert 0 < len(held) < 60
    got = decode(tok, shards.load_stream(str(tmp_path / "ev"), "fineweb_edu"))
    assert got == evalsets.JOIN.join(held)  # exactly the documents prepare.py holds out at the same frac
    evalsets.build(tok, str(tmp_path / "cap"), ["fineweb_edu"], local, max_tokens=50, heldout_frac=0.05,
                   progress=False)
    capped = shards.load_stream(str(tmp_path / "cap"), "fineweb_edu")
    assert len(capped) == 50
    assert np.array_equal(capped, shards.load_stream(str(tmp_path / "ev"), "fineweb_edu")[:50])


def test_schema_mismatch_and_unknown_set_are_one_line(tmp_path, tok):
    bad = write(tmp_path, "bad", [{"q": "x", "a": "y"}], "jsonl")
    with pytest.raises(shards.DataError, match="gsm8k: row lacks") as e:
        evalsets.build(tok, str(tmp_path / "ev"), ["gsm8k"], {"gsm8k": bad}, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(shards.DataError, match="unknown eval set 'lambada'"):
        evalsets.build(tok, str(tmp_path / "ev"), ["lambada"], progress=False)


def test_existing_dir_with_other_tokenizer_is_refused(tmp_path, tok):
    p = write(tmp_path, "g", FIX["gsm8k"][0], "jsonl")
    evalsets.build(tok, str(tmp_path / "ev"), ["gsm8k"], {"gsm8k": p}, progress=False)
    other = prepare.wrap_bpe(prepare.train_bpe(["something else entirely"] * 5, 300))
    with pytest.raises(shards.DataError, match="eval tokenizer .* does not match"):
        evalsets.build(other, str(tmp_path / "ev"), ["gsm8k"], {"gsm8k": p}, progress=False)


def test_cli_with_local_file_and_offline_ood(tmp_path, tok, capsys):
    tok.save_pretrained(str(tmp_path / "tok"))
    p = write(tmp_path, "h", FIX["humaneval"][0], "jsonl")
    evalsets.main(["--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "ev"), "--sets",
                   "humaneval,offline_ood_english", "--local", f"humaneval={p}", "--max_tokens", "2000"])
    idx = shards.read_index(str(tmp_path / "ev"))
    assert idx["splits"]["offline_ood_english"]["tokens"] == 2000
    assert decode(tok, shards.load_stream(str(tmp_path / "ev"), "humaneval")) == FIX["humaneval"][1][0]
    with pytest.raises(shards.DataError, match="unknown eval set"):
        evalsets.main(["--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "ev"), "--sets", "nope"])


def test_hub_path_asks_for_the_recipe_dataset(tmp_path, tok, monkeypatch):
    import datasets
    calls = []

    def fake_load(path, name=None, split=None, streaming=False, **kw):  # stands in for the hub
        calls.append((path, name, split, streaming))
        return FIX["xquad_de"][0]
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    evalsets.build(tok, str(tmp_path / "ev"), ["xquad_de"], progress=False)
    assert calls == [("google/xquad", "xquad.de", "validation", True)]
    assert decode(tok, shards.load_stream(str(tmp_path / "ev"), "xquad_de")) == FIX["xquad_de"][1][0]
