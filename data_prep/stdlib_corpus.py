"""The offline corpus's text: the Python standard library's own sources (training side) and two out-of-domain
sets (its English docs, its C headers), from this Python installation, no network. A leaf module (no data_prep
imports): sources.py reads it for the `offline` source, offline.py and evalsets.py build from it."""
import glob
import os
import sysconfig


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def all_documents(max_bytes=None):
    """The stdlib .py sources in a fixed order, exact duplicates dropped (train/held-out is decided later, by
    content hash, in the pipeline). max_bytes caps the total text, for quick test corpora."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        # prune while walking: site-packages can hold 10x the stdlib's files (1 s of globbing for nothing)
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "pydoc_data", "__pycache__")]
        files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    files.sort()
    seen, total = set(), 0
    for p in files:
        text = read_text(p)
        if not text.strip() or text in seen:
            continue
        if max_bytes and total >= max_bytes:
            return
        seen.add(text)
        total += len(text)
        yield text


def ood_sets():
    """Out-of-domain evaluation streams: English prose and C, neither of which is in training."""
    from pydoc_data.topics import topics
    sets = {"ood_english": [topics[k] for k in sorted(topics)]}
    include = sysconfig.get_paths().get("include")
    headers = sorted(glob.glob(os.path.join(include, "**", "*.h"), recursive=True)) if include else []
    if headers:
        sets["ood_c"] = [read_text(p) for p in headers]
    return sets
