"""The paper's perplexity sets as token streams, tokenised with the run's tokenizer.

    python -m data_prep.evalsets --tokenizer data/fineweb-edu/tokenizer --out data/evals [--sets c4,gsm8k,...]
        [--local gsm8k=tests/fixtures/gsm8k.jsonl ...] [--max_tokens 1048576]

Each set: stream its dataset (hub id/config/split below, or a local file in the same schema via --local), turn
each row into text with the set's recipe, join the texts with a blank line ("\n\n"), tokenise the joined text
once without special tokens, keep the first --max_tokens tokens (default 256 windows x 4096 = the paper's cap).
Output is a data directory of 'stream' splits (format: distillery/shards.py) that eval/ppl.py reads.

Recipes (from the paper's notes; * = the split or the text joiner is not stated there and is our choice):
    fineweb_edu   HuggingFaceFW/fineweb-edu sample-350BT train*   text, only documents held out by
                  data_prep.encode.heldout_by_hash at --heldout_frac (the rule prepare.py uses: never trained on)
    c4            allenai/c4 en validation*                         text
    wikitext      Salesforce/wikitext wikitext-103-v1 train          rows joined with a blank line
    cnn_dailymail abisee/cnn_dailymail 3.0.0 test*                  article
    dm_mathematics deepmind/math_dataset algebra__linear_1d test*   question + "\n"* + answer
    gsm8k         openai/gsm8k main test*                           question + blank line + answer
    arxiv         gfissore/arxiv-abstracts-2021 train*               abstract
    humaneval     openai/openai_humaneval test                      prompt + canonical_solution
    codesearchnet code-search-net/code_search_net python test*      docstring + blank line + function
    pubmed_qa     qiaojin/PubMedQA pqa_labeled train                question + "\n"* + long_answer
    echr          coastalcph/lex_glue ecthr_a test*                 the case's facts joined by "\n"*
    xquad_<lang>  google/xquad xquad.<lang> validation (12 langs)   context + "\n"* + question + "\n"* + answers.text[0]
    offline_*     the offline corpus (python stdlib): heldout, ood_english, ood_c (no network needed)
"""
import argparse
import os
import sys

import numpy as np

from data_prep import encode
from distillery import shards
from distillery.errors import cli

XQUAD_LANGS = ["ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"]
JOIN = "\n\n"

# name -> (hub id, config, split, row -> text or None to skip)
RECIPES = {
    "fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-350BT", "train", lambda r: r["text"]),
    "c4": ("allenai/c4", "en", "validation", lambda r: r["text"]),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-v1", "train", lambda r: r["text"]),
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "test", lambda r: r["article"]),
    "dm_mathematics": ("deepmind/math_dataset", "algebra__linear_1d", "test",
                       lambda r: r["question"].rstrip("\n") + "\n" + r["answer"].rstrip("\n")),
    "gsm8k": ("openai/gsm8k", "main", "test", lambda r: r["question"] + "\n\n" + r["answer"]),
    "arxiv": ("gfissore/arxiv-abstracts-2021", None, "train", lambda r: r["abstract"].strip()),
    "humaneval": ("openai/openai_humaneval", None, "test", lambda r: r["prompt"] + r["canonical_solution"]),
    "codesearchnet": ("code-search-net/code_search_net", "python", "test",
                      lambda r: r["func_documentation_string"] + "\n\n" + r["func_code_string"]),
    "pubmed_qa": ("qiaojin/PubMedQA", "pqa_labeled", "train", lambda r: r["question"] + "\n" + r["long_answer"]),
    "echr": ("coastalcph/lex_glue", "ecthr_a", "test", lambda r: "\n".join(r["text"])),
    **{f"xquad_{lang}": ("google/xquad", f"xquad.{lang}", "validation",
                         lambda r: r["context"] + "\n" + r["question"] + "\n" + r["answers"]["text"][0])
       for lang in XQUAD_LANGS},
}
OFFLINE = ["offline_heldout", "offline_ood_english", "offline_ood_c"]


def rows_for(name, local=None):
    """The set's rows: the hub stream, or a local file (jsonl/json/parquet/arrow) in the hub's schema; the
    same datasets streaming loader either way."""
    import datasets
    hub_id, config, split, _ = RECIPES[name]
    if local:
        fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}.get(
            os.path.splitext(local)[1])
        if fmt is None:
            raise shards.DataError(f"--local {name}={local}: use a .jsonl, .parquet or .arrow file")
        return datasets.load_dataset(fmt, data_files=[local], split="train", streaming=True)
    return datasets.load_dataset(hub_id, config, split=split, streaming=True)


def texts_for(name, rows, heldout_frac=0.005):
    fn = RECIPES[name][3]
    for r in rows:
        try:
            t = fn(r)
        except (KeyError, IndexError, TypeError) as e:
            raise shards.DataError(f"eval set {name}: row lacks what the recipe reads ({type(e).__name__}: {e}); "
                                   f"give a file in the schema of {RECIPES[name][0]}") from None
        if name == "fineweb_edu" and not encode.heldout_by_hash(t, heldout_frac):
            continue  # only documents prepare.py held out: the student never trained on them
        if t:
            yield t


def tokenize_joined(tok, texts, max_tokens, chars_per_token_guess=8):
    """Join texts with a blank line and tokenise the joined text once (what the recipe defines), reading only
    as much text as the token cap needs: grow the text until it yields max_tokens or the set runs out."""
    it = iter(texts)
    parts, chars, exhausted = [], 0, False
    budget = max_tokens * chars_per_token_guess
    while True:
        while chars < budget:
            t = next(it, None)
            if t is None:
                exhausted = True
                break
            parts.append(t)
            chars += len(t) + len(JOIN)
        ids = tok.encode(JOIN.join(parts), add_special_tokens=False).ids
        if len(ids) >= max_tokens or exhausted:
            return np.asarray(ids[:max_tokens], dtype=np.int64), len(parts)
        budget *= 2


def build(tokenizer, out, sets, local=None, max_tokens=256 * 4096, heldout_frac=0.005, progress=True, window=4096):
    """Write the sets; each one shorter than `window` tokens (the eval_window runs will use) gets a warning line."""
    from data_prep.prepare import load_tokenizer, warn_small_streams
    local = local or {}
    hf, name = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else (tokenizer, tokenizer.name_or_path)
    tok = hf.backend_tokenizer
    tok.encode_special_tokens = True  # eval text is text: "<|endoftext|>" in a document stays characters
    vocab = hf.get_vocab()
    vocab_size = max(len(hf), max(vocab.values()) + 1)
    dtype = shards.dtype_for_vocab(vocab_size)
    index_path = os.path.join(out, "index.json")
    index = shards.read_index(out) if os.path.isfile(index_path) else {
        "format": shards.FORMAT, "version": shards.VERSION, "dtype": dtype, "vocab_size": vocab_size,
        "eos_id": hf.eos_token_id, "tokenizer": {"name": name, "vocab_hash": shards.vocab_hash(vocab)},
        "source": {"name": "evalsets"}, "splits": {}}
    shards.check_tokenizer(index, {"name": name, "vocab_hash": shards.vocab_hash(vocab), "vocab_size": len(vocab)},
                           who="eval", data_dir=out)
    if not os.path.isdir(os.path.join(out, "tokenizer")):
        hf.save_pretrained(os.path.join(out, "tokenizer"))
    offline_sets = None
    for s in sets:
        if s in index["splits"] and not local.get(s):
            continue  # resumable: a set already written (its index entry is committed) is kept
        if s in OFFLINE:
            if offline_sets is None:
                offline_sets = _offline_texts(heldout_frac=0.03)
            texts, recipe = offline_sets[s], {"dataset": "python stdlib (data_prep.offline)", "text": s}
        elif s in RECIPES:
            texts = texts_for(s, rows_for(s, local.get(s)), heldout_frac)
            hub_id, config, split, _ = RECIPES[s]
            recipe = {"dataset": local.get(s) or hub_id, "config": config, "split": split}
        else:
            raise shards.DataError(f"unknown eval set {s!r}; known: {', '.join(list(RECIPES) + OFFLINE)}")
        ids, n_docs = tokenize_joined(tok, texts, max_tokens)
        if len(ids) == 0:
            raise shards.DataError(f"eval set {s} is empty; check its source")
        os.makedirs(os.path.join(out, s), exist_ok=True)
        rel = f"{s}/00000.bin"
        entry = shards.write_tokens(os.path.join(out, rel), ids, dtype)
        index["splits"][s] = {"kind": "stream", "tokens": int(len(ids)), "documents": n_docs,
                              "recipe": recipe, "files": [{"path": rel, **entry}]}
        shards.atomic_write_json(index_path, index)  # commit per set: a killed run keeps finished sets
        if progress:
            print(f"{s}: {len(ids):,} tokens from {n_docs:,} texts", file=sys.stderr)
    warn_small_streams({"splits": {s: index["splits"][s] for s in sets if s in index["splits"]}}, out, window,
                       "one evaluation window")
    return index


def _offline_texts(heldout_frac):
    from data_prep import stdlib_corpus
    held = [t for t in stdlib_corpus.all_documents() if encode.heldout_by_hash(t, heldout_frac)]
    ood = stdlib_corpus.ood_sets()
    return {"offline_heldout": held, "offline_ood_english": ood["ood_english"],
            "offline_ood_c": ood.get("ood_c", [])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tokenizer", required=True, help="the run's tokenizer: hub id or local path")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sets", default="all", help="comma list, 'all', 'paper' or 'offline'")
    ap.add_argument("--local", action="append", default=[], help="NAME=FILE: read set NAME from a local file")
    ap.add_argument("--max_tokens", type=int, default=256 * 4096)
    ap.add_argument("--heldout_frac", type=float, default=0.005, help="must equal the prepare.py run's")
    ap.add_argument("--window", type=int, default=4096, help="the runs' eval_window: a set shorter than this is "
                                                             "reported (a run evaluating on it is refused)")
    a = ap.parse_args(argv)
    groups = {"paper": list(RECIPES), "offline": OFFLINE, "all": list(RECIPES) + OFFLINE}
    sets = [x for part in a.sets.split(",") for x in groups.get(part, [part])]
    bad = [kv for kv in a.local if "=" not in kv]
    if bad:
        raise shards.DataError(f"--local {bad[0]!r} is not NAME=FILE (e.g. --local humaneval=he.jsonl)")
    build(a.tokenizer, a.out, sets, dict(kv.split("=", 1) for kv in a.local), a.max_tokens, a.heldout_frac,
          window=a.window)


if __name__ == "__main__":
    cli(main)
