"""Writes that are never seen half-done: write under a temporary name next to the target, then rename.

os.replace is atomic on POSIX within one filesystem, so a reader (or a resumed run) sees the old file or the new one,
never a prefix. A failed write removes its temporary file or directory. This is the only place the project does it.
"""
import contextlib
import errno
import json
import os
import re
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


TMP_RE = re.compile(r"\.tmp-(\d+)$")   # tmp_name's suffix


def sweep(root, note=print):
    """Remove the temporaries (`<name>.tmp-<pid>`, files or directories, at any depth under root) of writes whose
    process is gone: a write killed mid-way (SIGKILL during an export) leaves one for ever otherwise. Call it as
    root's only writer (train.py: rank 0 under the run lock); a temporary of a live process on this host is left
    alone. `note` gets one line per removal. Returns the removed paths."""
    removed = []
    for parent, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            m = TMP_RE.search(name)
            if m and not _pid_alive(int(m.group(1))):
                _remove(os.path.join(parent, name))
                removed.append(os.path.join(parent, name))
                note(f"removed {removed[-1]}, left by a write killed earlier")
        dirs[:] = [d for d in dirs if os.path.join(parent, d) not in removed]
    return removed


def _pid_alive(pid):
    """True if `pid` is a live process on this host (our own pid: a temporary we are not writing yet is stale)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


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


# ---------------------------------------------------------------------------- failed writes
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 16 << 20   # bytes: a write that failed with less than this free on its filesystem ran out of space
# torch.save's zip writer (caffe2 inline_container.cc) reports a failed write as a RuntimeError without an errno:
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", "basic_ios::clear: iostream error",
# "PytorchStreamWriter failed writing file data/0: file write failed" (all seen or in torch 2.13's source)
TORCH_WRITE = re.compile(r"inline_container|PytorchStreamWriter|iostream error|file write failed|unexpected pos")


def free_bytes(path):
    """Bytes free to this user on the filesystem holding `path` (or its nearest existing parent); None where the
    filesystem does not say (statvfs fails, or it reports a total of 0, as some FUSE and object-store mounts do)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        u = shutil.disk_usage(p)
    except OSError:
        return None
    return u.free if u.total > 0 else None


def write_failure(e, path):
    """(no_space, what) for an exception raised while writing under the directory `path`, or None when it is not a
    failed write (a bug: let it keep its traceback). An OSError says what by its errno. A RuntimeError (torch's zip
    writer) has none: it is "no space" when the filesystem is (nearly) full right after the failure, a failed write
    when its text is one of torch's writer errors, else not a write failure. Measure before removing the partial
    files: removing them frees the space."""
    if isinstance(e, OSError):
        if e.errno in NO_SPACE:
            return True, f"no space left on {path}"
        where = f" ({e.filename})" if e.filename else ""
        return False, f"cannot write {path}: {e.strerror or e}{where}"
    if isinstance(e, RuntimeError):
        msg = " ".join(str(e).split())[:200]
        free = free_bytes(path)
        if free is not None and free < LOW_SPACE:
            return True, f"no space left on {path} ({free} bytes free; the write failed with: {msg})"
        if TORCH_WRITE.search(msg):
            return False, f"cannot write {path}: torch's writer failed: {msg}"
    return None
