"""Writes that are never seen half-done: write under a temporary name next to the target, then rename.

os.replace is atomic on POSIX within one filesystem, so a reader (or a resumed run) sees the old file or the new one,
never a prefix. A failed write removes its temporary file or directory. This is the only place the project does it.
"""
import contextlib
import json
import os
import shutil


def tmp_name(path):
    """The temporary sibling of `path` for this process (data_prep sweeps `*.tmp-*` leftovers of killed runs)."""
    return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write a file *or a directory* into; renamed onto `path` on success (an existing
    directory at `path` is replaced), removed on failure."""
    tmp = tmp_name(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    _remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        os.remove(p)


def write_bytes(path, data):
    """Bytes to `path`, flushed to disk (fsync) before the rename, so a crash never leaves a complete-looking file
    with missing data."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path, text):
    write_bytes(path, text.encode())


def write_json(path, obj, indent=1):
    write_text(path, json.dumps(obj, indent=indent))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path, record):
    """One JSON object per line, appended (a line is written with one write call, so readers never see half)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """All records of a JSONL file. A torn last line (a run killed mid-write) is skipped; a bad line elsewhere is
    corruption and raises."""
    with open(path) as f:
        lines = [ln for ln in (line.strip() for line in f) if ln]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return out
