"""One writer per run directory: distillery/runlock.py."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, clean_env

from distillery.errors import ConfigError
from distillery.runlock import LOCK_NAME, RunLock, _proc_start, read_lock


def lock_file(d):
    return os.path.join(d, LOCK_NAME)


def write_lock(d, **info):
    os.makedirs(d, exist_ok=True)
    with open(lock_file(d), "w") as f:
        json.dump(info, f)


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_holds_host_pid_start_and_is_released(tmp_path):
    d = str(tmp_path / "run")
    with RunLock(d) as lock:
        info = read_lock(lock_file(d))
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid() and info["started"]
        assert info["token"] == lock.info["token"]
        assert os.listdir(d) == [LOCK_NAME]  # no temporary files left next to it
    assert not os.path.exists(lock_file(d))


def test_released_on_exception(tmp_path):
    d = str(tmp_path / "run")
    with pytest.raises(KeyError):
        with RunLock(d):
            raise KeyError("boom")
    assert not os.path.exists(lock_file(d))
    with RunLock(d):  # and can be taken again
        pass


def test_second_run_same_host_is_refused_with_holder_and_fix(tmp_path):
    d = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from distillery.runlock import RunLock; "
                               f"l = RunLock({d!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"run directory {d} is in use by pid {holder.pid} on host "
                                              rf"{socket.gethostname()} \(since .*\); wait for that run to end, "
                                              r"or pick another name=") as e:
            RunLock(d).acquire()
        assert "\n" not in str(e.value)
        assert read_lock(lock_file(d))["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()
    notes = []
    with RunLock(d, note=notes.append):  # its holder was killed: a stale lock, taken over
        assert read_lock(lock_file(d))["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "no longer running" in notes[0]


def test_same_process_twice_is_refused(tmp_path):
    d = str(tmp_path / "run")
    with RunLock(d):
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
            RunLock(d).acquire()
        assert os.path.exists(lock_file(d))  # the failed attempt did not release ours
    assert not os.path.exists(lock_file(d))


@pytest.mark.parametrize("kind", ["dead_pid", "reused_pid", "rebooted", "unreadable"])
def test_stale_lock_on_this_host_is_taken_over(tmp_path, kind):
    d = str(tmp_path / "run")
    host = socket.gethostname()
    if kind == "dead_pid":
        write_lock(d, host=host, pid=dead_pid(), started="x")
    elif kind == "reused_pid":  # our own (live) pid, but recorded with another process start time
        write_lock(d, host=host, pid=os.getpid(), started="x", proc_start=_proc_start(os.getpid()) - 1)
    elif kind == "rebooted":
        write_lock(d, host=host, pid=os.getpid(), started="x", boot_id="another-boot")
    else:
        os.makedirs(d)
        open(lock_file(d), "w").write("{torn")
        old = time.time() - 60
        os.utime(lock_file(d), (old, old))
    notes = []
    with RunLock(d, note=notes.append):
        assert read_lock(lock_file(d))["pid"] == os.getpid()
    assert len(notes) == 1 and "\n" not in notes[0] and "taking over the lock" in notes[0]
    assert not os.path.exists(lock_file(d)) and os.listdir(d) == []


def test_lock_from_another_host_is_respected(tmp_path):
    d = str(tmp_path / "run")
    write_lock(d, host="node-17", pid=dead_pid(), started="2026-01-01T00:00:00")
    with pytest.raises(ConfigError, match=rf"locked by pid \d+ on host node-17 .*another host; pick another name=, "
                                          rf"or if that run is dead remove {lock_file(d)}") as e:
        RunLock(d).acquire()
    assert "\n" not in str(e.value) and read_lock(lock_file(d))["host"] == "node-17"


def test_release_never_removes_someone_elses_lock(tmp_path):
    d = str(tmp_path / "run")
    lock = RunLock(d).acquire()
    write_lock(d, host="node-17", pid=1, token="theirs")  # e.g. removed by hand and taken by another run
    lock.release()
    assert read_lock(lock_file(d))["token"] == "theirs"


def test_full_disk_is_one_line_and_leaves_nothing(small_fs):
    """Issue 24 (1): on a full filesystem the lock cannot be written: a one-line error naming the fix, not an
    ENOSPC traceback, and no temporary lock file left behind."""
    from harness import fill
    from distillery.errors import TrainingError
    d = small_fs / "run"
    d.mkdir()
    fill(small_fs)
    with pytest.raises(TrainingError, match=r"cannot lock run directory .*/run: no space left on .*/run; free "
                                            r"space there \(or move out_dir\), then rerun") as e:
        RunLock(str(d)).acquire()
    assert "\n" not in str(e.value)
    assert os.listdir(d) == []
    os.remove(small_fs / "filler")
    with RunLock(str(d)):
        assert os.path.isfile(lock_file(d))


def test_stale_temporaries_of_killed_writes_are_swept(tmp_path):
    """Issue 24 (9): a write killed mid-way (SIGKILL during the export) leaves <name>.tmp-<pid>; the next holder of
    the lock, the only writer of the directory, removes such leftovers with one note each."""
    d = tmp_path / "run"
    dead, live = dead_pid(), os.getppid()
    (d / f"export.tmp-{dead}").mkdir(parents=True)
    (d / f"export.tmp-{dead}" / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "eval").mkdir()
    (d / "eval" / f"final.json.tmp-{dead}").write_text("{")
    (d / "config.yaml").write_text("a: 1\n")
    (d / "keep.tmp-notapid").write_text("x")
    (d / f"other.tmp-{live}").write_text("x")  # a live process's write in progress (another tool): left alone
    notes = []
    with RunLock(str(d), note=notes.append):
        assert sorted(os.listdir(d)) == [".lock", "config.yaml", "eval", "keep.tmp-notapid", f"other.tmp-{live}"]
        assert os.listdir(d / "eval") == []
    assert len(notes) == 2 and all("removed" in n and "left by a write killed earlier" in n for n in notes), notes
