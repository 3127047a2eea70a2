"""One writer per run directory: <run_dir>/.lock names the holder (host, pid, start time).

    with RunLock(cfg.run_dir):        # rank 0, before anything is written into the run directory
        ...train...

The lock appears atomically with its content (written to a unique temporary file, then hard-linked to .lock, which
fails if .lock exists: O_CREAT|O_EXCL semantics, also on NFS; O_CREAT|O_EXCL itself where links are unsupported).
A second run on the same directory gets a one-line ConfigError naming the holder and the fix. A lock left by a dead
process on this host (pid gone, or the pid now belongs to a younger process) is taken over with a one-line note. A
lock held from another host is respected: this host cannot see its processes; the message says how to remove it.
Released on exit, on exceptions, and only if it is still ours. Once held, the temporaries of writes killed earlier
(`<name>.tmp-<pid>`, e.g. an export killed mid-way) are removed (atomic.sweep). A lock that cannot be written (a
full disk) is a one-line TrainingError.
"""
import json
import os
import socket
import sys
import time
import uuid

from distillery import atomic
from distillery.errors import ConfigError, TrainingError

LOCK_NAME = ".lock"


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_start(pid):
    """Start time of pid in clock ticks since boot (Linux), or None: tells a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    return True


def holder_is_dead(info):
    """True only when the holder was on this host and is certainly gone (a lock from another host: False)."""
    if info.get("host") != socket.gethostname():
        return False
    if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
        return True  # the machine rebooted since
    pid = info.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    start = info.get("proc_start")
    return start is not None and _proc_start(pid) not in (None, start)  # the pid was reused


def read_lock(path):
    """The holder info of a lock file, {} if it is unreadable (torn by a crash, edited)."""
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """Exclusive lock on a run directory for the life of a `with` block (or acquire()/release())."""

    def __init__(self, run_dir, name=LOCK_NAME, note=None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, name)
        self.note = note or (lambda msg: print(f"note: {msg}", file=sys.stderr, flush=True))
        self.info = None

    def _describe(self, info):
        since = info.get("started", "?")
        return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {since})"

    def _create(self, info):
        """Atomically create the lock with `info` as its content; False if it exists. A write that fails (a full
        disk) is a one-line TrainingError, with nothing left behind."""
        tmp = f"{self.path}.{info['token']}"
        try:
            atomic.write_json(tmp, info)
        except OSError as e:
            no_space, what = atomic.write_failure(e, self.run_dir)
            fix = "free space there (or move out_dir), then rerun" if no_space else "fix the directory, then rerun"
            raise TrainingError(f"cannot lock run directory {self.run_dir}: {what}; {fix}") from None
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL create, then the content
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            atomic._remove(tmp)

    def acquire(self):
        os.makedirs(self.run_dir, exist_ok=True)
        pid = os.getpid()
        info = {"host": socket.gethostname(), "pid": pid, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "proc_start": _proc_start(pid), "boot_id": _boot_id(), "argv": sys.argv[:8],
                "token": uuid.uuid4().hex}
        for _ in range(3):  # a takeover race with another starter: try again, then give up with its name
            if self._create(info):
                self.info = info
                atomic.sweep(self.run_dir, self.note)  # now the only writer: leftovers of killed writes go
                return self
            held = read_lock(self.path)
            if not held and time.time() - _mtime(self.path) < 5:
                time.sleep(0.5)  # an O_EXCL-created lock still being written by its holder
                continue
            if held and not holder_is_dead(held):
                if held.get("host") == socket.gethostname():
                    raise ConfigError(f"run directory {self.run_dir} is in use by {self._describe(held)}; wait "
                                      f"for that run to end, or pick another name=")
                raise ConfigError(f"run directory {self.run_dir} is locked by {self._describe(held)}, another "
                                  f"host; pick another name=, or if that run is dead remove {self.path}")
            self._take_over(held)
        raise ConfigError(f"could not lock run directory {self.run_dir}: {self.path} keeps changing (another run is "
                          f"starting there); pick another name=")

    def _take_over(self, held):
        """Remove a dead holder's lock; a lock that changed in between (a new holder) is put back untouched."""
        stale = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        if read_lock(stale) != held:  # someone else's fresh lock got between our read and our rename
            try:
                os.link(stale, self.path)
            except FileExistsError:
                pass
            os.remove(stale)
            return
        os.remove(stale)
        what = self._describe(held) if held else "an unreadable lock"
        self.note(f"taking over the lock of {self.run_dir} from {what}, which is no longer running")

    def release(self):
        if self.info is None:
            return
        if read_lock(self.path).get("token") == self.info["token"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.info = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0
