"""Check a data set before a long run: every shard's size and sha256 against index.json, and optionally that a
tokenizer matches the one the data was made with.

    python -m data_prep.verify data/fineweb-edu [--tokenizer meta-llama/Llama-3.1-8B --who teacher]

Prints one line: "ok: ..." (exit 0) or "error: <what is wrong and the command that fixes it>" (exit 1).
Cost: reads every byte once (sha256 at ~1 GB/s: ~2 min for 50B uint32 tokens).
"""
import argparse
import sys

from distillery import shards


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("--tokenizer", default=None, help="hub id or path of a tokenizer that must match")
    ap.add_argument("--who", default="student", help="whose tokenizer it is (for the message)")
    a = ap.parse_args(argv)
    try:
        index = shards.verify_all(a.data_dir)
        if a.tokenizer:
            shards.check_tokenizer(index, a.tokenizer, who=a.who, data_dir=a.data_dir)
    except shards.DataError as e:
        print(f"error: {e}")
        return 1
    summary = ", ".join(f"{k} {v['tokens']:,} tok" for k, v in index["splits"].items())
    print(f"ok: {a.data_dir}: {index['tokenizer']['name']} ({index['dtype']}), {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
