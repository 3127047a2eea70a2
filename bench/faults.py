"""Fault scenarios, end to end through the real entry points (issue 9, item 7): each one is run, checked, and put in
one row of a table (docs/reliability.md, "Fault scenarios end to end (measured)").

    python bench/faults.py                              # every scenario (~8 min on 2 shared CPU cores)
    python bench/faults.py --only preempt_sigusr1,disk_full_save
    python bench/faults.py --list                       # names and what each one does
    python bench/faults.py --work /tmp/faults --keep    # keep the run directories for a look

Each scenario drives `python train.py ...` (one rank) or `python -m deepspeed.launcher.runner --num_gpus 2 ...` (two
CPU ranks, gloo) in subprocesses on a tiny setup (micro student, micro random teacher, 8 rows of 64 tokens per step,
16 steps, a checkpoint every 4, keep_last 3) and checks the outcome the issue asks for: either the run resumes (or
completes) with final weights (export/model.safetensors) bit-identical to an uninterrupted run of the same config,
losing at most one checkpoint interval of optimizer steps, or it stops with a one-line error before anything in the
run directory is overwritten. Every row says: survived (resumed exactly / completed exactly / resumed, change applied /
refused cleanly / FAILED), optimizer steps lost (steps the interrupted process finished minus the step the next one
resumed from), and whether the final weights equal the uninterrupted run's (n.a. where no run finishes, or where the
scenario changes the math on purpose). Ends with one JSON line {scenario: {survived, steps_lost, weights_equal}}.

tests/test_faults.py runs the same functions (one test per scenario; the ones that train behind -m slow).
"""
import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.harness import fill  # noqa: E402  (the full-disk tests' filler, shared)

PY = sys.executable
STEPS, SAVE, KEEP = 16, 4, 3          # optimizer steps of the reference run, checkpoint interval, keep_last
ROWS, SEQ = 8, 64                     # global batch (rows), row length of the data set built here
TIMEOUT = 900                         # seconds for any one training process (2 shared cores, two ranks)
# The run every scenario varies: KD from the micro teacher, every step logged (so steps lost can be counted from
# metrics.jsonl), no evaluation (it changes no weight), only the progress callback (its lines pace the signals).
TRAIN = ["student=micro", "micro_batch_size=4", f"global_batch_size={ROWS}", "log_interval=1", "lr=3e-3",
         f"train_tokens={STEPS * ROWS * SEQ}", "alpha=0.4", "eval_interval=-1", "callbacks=[progress]",
         f"save_interval={SAVE}", f"keep_last={KEEP}"]
EXIT_PREEMPTED = 75                   # distillery.errors.Preempted.exit_code
EXIT_ERROR = 2                        # distillery.errors.cli


# ---------------------------------------------------------------------------- outcome of one scenario
@dataclasses.dataclass
class Problem:
    text: str
    bug: str = ""                     # set when the problem is a known trainer bug (docs/reliability.md lists it)

    def __str__(self):
        return f"{self.text} [known bug: {self.bug}]" if self.bug else self.text


@dataclasses.dataclass
class Outcome:
    scenario: str
    expect: str                       # what surviving means here: "resumed exactly", "refused cleanly", ...
    steps_lost: object = None         # int, or None (n.a.)
    weights_equal: object = None      # True / False, or None (n.a.)
    message: str = ""                 # the one line the user saw (error / stopped / warning / note)
    notes: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def check(self, cond, what, bug=""):
        """Record `what` as a problem unless cond holds; returns cond."""
        if not cond:
            self.problems.append(Problem(what, bug))
        return bool(cond)

    def note(self, what):
        self.notes.append(what)

    @property
    def survived(self):
        return "FAILED" if self.problems else self.expect

    def summary(self):
        return {"survived": self.survived, "steps_lost": self.steps_lost, "weights_equal": self.weights_equal}


# ---------------------------------------------------------------------------- processes
def child_env(pythonpath=REPO):
    """Environment for a trainer subprocess: no process-group variables of a caller, unbuffered output, and
    DS_ACCELERATOR=cpu without CUDA (set in this process too, for the checkpoint tools it imports)."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(pythonpath), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


class Proc:
    """A subprocess in its own session (so a timeout can end it and every child it made), with its stdout and
    stderr read line by line on threads, so a scenario can wait for a line (e.g. `step 3/16`) while it runs."""

    def __init__(self, cmd, cwd=REPO, env=None):
        self.cmd = [str(c) for c in cmd]
        self.p = subprocess.Popen(self.cmd, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        self.pid = self.p.pid
        self.out, self.err = [], []
        self._eof = 0
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _read(self, stream, buf):
        for line in stream:
            with self._cv:
                buf.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._eof += 1
            self._cv.notify_all()

    def wait_line(self, pattern, timeout=TIMEOUT):
        """True once a line of stdout or stderr matches `pattern`; False if the pipes closed or time ran out."""
        rx = re.compile(pattern)
        with self._cv:
            self._cv.wait_for(lambda: any(rx.search(x) for x in self.out + self.err) or self._eof == 2, timeout)
            return any(rx.search(x) for x in self.out + self.err)

    def wait_eof(self, timeout=TIMEOUT):
        """True once every holder of the pipes (this process and whatever it started) has closed them."""
        with self._cv:
            return self._cv.wait_for(lambda: self._eof == 2, timeout)

    def wait(self, timeout=TIMEOUT):
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            rc = self.p.wait(30)
            self.err.append(f"[faults.py: killed after {timeout} s]")
        self.wait_eof(60)
        return rc

    def kill_group(self):
        """SIGKILL this process's session (itself and the ranks it started); for timeouts and cleanup."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def lines(self, prefix, stream="err"):
        return [x for x in (self.err if stream == "err" else self.out) if x.startswith(prefix)]

    def tail(self, n=1500):
        return ("\n".join(self.out) + "\n" + "\n".join(self.err))[-n:]


def run(cmd, timeout=TIMEOUT, **kw):
    p = Proc(cmd, **kw)
    p.rc = p.wait(timeout)
    return p


# ---------------------------------------------------------------------------- files
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


class Snapshot(dict):
    """{relative path: (bytes, sha256)}, plus the text of config.yaml."""
    config = None


def snapshot(run_dir):
    """{relative path: (bytes, sha256)} of every file of a run directory but the lock (released on exit)."""
    out = Snapshot()
    cfg = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            out.config = f.read()
    for root, _, files in os.walk(run_dir):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, run_dir)
            if rel != ".lock":
                out[rel] = (os.path.getsize(p), sha256(p))
    return out


def check_untouched(o, before, run_dir):
    """Nothing that was in the run directory (snapshot `before`) changed or went away; new files are noted. A
    rewritten config.yaml is reported with the keys that changed in it."""
    after = snapshot(run_dir)
    changed = sorted(k for k in before if after.get(k) != before[k])
    if "config.yaml" in changed and before.config is not None:
        import yaml
        from distillery.config import MAY_CHANGE
        old = yaml.safe_load(before.config)
        with open(os.path.join(run_dir, "config.yaml")) as f:
            new = yaml.safe_load(f)
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        o.check(False, "config.yaml was rewritten before the run failed: " +
                ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys),
                bug="config-yaml-overwritten" if set(keys) <= set(MAY_CHANGE) else "")
        changed.remove("config.yaml")
    o.check(not changed, f"files changed or removed by the refused run: {', '.join(changed[:5])}")
    new = sorted(set(after) - set(before))
    if new:
        o.note(f"new files: {', '.join(new[:5])}")
    return not changed


def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def train_steps(run_dir):
    """Steps of metrics.jsonl's training rows, in file order (log_interval=1: one row per finished step, resumed
    runs append)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f) if "loss/total" in r]


def latest_step(run_dir):
    from distillery.checkpoint import read_latest, step_of
    tag = read_latest(os.path.join(run_dir, "checkpoints"))
    return step_of(tag) if tag else None


def checkpoints(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def weights_equal(a_run, b_run):
    """True if both runs' exported weights are bit-identical (None if either has no export)."""
    from safetensors.torch import load_file
    import torch
    pa, pb = (os.path.join(r, "export", "model.safetensors") for r in (a_run, b_run))
    if not (os.path.isfile(pa) and os.path.isfile(pb)):
        return None
    a, b = load_file(pa), load_file(pb)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def copy_run(src_run, dst_out):
    """A copy of a run directory under another out_dir, as if it had been made there (config.yaml's out_dir
    rewritten the way save_config writes it, so a refused rerun leaves it byte for byte)."""
    import yaml
    dst = os.path.join(dst_out, os.path.basename(src_run))
    shutil.copytree(src_run, dst, ignore=shutil.ignore_patterns(".lock"))
    cfg_path = os.path.join(dst, "config.yaml")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    cfg["out_dir"] = str(dst_out)
    with open(cfg_path, "w") as f:
        f.write(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def flip_bytes(path, n=4):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(n)
        f.seek(-len(b), os.SEEK_CUR)
        f.write(bytes(x ^ 0xFF for x in b))


def truncate(path, frac=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * frac))


def ckpt_file(run_dir, step, kind):
    """The file of checkpoint `step` whose name contains `kind` (model_states / optim_states), rank 0's."""
    d = os.path.join(run_dir, "checkpoints", f"step{step:08d}")
    return os.path.join(d, sorted(f for f in os.listdir(d) if kind in f)[0])


# ---------------------------------------------------------------------------- one-line messages
def reached(o, p, pattern, shown):
    """Wait for a line matching pattern (`shown` in the problem if it never comes); on a miss the job is killed.
    -> whether it came: the one way a scenario waits for the moment it acts on."""
    if o.check(p.wait_line(pattern), f"no `{shown}` line: {p.tail()!r}"):
        return True
    p.kill_group()
    return False


def one_line(o, p, prefix, needle=None, rc=EXIT_ERROR):
    """The process exited with rc and printed exactly one `prefix` line (containing needle), no traceback."""
    o.check(p.rc == rc, f"exit status {p.rc}, want {rc}: {p.tail(600)!r}")
    got = p.lines(prefix)
    o.check(len(got) == 1, f"{len(got)} `{prefix}` lines, want 1: {got[:3]!r}")
    o.check(not any("Traceback" in x for x in p.err), "a traceback on stderr")
    if got:
        o.message = got[0]
        if needle:
            o.check(re.search(needle, got[0]) is not None, f"the {prefix} line lacks {needle!r}: {got[0]!r}")
    return got[0] if got else ""


# ---------------------------------------------------------------------------- the environment
class Env:
    """Work directory, the data set and teacher (built once, or given: the tests pass their session fixtures), and
    the runs several scenarios share (uninterrupted references, runs stopped part-way), made on first use."""

    def __init__(self, work, data=None, teacher=None):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._data, self._teacher = data, teacher
        self._cache = {}
        self._n = 0

    @property
    def data(self):
        if self._data is None:
            out = self.work / "data"
            if not (out / "index.json").exists():
                p = run([PY, "-m", "data_prep.offline", "--out", out, "--vocab_size", "512", "--seq_len", str(SEQ),
                         "--max_train_mb", "3"])
                assert p.rc == 0, p.tail()
            self._data = str(out)
        return self._data

    @property
    def teacher(self):
        if self._teacher is None:
            out = self.work / "teacher"
            if not (out / "model.safetensors").exists():
                make_teacher(self.data, out)
            self._teacher = str(out)
        return self._teacher

    def fresh(self, label):
        """A new, empty out_dir."""
        self._n += 1
        d = self.work / f"{self._n:02d}-{label}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def args(self, out_dir, *extra, name="r"):
        return ["--ds_config", REPO / "ds_configs" / "cpu.json", f"data={self.data}", f"out_dir={out_dir}",
                f"name={name}", f"teacher={self.teacher}", *TRAIN, *extra]

    def cmd(self, args, ranks=1):
        if ranks == 1:
            return [PY, REPO / "train.py", *args]
        from distillery.launch import free_port
        return [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                REPO / "train.py", *args]

    def train(self, out_dir, *extra, ranks=1, name="r"):
        return run(self.cmd(self.args(out_dir, *extra, name=name), ranks))

    def start(self, out_dir, *extra, ranks=1, name="r"):
        return Proc(self.cmd(self.args(out_dir, *extra, name=name), ranks))

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def reference(self, ranks=1):
        """Run dir of the uninterrupted run (STEPS steps) on `ranks` ranks."""
        def make():
            out = self.fresh(f"reference-{ranks}rank")
            p = self.train(out, ranks=ranks)
            if p.rc != 0:
                raise RuntimeError(f"the uninterrupted {ranks}-rank reference run failed: {p.tail()}")
            return str(out / "r")
        return self._cached(("ref", ranks), make)

    def partial(self, ranks=1, steps=12):
        """Run dir of the reference config stopped cleanly after `steps` steps (max_steps), checkpoints every SAVE.
        Scenarios copy it (copy_run) and never change it."""
        def make():
            out = self.fresh(f"partial-{ranks}rank-{steps}")
            p = self.train(out, f"max_steps={steps}", ranks=ranks)
            if p.rc != 0:
                raise RuntimeError(f"the {ranks}-rank run of {steps} steps failed: {p.tail()}")
            return str(out / "r")
        return self._cached(("partial", ranks, steps), make)


def make_teacher(data_dir, out, preset="micro", seed=0):
    """A random-init Hugging Face teacher directory sharing the data's tokenizer (as tests/conftest.py makes it)."""
    from distillery.models import save_random_init
    return save_random_init(preset, data_dir, out, SEQ, seed)


def resume_and_compare(env, o, run_dir, done, ranks=1, *extra, max_lost=SAVE):
    """Rerun with resume=auto to the end; steps lost = `done` (steps the interrupted process finished) minus the
    step the rerun resumed from; final weights against the uninterrupted run on as many ranks."""
    n = len(train_steps(run_dir))
    p = env.train(os.path.dirname(run_dir), "resume=auto", *extra, ranks=ranks)
    if not o.check(p.rc == 0, f"resume=auto exited {p.rc}: {p.tail(800)!r}"):
        return p
    steps = train_steps(run_dir)
    o.check(steps and steps[-1] == STEPS, f"the resumed run ended at step {steps[-1] if steps else None}")
    if len(steps) > n:
        o.steps_lost = done - (steps[n] - 1)
        o.check(0 <= o.steps_lost <= max_lost, f"{o.steps_lost} steps lost, at most {max_lost} allowed")
    o.weights_equal = weights_equal(env.reference(ranks), run_dir)
    o.check(o.weights_equal, "final weights differ from the uninterrupted run")
    return p


# ---------------------------------------------------------------------------- scenarios
SCENARIOS = {}


def scenario(name, what, expect, slow=True):
    def deco(fn):
        SCENARIOS[name] = dict(fn=fn, what=what, expect=expect, slow=slow)
        return fn
    return deco


def rank_pids(runner_pid):
    """{local rank: pid} of the train.py processes under a deepspeed runner."""
    import psutil
    out = {}
    for c in psutil.Process(runner_pid).children(recursive=True):
        try:
            cmd = c.cmdline()
        except psutil.Error:
            continue
        if any(a.endswith("train.py") for a in cmd):
            r = [a.split("=", 1)[1] for a in cmd if a.startswith("--local_rank=")]
            if r:
                out[int(r[0])] = c.pid
    return out


def _preempt(env, o, ranks, send, label):
    """Start a run, wait for step 3, `send` the stop, check: exit 75, one `stopped:` line, a checkpoint of every
    finished step, no export; then resume=auto and compare."""
    out = env.fresh(label)
    run_dir = str(out / "r")
    p = env.start(out, ranks=ranks)
    if not reached(o, p, r"^step\s+3/", "step 3/"):
        return
    send(p)
    p.rc = p.wait()
    one_line(o, p, "stopped:", r"stopped by (SIG\w+|a signal on another rank) after step \d+; checkpoint .*resume=auto",
             rc=EXIT_PREEMPTED)
    done = max(train_steps(run_dir) or [0])
    o.check(done < STEPS, f"the run finished all {STEPS} steps before the signal took effect (too fast to test)")
    o.check(latest_step(run_dir) == done, f"latest checkpoint is step {latest_step(run_dir)}, the last finished step "
                                          f"is {done}")
    o.check(not os.path.exists(os.path.join(run_dir, "export")), "an export was written by the stopped run")
    resume_and_compare(env, o, run_dir, done, ranks, max_lost=1)


@scenario("preempt_sigterm_rank", "2 ranks; SIGTERM to rank 1 after step 3; then resume=auto on 2 ranks",
          "resumed exactly")
def preempt_sigterm_rank(env, o):
    def send(p):
        pids = rank_pids(p.pid)
        o.check(set(pids) == {0, 1}, f"ranks found under the runner: {pids}")
        os.kill(pids[1], signal.SIGTERM)
    _preempt(env, o, 2, send, "sigterm-rank")


@scenario("preempt_sigusr1", "1 rank; SIGUSR1 after step 3; then resume=auto", "resumed exactly")
def preempt_sigusr1(env, o):
    _preempt(env, o, 1, lambda p: os.kill(p.pid, signal.SIGUSR1), "sigusr1")


@scenario("preempt_runner_killed", "2 ranks; SIGTERM to the `deepspeed` runner alone after step 3; then "
                                   "resume=auto on 2 ranks", "resumed exactly")
def preempt_runner_killed(env, o):
    import psutil
    out = env.fresh("runner-killed")
    run_dir = str(out / "r")
    p = env.start(out, ranks=2)
    if not reached(o, p, r"^step\s+3/", "step 3/"):
        return
    tree = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    ranks = rank_pids(p.pid)
    os.kill(p.pid, signal.SIGTERM)
    p.p.wait(60)
    t0 = time.time()
    ended = p.wait_eof(TIMEOUT)          # the ranks and launch.py hold the pipes until they exit
    alive = tree
    while alive and time.time() - t0 < TIMEOUT:  # then each is gone (or a zombie nobody has reaped yet)
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.5)
    if not o.check(ended and not alive, f"processes still running {time.time() - t0:.0f} s after the runner was "
                                        f"killed: {_describe(alive)} (ranks {ranks})"):
        p.kill_group()
    p.rc = EXIT_PREEMPTED  # the ranks' own status is launch.py's to read; the line and the checkpoint show it
    one_line(o, p, "stopped:", r"stopped by SIGTERM after step \d+", rc=EXIT_PREEMPTED)
    done = max(train_steps(run_dir) or [0])
    o.check(done < STEPS, "the run finished all its steps: the ranks did not notice the runner was gone")
    o.check(latest_step(run_dir) == done, f"latest checkpoint is step {latest_step(run_dir)}, the last finished step "
                                          f"is {done}")
    o.check(not os.path.exists(os.path.join(run_dir, "export")), "an orphaned rank wrote the export")
    o.note(f"all {len(tree)} processes under the runner (launch.py, 2 ranks) gone {time.time() - t0:.0f} s after "
           f"its SIGTERM; no export")
    resume_and_compare(env, o, run_dir, done, 2, max_lost=1)


def _wait_stopped(pid, timeout=30):
    import psutil
    t0 = time.time()
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED and time.time() - t0 < timeout:
        time.sleep(0.05)
    time.sleep(0.2)


def _running(pid):
    import psutil
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _describe(pids):
    import psutil
    out = []
    for pid in pids:
        try:
            q = psutil.Process(pid)
            out.append(f"{pid} {q.status()} {' '.join(q.cmdline())[:80]}")
        except psutil.Error:
            out.append(f"{pid} gone")
    return out


@scenario("lock_second_run", "a second run (resume=auto) on a run directory a live run holds", "refused cleanly")
def lock_second_run(env, o):
    out = env.fresh("lock")
    run_dir = str(out / "r")
    a = env.start(out)
    if not o.check(a.wait_line(r"^step\s+1/"), f"first run did not start: {a.tail()!r}"):
        a.kill_group()
        return
    os.kill(a.pid, signal.SIGSTOP)       # hold it (and its lock) while the second run tries
    try:
        _wait_stopped(a.pid)             # delivery is asynchronous: a write of step 2 may still be under way
        before = snapshot(run_dir)
        b = env.train(out, "resume=auto")
        check_untouched(o, before, run_dir)  # before the first run goes on writing
    finally:
        os.kill(a.pid, signal.SIGCONT)
    one_line(o, b, "error:", rf"run directory .*r is in use by pid {a.pid} on host {re.escape(socket.gethostname())}"
                             r".*pick another name=")
    a.rc = a.wait()
    o.check(a.rc == 0, f"the first run exited {a.rc}: {a.tail()!r}")
    o.weights_equal = weights_equal(env.reference(1), run_dir)
    o.check(o.weights_equal, "the first run's weights differ from the uninterrupted run")
    o.steps_lost = 0


@scenario("lock_stale_after_kill", "1 rank SIGKILLed after step 6 (stale lock, no save at exit); then resume=auto",
          "resumed exactly")
def lock_stale_after_kill(env, o):
    out = env.fresh("stale-lock")
    run_dir = str(out / "r")
    p = env.start(out)
    if not reached(o, p, r"^step\s+6/", "step 6/"):
        return
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    o.check(os.path.isfile(os.path.join(run_dir, ".lock")), "the killed run left no lock file")
    done = max(train_steps(run_dir) or [0])
    r = resume_and_compare(env, o, run_dir, done, 1)
    notes = r.lines("note:")
    o.check(any(re.search(rf"taking over the lock of .* from pid {p.pid} .*no longer running", x) for x in notes),
            f"no `note: taking over the lock ... pid {p.pid}` line: {notes!r}")
    o.message = notes[0] if notes else ""
    o.check(not os.path.exists(os.path.join(run_dir, ".lock")), "the lock was not released at the end")


def _corrupt(env, o, label, damage):
    """A copy of the 12-step run (checkpoints 4, 8, 12); damage(run_dir); resume=auto must fall back to step 8 with
    one warning and finish like the uninterrupted run."""
    run_dir = copy_run(env.partial(1, 12), env.fresh(label))
    what = damage(run_dir)
    p = resume_and_compare(env, o, run_dir, 12, 1)
    warn = [x for x in p.err if x.startswith("warning: checkpoint")]
    o.check(len(warn) == 1 and re.search(r"step00000012 .*not intact: .*; resuming from step00000008 \(step 8\) "
                                         r"instead", warn[0] or ""), f"want one fallback warning: {warn!r}")
    o.message = warn[0] if warn else ""
    o.note(what)


@scenario("corrupt_truncated", "newest checkpoint: model states file truncated to half; resume=auto",
          "resumed exactly")
def corrupt_truncated(env, o):
    def damage(run_dir):
        truncate(ckpt_file(run_dir, 12, "model_states"))
        return "model_states truncated"
    _corrupt(env, o, "corrupt-truncated", damage)


@scenario("corrupt_zero_length", "newest checkpoint: optimizer states file zero-length; resume=auto",
          "resumed exactly")
def corrupt_zero_length(env, o):
    def damage(run_dir):
        truncate(ckpt_file(run_dir, 12, "optim_states"), 0.0)
        return "optim_states zero-length"
    _corrupt(env, o, "corrupt-zero", damage)


@scenario("corrupt_flipped", "newest checkpoint: 4 bytes flipped in the optimizer states file (same size); "
                             "resume=auto", "resumed exactly")
def corrupt_flipped(env, o):
    def damage(run_dir):
        flip_bytes(ckpt_file(run_dir, 12, "optim_states"))
        return "4 bytes of optim_states flipped"
    _corrupt(env, o, "corrupt-flip", damage)


@scenario("corrupt_all", "every checkpoint damaged (truncated, zero-length, flipped); resume=auto", "refused cleanly")
def corrupt_all(env, o):
    run_dir = copy_run(env.partial(1, 12), env.fresh("corrupt-all"))
    truncate(ckpt_file(run_dir, 12, "model_states"))
    truncate(ckpt_file(run_dir, 8, "optim_states"), 0.0)
    flip_bytes(ckpt_file(run_dir, 4, "model_states"))
    before = snapshot(run_dir)
    p = env.train(os.path.dirname(run_dir), "resume=auto")
    one_line(o, p, "error:", r"no intact checkpoint to resume from \(.*step00000012.*step00000008.*step00000004")
    check_untouched(o, before, run_dir)


@scenario("config_run_defining", "resume=auto with alpha / divergence / student / temperature changed",
          "refused cleanly")
def config_run_defining(env, o):
    run_dir = copy_run(env.partial(1, 12), env.fresh("config-fixed"))
    before = snapshot(run_dir)
    for change, old in (("alpha=0.5", "0.4"), ("divergence=reverse_kl", "'forward_kl'"),
                        ("student=tiny-student", "'micro'"), ("temperature=2.0", "1.0")):
        key = change.split("=")[0]
        p = env.train(os.path.dirname(run_dir), "resume=auto", change)
        sub = Outcome(key, "")
        one_line(sub, p, "error:", rf"holds a run with other run-defining settings: {key} \({re.escape(old)} -> .*"
                                   r"give this one a new name=")
        for pr in sub.problems:
            o.problems.append(Problem(f"{key}: {pr.text}", pr.bug))
        o.message = o.message or sub.message
        check_untouched(o, before, run_dir)
    o.note("config.yaml and every checkpoint byte-identical after each refusal")


@scenario("config_lr_change", "resume=auto with lr=1e-3 (the run used 3e-3)", "resumed, change applied")
def config_lr_change(env, o):
    from distillery.engines import lr_lambda
    run_dir = copy_run(env.partial(1, 12), env.fresh("config-lr"))
    n = len(train_steps(run_dir))
    p = env.train(os.path.dirname(run_dir), "resume=auto", "lr=1e-3")
    if not o.check(p.rc == 0, f"resume exited {p.rc}: {p.tail()!r}"):
        return
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss/total" in r][n:]
    o.steps_lost = 12 - (rows[0]["step"] - 1)
    f = lr_lambda(STEPS, 0.05, 0.1)
    o.check(abs(rows[0]["lr"] - 1e-3 * f(12)) < 1e-15, f"lr at step 13 is {rows[0]['lr']}, want {1e-3 * f(12)}")
    hist = read_jsonl(os.path.join(run_dir, "config_history.jsonl"))
    o.check(len(hist) == 1 and hist[0]["changes"].get("lr") == {"old": 3e-3, "new": 1e-3}
            and hist[0]["resumed_at_step"] == 12, f"config_history.jsonl: {hist!r}")
    o.weights_equal = None  # another lr trains other weights, on purpose
    o.message = f"config_history.jsonl: {json.dumps(hist[-1]['changes'])}"


@scenario("config_preset_rerun", "the preset of a run re-run under the same name with alpha changed in the YAML",
          "refused cleanly")
def config_preset_rerun(env, o):
    out = env.fresh("preset")
    preset = out / "preset.yaml"
    preset.write_text("name: r\nalpha: 0.4\nstudent: micro\n")
    run_dir = copy_run(env.partial(1, 12), out)
    before = snapshot(run_dir)
    preset.write_text("name: r\nalpha: 0.5\nstudent: micro\n")
    args = [a for a in env.args(out) if not str(a).startswith(("alpha=", "name="))]
    p = run(env.cmd(["--config", preset, *args]))
    one_line(o, p, "error:", r"holds a run with other run-defining settings: alpha \(0.4 -> 0.5\)")
    check_untouched(o, before, run_dir)


@scenario("world_size_change", "a 2-rank checkpoint resumed on 1 rank (resume=auto lr=1e-3); then through "
                               "`python -m distillery.checkpoint --to-universal`", "refused cleanly")
def world_size_change(env, o):
    run_dir = copy_run(env.partial(2, 8), env.fresh("world-size"))
    before = snapshot(run_dir)
    p = env.train(os.path.dirname(run_dir), "resume=auto", "lr=1e-3")
    one_line(o, p, "error:", r"saved by 2 ranks, this run has 1: .*python -m distillery.checkpoint --to-universal "
                             r"\S+step00000008 then resume=\S+step00000008-universal")
    check_untouched(o, before, run_dir)
    # the conversion the message names, then the resume it names
    src = os.path.join(run_dir, "checkpoints", "step00000008")
    c = run([PY, "-m", "distillery.checkpoint", "--to-universal", src])
    if not o.check(c.rc == 0, f"--to-universal exited {c.rc}: {c.tail()!r}"):
        return
    n = len(train_steps(run_dir))
    r = env.train(os.path.dirname(run_dir), f"resume={src}-universal", "lr=1e-3")
    if o.check(r.rc == 0, f"resume from the universal checkpoint exited {r.rc}: {r.tail(800)!r}"):
        steps = train_steps(run_dir)
        o.check(steps[n:] == list(range(9, STEPS + 1)), f"the 1-rank run did not continue at step 9: {steps[n:]}")
        o.check(os.path.isfile(os.path.join(run_dir, "export", "model.safetensors")), "no export")
        hist = read_jsonl(os.path.join(run_dir, "config_history.jsonl"))
        o.check(any(h["changes"].get("lr") == {"old": 3e-3, "new": 1e-3} for h in hist),
                f"lr 0.003 -> 0.001 (given to both attempts) is not in config_history.jsonl ({hist}): the refused "
                f"attempt had already written it into config.yaml", bug="config-yaml-overwritten")
        o.note("via --to-universal: resumed on 1 rank at step 9 and finished (weights n.a.: 1 rank sums in "
               "another order than 2)")


def first_skipped_step(run_dir):
    """The first step metrics.jsonl shows a skipped update at (train/skipped_steps grows), or None."""
    prev = 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            n = r.get("train/skipped_steps")
            if n is not None and n > prev:
                return r["step"]
            prev = n if n is not None else prev
    return None


def _diverged(o, p, run_dir, needle):
    """One error line (needle), no export, and the checkpoint it recommends predates the first skipped update
    (a checkpoint saved after it holds the weights whose gradients overflow: resuming from it fails again)."""
    line = one_line(o, p, "error:", needle)
    o.check(not os.path.exists(os.path.join(run_dir, "export")), "an export was written")
    first = first_skipped_step(run_dir)
    named = re.search(r"step(\d{8})", line)
    o.note(f"first skipped update: step {first}; checkpoints left: "
           f"{', '.join(c for c in checkpoints(run_dir) if c.startswith('step'))}")
    if named and first:
        o.check(int(named.group(1)) < first,
                f"the message recommends checkpoint step {int(named.group(1))}, saved after the first skipped update "
                f"(step {first}): it holds the weights whose gradients overflow, so resuming from it with a lower lr "
                f"fails the same way", bug="guard-last-good")


@scenario("diverge_lr", "lr=1e6: gradients overflow from step 3 on", "refused cleanly")
def diverge_lr(env, o):
    out = env.fresh("diverge")
    p = env.train(out, "lr=1e6")
    _diverged(o, p, str(out / "r"), r"3 consecutive optimizer steps \(\d+\.\.\d+\) were skipped for non-finite values")


@scenario("diverge_mostly_skipped", "lr=1e6, 6 steps, max_bad_steps=10: 4 of 6 updates skipped, no streak stop",
          "refused cleanly")
def diverge_mostly_skipped(env, o):
    out = env.fresh("mostly-skipped")
    p = env.train(out, "lr=1e6", "max_bad_steps=10", f"train_tokens={6 * ROWS * SEQ}")
    _diverged(o, p, str(out / "r"), r"\d+ of 6 optimizer steps were skipped .*max_skipped_frac=0.5")


DISK_FULL = """
import errno, os, sys
sys.path.insert(0, {repo!r})
import deepspeed.runtime.engine as E
orig, calls = E.DeepSpeedEngine.save_checkpoint, [0]
def save_checkpoint(self, save_dir, tag=None, **kw):
    calls[0] += 1
    if calls[0] == {fail_at}:  # a partial file, then the disk is full
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "zero_pp_rank_0_mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(d, "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    return orig(self, save_dir, tag=tag, **kw)
E.DeepSpeedEngine.save_checkpoint = save_checkpoint
import train
from distillery.errors import cli
cli(train.main, {argv!r})
"""


@scenario("disk_full_save", "ENOSPC (after a partial file) in DeepSpeed's save of the 2nd checkpoint (step 8); "
                            "then resume=auto", "resumed exactly")
def disk_full_save(env, o):
    from distillery.checkpoint import verify
    out = env.fresh("disk-full")
    run_dir = str(out / "r")
    code = DISK_FULL.format(repo=str(REPO), fail_at=2, argv=[str(a) for a in env.args(out)])
    p = run([PY, "-c", code])
    one_line(o, p, "error:", r"checkpoint step00000008 not saved: no space left on .*checkpoints; .*the previous "
                             r"checkpoint step00000004 and `latest` are untouched")
    o.check(latest_step(run_dir) == 4, f"latest names step {latest_step(run_dir)}, want 4")
    left = [c for c in checkpoints(run_dir) if c.startswith(("tmp-", "step"))]
    o.check(left == ["step00000004"], f"checkpoint directories after the failed save: {left}, want step00000004")
    why = verify(os.path.join(run_dir, "checkpoints", "step00000004"))
    o.check(why is None, f"the previous checkpoint is not intact: {why}")
    done = max(train_steps(run_dir) or [0])
    o.check(done == 8, f"the failing process finished {done} steps, want 8")
    resume_and_compare(env, o, run_dir, done, 1)


@scenario("keep_last", f"save_interval={SAVE}, keep_last={KEEP} over {STEPS} steps, uninterrupted and after an "
                       "interrupted + resumed run", "completed exactly")
def keep_last(env, o):
    ref = env.reference(1)
    want = [f"step{s:08d}" for s in range(STEPS - SAVE * (KEEP - 1), STEPS + 1, SAVE)]
    for label, run_dir in (("uninterrupted", ref), ("resumed", env.partial(1, 12))):
        if label == "resumed":  # a copy of the 12-step run resumed to the end
            run_dir = copy_run(run_dir, env.fresh("keep-last"))
            p = env.train(os.path.dirname(run_dir), "resume=auto")
            if not o.check(p.rc == 0, f"resume exited {p.rc}: {p.tail()!r}"):
                continue
            o.weights_equal = weights_equal(ref, run_dir)
            o.check(o.weights_equal, "final weights differ from the uninterrupted run")
        got = [c for c in checkpoints(run_dir) if c.startswith(("step", "tmp-"))]
        o.check(got == want, f"{label}: checkpoints left {got}, want {want}")
    o.steps_lost = 0
    o.message = f"left: {', '.join(want)}"


def _data_copy(env, label):
    d = env.fresh(label) / "data"
    shutil.copytree(env.data, d)
    return d


def _refused_before_any_step(env, o, data, needle, *extra):
    out = env.fresh("run")
    p = env.train(out, f"data={data}", *extra)
    one_line(o, p, "error:", needle)
    o.check(not train_steps(out / "r"), "a step ran")
    o.check(not os.path.exists(out / "r" / "checkpoints"), "a checkpoint was written")


@scenario("data_zeroed_shard", "512 zeroed bytes inside a training shard (size unchanged)", "refused cleanly")
def data_zeroed_shard(env, o):
    d = _data_copy(env, "zeroed")
    shard = d / "train" / "00001.bin"
    with open(shard, "r+b") as f:
        f.seek(4096)
        f.write(bytes(512))
    _refused_before_any_step(env, o, d, r"shard .*00001.bin fails its checksum .*rebuild the data set")


@scenario("data_token_ids", "a token id >= vocab_size in a shard whose index checksum matches; with "
                            "verify_data=true and false", "refused cleanly")
def data_token_ids(env, o):
    import numpy as np
    d = _data_copy(env, "token-ids")
    index = json.loads((d / "index.json").read_text())
    entry = index["splits"]["train"]["files"][2]
    path = d / entry["path"]
    arr = np.fromfile(path, dtype=index["dtype"])
    arr[1000] = index["vocab_size"] + 88
    arr.tofile(path)
    entry["sha256"] = sha256(path)
    (d / "index.json").write_text(json.dumps(index))
    bad = index["vocab_size"] + 88
    for verify in ("true", "false"):
        _refused_before_any_step(env, o, d, rf"holds token id {bad} >= vocab_size {index['vocab_size']}",
                                 f"verify_data={verify}")


@scenario("yaml_error", "a YAML syntax error in --config", "refused cleanly", slow=False)
def yaml_error(env, o):
    out = env.fresh("yaml")
    preset = out / "bad.yaml"
    preset.write_text("alpha: [0.4\nlr: 1e-3\n")
    p = run(env.cmd(["--config", preset, *env.args(out / "runs")]))
    one_line(o, p, "error:", r"bad.yaml is not valid YAML at line 2, column \d+: .*fix the file")
    o.check(not os.path.exists(out / "runs"), "something was written")


def source_copy(dst):
    """The trainer's source tree (what train.py imports) copied to dst, so a broken plugin can be dropped into
    *its* plugins/ without breaking concurrent runs of this checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "zz_*")
    for d in ("distillery", "plugins", "eval", "data_prep", "ds_configs"):
        shutil.copytree(REPO / d, Path(dst) / d, ignore=ignore)
    shutil.copy(REPO / "train.py", Path(dst) / "train.py")
    return Path(dst)


@scenario("plugin_syntax_error", "plugins/zz_broken_test.py with a syntax error: a run and --list-plugins",
          "refused cleanly", slow=False)
def plugin_syntax_error(env, o):
    out = env.fresh("plugin")
    src = source_copy(out / "src")
    (src / "plugins" / "zz_broken_test.py").write_text("from plugins import register\n\ndef broken(:\n    pass\n")
    needle = r"plugins/zz_broken_test.py failed to import \(line 3\): SyntaxError: .*fix or remove that file"
    env_src = child_env(src)
    lp = run([PY, src / "train.py", "--list-plugins"], cwd=src, env=env_src)
    one_line(o, lp, "error:", needle)
    p = run([PY, src / "train.py", *env.args(out / "runs")], cwd=src, env=env_src)
    sub = Outcome("run", "")
    one_line(sub, p, "error:", needle)
    o.problems += [Problem(f"run: {x.text}") for x in sub.problems]
    o.check(not os.path.exists(out / "runs"), "something was written")
    o.note("run in a copy of the source tree, so the checkout's plugins/ never holds a broken file")


@scenario("teacher_truncated", "teacher model.safetensors truncated to half", "refused cleanly", slow=False)
def teacher_truncated(env, o):
    out = env.fresh("teacher")
    t = out / "teacher"
    shutil.copytree(env.teacher, t)
    truncate(t / "model.safetensors")
    args = [a for a in env.args(out / "runs") if not str(a).startswith("teacher=")]
    p = run(env.cmd([*args, f"teacher={t}"]))
    one_line(o, p, "error:", r"teacher .*model.safetensors is truncated \(\d+ of \d+ bytes\)")
    o.check(not os.path.exists(out / "runs"), "something was written")


@scenario("data_without_tokenizer", "the data set's tokenizer/ removed: a run, then its export as teacher=",
          "refused cleanly")
def data_without_tokenizer(env, o):
    d = _data_copy(env, "no-tokenizer")
    shutil.rmtree(d / "tokenizer")
    out = env.fresh("run")
    p = env.train(out, f"data={d}", f"train_tokens={2 * ROWS * SEQ}")
    if p.rc != 0:  # refused at start: the one-line error must name the tokenizer
        one_line(o, p, "error:", r"tokenizer")
        o.check(not train_steps(out / "r"), "a step ran before the refusal")
        return
    export = out / "r" / "export"
    has_tok = any(f.startswith("tokenizer") for f in os.listdir(export))
    o.note(f"the run trained and exported {'with' if has_tok else 'without'} tokenizer files, "
           f"{'with' if p.lines('warning:') else 'without'} a warning")
    args = [a for a in env.args(env.fresh("as-teacher")) if not str(a).startswith("teacher=")]
    q = run(env.cmd([*args, f"teacher={export}", "max_steps=1"]))
    one_line(o, q, "error:", r"no loadable tokenizer")
    o.message = "the run trains; " + o.message
    o.check(has_tok, "the export has no tokenizer (data set without tokenizer/): found only when the export is "
                     "used as a teacher, after the run", bug="no-tokenizer-export")


# ============================================================================ issue 20 scenarios
# Cache provenance, settings checked at start, unfinished runs, evaluation sets too small (docs/reliability.md).
# They share a small data set (0.3 MB of source: 12 training documents, so the held-out split is empty), two micro
# teachers of one architecture with different weights (seeds 0 and 1), and a sampled cache of the first (K = 4).

def small_setup(env):
    """{data, teacher_a, teacher_b, cache, build_err}: made once per Env (~40 s: data 4 s, the cache ~30 s)."""
    def make():
        root = env.fresh("issue20-small")
        p = run([PY, "-m", "data_prep.offline", "--out", root / "data", "--vocab_size", "512", "--seq_len", str(SEQ),
                 "--max_train_mb", "0.3"])
        if p.rc != 0:
            raise RuntimeError(f"the small data set failed: {p.tail()}")
        a, b = make_teacher(root / "data", root / "teacher-a", seed=0), make_teacher(root / "data", root / "teacher-b",
                                                                                      seed=1)
        c = run([PY, "-m", "data_prep.teacher_cache", "--teacher", a, "--data", root / "data", "--out",
                 root / "cache", "--k", "4", "--method", "sampled", "--quiet", "--ds_config",
                 REPO / "ds_configs" / "cpu.json"])
        if c.rc != 0:
            raise RuntimeError(f"the teacher cache failed: {c.tail()}")
        return {"data": str(root / "data"), "teacher_a": a, "teacher_b": b, "cache": str(root / "cache"),
                "build_err": "\n".join(p.err)}
    return env._cached("issue20-small", make)


def _without_teacher(args):
    return [a for a in args if not str(a).startswith("teacher=")]


@scenario("cache_wrong_teacher", "a cache of teacher A, run with teacher=B (same config.json, other weights); then "
                                 "with the default teacher=", "refused cleanly")
def cache_wrong_teacher(env, o):
    sm = small_setup(env)
    same = open(os.path.join(sm["teacher_a"], "config.json")).read() == open(
        os.path.join(sm["teacher_b"], "config.json")).read()
    o.check(same, "the two teachers' config.json differ: the scenario needs one architecture")
    out = env.fresh("wrong-teacher")
    p = env.train(out, f"data={sm['data']}", f"teacher_cache={sm['cache']}", f"teacher={sm['teacher_b']}")
    one_line(o, p, "error:", r"teacher=.*teacher-b.* has the same config but other weights")
    o.check(not os.path.exists(out / "r"), "the refused run wrote its run directory")
    args = _without_teacher(env.args(out, f"data={sm['data']}", f"teacher_cache={sm['cache']}", "max_steps=1"))
    q = run(env.cmd(args))  # the default teacher= is no claim: the run records the cache's own teacher
    if o.check(q.rc == 0, f"the run with the default teacher= exited {q.rc}: {q.tail(600)!r}"):
        import yaml
        got = yaml.safe_load(open(out / "r" / "config.yaml"))["teacher"]
        o.check(got == os.path.abspath(sm["teacher_a"]), f"config.yaml names teacher {got!r}, not the cache's")
        o.note(f"default teacher=: config.yaml records the cache's teacher {got}")


@scenario("config_checked_at_start", "teacher_cache_mode=bogus with a sampled cache; divergence=top_k without k; "
                                     "eval_window=1: each then rerun corrected under the same name",
          "refused cleanly")
def config_checked_at_start(env, o):
    sm = small_setup(env)
    out = env.fresh("checked-at-start")
    cached = [f"data={sm['data']}", f"teacher_cache={sm['cache']}", f"teacher={sm['teacher_a']}"]
    cases = [(["teacher_cache_mode=bogus", *cached], r"teacher_cache_mode='bogus': use renorm, tail or support",
              cached),
             (["divergence=top_k"], r"divergence top_k rejects divergence_args \{\}: top_k: give exactly one of k",
              ["divergence=top_k", "divergence_args={k: 8}"]),
             (["eval_window=1"], r"eval_window=1 must be >= 2", ["eval_window=64", "eval_interval=0"])]
    messages = []
    for i, (bad, needle, good) in enumerate(cases):
        name = f"r{i}"
        p = env.train(out, f"train_tokens={2 * ROWS * SEQ}", *bad, name=name)
        sub = Outcome(name, "")
        messages.append(one_line(sub, p, "error:", needle))
        o.problems += [Problem(f"{bad[0]}: {x.text}") for x in sub.problems]
        o.check(not os.path.exists(out / name), f"{bad[0]}: the refused run wrote {out / name}")
        q = env.train(out, f"train_tokens={2 * ROWS * SEQ}", *good, name=name)  # the corrected rerun, same name
        o.check(q.rc == 0 and train_steps(out / name)[-1:] == [2],
                f"{bad[0]}: the corrected rerun under the same name failed ({q.rc}): {q.tail(600)!r}")
    o.message = messages[0]
    o.note("each corrected rerun under the same name trained to the end (nothing of the refused one was recorded)")


@scenario("max_steps_unfinished", "max_steps=4 of 16 with eval_final: not finished, left out of eval.report; then "
                                  "resume=auto", "resumed exactly")
def max_steps_unfinished(env, o):
    out = env.fresh("unfinished")
    ev = ["callbacks=[progress,eval_final]", "eval_window=64", "eval_max_windows=4"]
    p = env.train(out, "max_steps=4", *ev)
    run_dir = out / "r"
    o.check(p.rc == 0, f"the max_steps run exited {p.rc}: {p.tail(600)!r}")
    o.check(not (run_dir / "eval" / "final.json").exists(), "eval/final.json written by a run stopped by max_steps")
    o.check(not (run_dir / "finished.json").exists(), "finished.json written by a run stopped by max_steps")
    notes = p.lines("note: eval_final", "out")
    o.check(len(notes) == 1 and "stopped at step 4 of 16" in notes[0], f"eval_final said {notes!r}")
    r = run([PY, "-m", "eval.report", run_dir, "--out", out / "report"])
    line = one_line(Outcome("report", ""), r, "error:")
    o.check(r.rc == EXIT_ERROR and "not finished (no finished.json; stopped at step 4 of 16)" in line,
            f"eval.report on the unfinished run: {line or r.tail(400)!r}")
    o.message = notes[0] if notes else ""
    o.note(f"eval.report: `` {line} ``")
    resume_and_compare(env, o, str(run_dir), 4, 1, *ev)
    o.check((run_dir / "finished.json").exists() and (run_dir / "eval" / "final.json").exists(),
            "the completed run has no finished.json / eval/final.json")


@scenario("eval_set_too_small", "data whose held-out split is empty (0.3 MB of source); a run evaluating on it",
          "refused cleanly", slow=False)
def eval_set_too_small(env, o):
    def make():  # the data set alone (no cache): keeps this scenario fast
        root = env.fresh("issue20-tiny-data")
        p = run([PY, "-m", "data_prep.offline", "--out", root / "data", "--vocab_size", "512", "--seq_len",
                 str(SEQ), "--max_train_mb", "0.3"])
        if p.rc != 0:
            raise RuntimeError(f"the small data set failed: {p.tail()}")
        return str(root / "data"), "\n".join(p.err)
    data, build_err = env._cached("issue20-tiny-data", make)
    warn = [x for x in build_err.splitlines() if x.startswith("warning: split heldout")]
    o.check(warn and "is empty (0 tokens" in warn[0], f"data_prep said nothing of the empty held-out split: "
                                                      f"{build_err[-400:]!r}")
    out = env.fresh("too-small")
    args = _without_teacher(env.args(out, f"data={data}", "alpha=0", "eval_interval=0", "eval_window=64"))
    p = run(env.cmd(args))
    one_line(o, p, "error:", r"eval set\(s\) heldout \(0 tokens\) in .*: shorter than one window of eval_window=64")
    o.check(not os.path.exists(out / "r"), "the refused run wrote its run directory")
    o.note(f"data_prep: `` {warn[0] if warn else ''} ``")
# ============================================================================ issue 24: reliability, round 2
# Scenarios added for issue 24 (a real full disk, the guard's good checkpoint, preemption corner cases, stale
# `latest`, universal resume, the end phase). Kept in one block, apart from the scenarios above and other issues'.

WRAPPER = """
import os, runpy, signal, sys, time
sys.path.insert(0, {repo!r})
sys.argv = [{train!r}] + sys.argv[1:]
{patch}
runpy.run_path({train!r}, run_name="__main__")
"""


def patched_train(out, patch):
    """A script that runs train.py as __main__ (its start-up is the command line's: preempt.catch_early, cli,
    shutdown) after `patch`, Python code that may replace what train.py imports (a slow phase, a killed write)."""
    import textwrap
    path = Path(out) / "patched_train.py"
    path.write_text(WRAPPER.format(repo=str(REPO), train=str(REPO / "train.py"), patch=textwrap.dedent(patch)))
    return path


def script_cmd(script, args, ranks=1):
    if ranks == 1:
        return [PY, script, *args]
    from distillery.launch import free_port
    return [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
            script, *args]


def slowed(target, attr, line, seconds):
    """Patch code: `target.attr` (a module or class, imported by name) prints `line` on stderr, sleeps, then runs."""
    mod, _, cls = target.partition(":")
    obj = f"_t.{cls}" if cls else "_t"
    return f"""
import {mod} as _t
_orig_{attr} = {obj}.{attr}
def _slow_{attr}(*a, **k):
    print({line!r}, file=sys.stderr, flush=True)
    time.sleep({seconds})
    return _orig_{attr}(*a, **k)
{obj}.{attr} = _slow_{attr}
"""


def merge(o, sub, label):
    """The problems of a sub-outcome (one phase of a scenario) into o, prefixed with the phase."""
    o.problems += [Problem(f"{label}: {p.text}", p.bug) for p in sub.problems]
    return sub


def _tmp_leftovers(run_dir):
    return [os.path.join(r, n) for r, ds, fs in os.walk(run_dir) for n in ds + fs
            if re.search(r"\.tmp-\d+$", n) or n.startswith("tmp-")]


@scenario("disk_full_real", "out_dir on a real 10 MiB tmpfs: room for less than one checkpoint, then for one and a "
                            "half, then none at all, then space freed; resume=auto each time", "resumed exactly")
def disk_full_real(env, o):
    from distillery.checkpoint import verify
    out = env.fresh("disk-full-real")
    fs = out / "fs"
    fs.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(fs)], capture_output=True, text=True)
    if m.returncode:
        o.expect = f"skipped (cannot mount a tmpfs here: {(m.stderr or m.stdout).strip()[:120]})"
        return
    try:
        ref = env.reference(1)
        d16 = os.path.join(ref, "checkpoints", "step00000016")
        ck = sum(os.path.getsize(os.path.join(d16, f)) for f in os.listdir(d16))
        run_dir, filler = str(fs / "r"), fs / "filler"
        # A0: less than one checkpoint of space: the first save (no earlier one to size it by) fails in torch's writer
        fill(fs, ck // 2)
        p = env.train(fs)
        one_line(o, p, "error:", r"checkpoint step00000004 not saved: no space left on \S+checkpoints \(\d+ bytes "
                                 r"free; the write failed with: .*\); free space or move out_dir")
        o.check(not _tmp_leftovers(run_dir), f"partial files left: {_tmp_leftovers(run_dir)}")
        o.check(not [c for c in checkpoints(run_dir) if c.startswith("step")], "a checkpoint directory was left")
        # A: one and a half checkpoints of space: step 4 is saved, step 8 is refused before anything is written
        os.truncate(filler, max(0, os.path.getsize(filler) - ck))
        p = env.train(fs, "resume=auto")
        a = Outcome("A", "")
        one_line(a, p, "error:", r"checkpoint step00000008 not saved: not enough space on \S+ \(\d+ bytes free, the "
                                 r"last checkpoint step00000004 took \d+\); .*step00000004 and `latest` are untouched")
        merge(o, a, "1.5 checkpoints free")
        o.check(latest_step(run_dir) == 4 and verify(os.path.join(run_dir, "checkpoints", "step00000004")) is None,
                f"latest names step {latest_step(run_dir)}, want an intact step 4")
        o.check(not _tmp_leftovers(run_dir), f"partial files left: {_tmp_leftovers(run_dir)}")
        done = max(train_steps(run_dir) or [0])
        # B: the disk completely full: the rerun is refused at the run lock, nothing changed
        fill(fs, 0)
        before = snapshot(run_dir)
        p = env.train(fs, "resume=auto")
        b = Outcome("B", "")
        one_line(b, p, "error:", r"cannot lock run directory \S+: no space left on \S+; free space there")
        merge(o, b, "disk full")
        check_untouched(o, before, run_dir)
        o.note(f"lock on a full disk: {b.message}")
        # C: space freed: resume=auto finishes like the uninterrupted run
        os.remove(filler)
        resume_and_compare(env, o, run_dir, done, 1)
        o.note(f"one checkpoint is {ck} bytes; then: {a.message}")
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


@scenario("diverge_verified_good", "lr=1e6, save_interval=2: step 2 is saved before the first skipped update (step "
                                   "3) but its weights are already ruined; then resume from it with lr=3e-4",
          "stopped cleanly")
def diverge_verified_good(env, o):
    out = env.fresh("diverge-good")
    run_dir = str(out / "r")
    p = env.train(out, "lr=1e6", "save_interval=2")
    line = one_line(o, p, "error:", r"3 consecutive optimizer steps \(3\.\.5\) were skipped .*no checkpoint is known "
                                    r"to be good \(step00000002 was saved, but the step after it was skipped\)")
    o.check("resume=" not in line, "the stop recommends a checkpoint")
    # what the old message advised: resume from step 2 with a lower lr
    src = os.path.join(run_dir, "checkpoints", "step00000002")
    q = env.train(out, f"resume={src}", "lr=3e-4", "save_interval=2")
    sub = Outcome("retry", "")
    one_line(sub, q, "error:", r"consecutive optimizer steps \(3\.\.5\) were skipped .*no checkpoint is known to be "
                               r"good \(step00000002 was saved, but the step after it was skipped\)")
    merge(o, sub, "resume from step 2 with lr=3e-4")
    o.note("resumed from step 2 with lr=3e-4 anyway: steps 3..5 skipped again, and the stop again names no "
           "checkpoint (no loop)")


@scenario("preempt_in_skipped_streak", "lr=1e6, save_interval=2, max_bad_steps=4; SIGTERM after step 3 (inside the "
                                       "run of skipped updates from step 3); then resume=auto with max_bad_steps=3",
          "stopped cleanly")
def preempt_in_skipped_streak(env, o):
    out = env.fresh("preempt-streak")
    run_dir = str(out / "r")
    p = env.start(out, "lr=1e6", "save_interval=2", "max_bad_steps=4")
    if not reached(o, p, r"^step\s+3/", "step 3/"):
        return
    os.kill(p.pid, signal.SIGTERM)
    p.rc = p.wait()
    one_line(o, p, "stopped:", r"stopped by SIGTERM after step (\d+); not saved: steps 3\.\.\1 skipped their updates, "
                               r".*the last checkpoint is step00000002; rerun .*resume=auto", rc=EXIT_PREEMPTED)
    o.check(latest_step(run_dir) == 2 and [c for c in checkpoints(run_dir) if c.startswith("step")] ==
            ["step00000002"], f"checkpoints {checkpoints(run_dir)}, latest {latest_step(run_dir)}: want step 2 only")
    q = env.train(out, "resume=auto", "lr=1e6", "save_interval=2", "max_bad_steps=3")
    sub = Outcome("resume", "")
    one_line(sub, q, "error:", r"^error: 3 consecutive optimizer steps \(3\.\.5\) were skipped .*no checkpoint is "
                               r"known to be good \(step00000002 was saved, but the step after it was skipped\)")
    merge(o, sub, "resume=auto max_bad_steps=3")
    o.note(f"resumed: {sub.message}")


@scenario("preempt_stale_latest", "2 ranks; rank 1 reads a stale `latest` (attribute caching); SIGTERM to rank 0 "
                                  "right after the step-4 save; then resume=auto on 2 ranks", "resumed exactly")
def preempt_stale_latest(env, o):
    out = env.fresh("stale-latest-rank1")
    run_dir = str(out / "r")
    script = patched_train(out, """
        if os.environ.get("RANK") == "1":  # this rank never sees the newest `latest` (a stale attribute cache)
            import distillery.checkpoint as _c
            _c.read_latest = lambda d: None
        """)
    p = Proc(script_cmd(script, env.args(out), ranks=2))
    if not reached(o, p, r"^step\s+4/", "step 4/"):
        return
    os.kill(rank_pids(p.pid)[0], signal.SIGTERM)
    p.rc = p.wait()
    one_line(o, p, "stopped:", r"stopped by SIGTERM after step 4; checkpoint \S+step00000004; rerun",
             rc=EXIT_PREEMPTED)
    done = max(train_steps(run_dir) or [0])
    o.check(latest_step(run_dir) == done == 4, f"latest {latest_step(run_dir)}, last finished step {done}: the "
                                               f"signal missed the boundary right after the step-4 save")
    o.check(not _tmp_leftovers(run_dir), f"a save was started by one rank only: {_tmp_leftovers(run_dir)}")
    resume_and_compare(env, o, run_dir, done, 2, max_lost=1)


@scenario("stale_latest_pruned", "`latest` names step 2, long pruned, while 4, 8 and 12 are intact; resume=auto",
          "resumed exactly")
def stale_latest_pruned(env, o):
    from distillery import atomic
    run_dir = copy_run(env.partial(1, 12), env.fresh("stale-latest"))
    atomic.write_text(os.path.join(run_dir, "checkpoints", "latest"), "step00000002")
    p = resume_and_compare(env, o, run_dir, 12, 1, max_lost=0)
    warn = [x for x in p.err if x.startswith("warning:")]
    o.check(len(warn) == 1 and re.search(r"step00000002 named by \S+latest does not exist; resuming from "
                                         r"step00000012 \(step 12\) instead", warn[0]), f"warnings: {warn!r}")
    o.message = warn[0] if warn else ""


@scenario("universal_exact", "a 2-rank checkpoint (step 8) converted with --to-universal, resumed on 2 ranks and "
                             "on 1 rank", "resumed exactly")
def universal_exact(env, o):
    run_dir = copy_run(env.partial(2, 8), env.fresh("universal"))
    src = os.path.join(run_dir, "checkpoints", "step00000008")
    c = run([PY, "-m", "distillery.checkpoint", "--to-universal", src])
    if not o.check(c.rc == 0, f"--to-universal exited {c.rc}: {c.tail()!r}"):
        return
    diffs = {}
    for ranks in (2, 1):
        rd = copy_run(run_dir, env.fresh(f"universal-{ranks}rank"))
        r = env.train(os.path.dirname(rd), f"resume={rd}/checkpoints/step00000008-universal", ranks=ranks)
        if not o.check(r.rc == 0, f"{ranks}-rank resume exited {r.rc}: {r.tail(800)!r}"):
            continue
        o.check(train_steps(rd)[-STEPS + 8:] == list(range(9, STEPS + 1)), f"{ranks} ranks: did not go on at step 9")
        diffs[ranks] = _max_diff(env.reference(2), rd)
    if 2 in diffs:
        o.weights_equal = diffs[2] == (0, 0.0)
        o.check(o.weights_equal, f"2 ranks: {diffs[2][0]} tensors differ from the uninterrupted 2-rank run, by up "
                                 f"to {diffs[2][1]:.3g}")
        o.steps_lost = 0
    o.message = "; ".join(f"{k} rank{'s' if k > 1 else ''}: {n} of 21 tensors differ from the uninterrupted 2-rank "
                          f"run (max {m:.3g})" for k, (n, m) in diffs.items())


def _max_diff(a_run, b_run):
    """(tensors that differ, largest absolute difference) between two runs' exported weights."""
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(r, "export", "model.safetensors")) for r in (a_run, b_run))
    d = [(a[k] - b[k]).abs().max().item() for k in a]
    return sum(x > 0 for x in d), max(d)


@scenario("preempt_startup", "SIGTERM during start-up: 1 s after `python train.py` starts (its imports), then with "
                             "the run lock held (data checks slowed by 3 s); then the same command",
          "resumed exactly")
def preempt_startup(env, o):
    out = env.fresh("startup")
    run_dir = str(out / "r")
    p = env.start(out)
    time.sleep(1.0)
    os.kill(p.pid, signal.SIGTERM)
    p.rc = p.wait()
    a = Outcome("imports", "")
    one_line(a, p, "stopped:", r"stopped by SIGTERM during start-up", rc=EXIT_PREEMPTED)
    merge(o, a, "in the imports")
    script = patched_train(out, slowed("distillery.shards", "check_token_ids", "checking data", 3) +
                           slowed("distillery.shards", "verify_split", "checking data", 3))
    q = Proc(script_cmd(script, env.args(out)))
    if not reached(o, q, r"^checking data", "checking data"):
        return
    o.check(os.path.isfile(os.path.join(run_dir, ".lock")), "no lock held during the data checks")
    os.kill(q.pid, signal.SIGTERM)
    q.rc = q.wait()
    one_line(o, q, "stopped:", r"stopped by SIGTERM during start-up, before the first step; nothing was saved; rerun "
                               r"the same command", rc=EXIT_PREEMPTED)
    o.check(not os.path.exists(os.path.join(run_dir, ".lock")), "a stale lock was left")
    o.note(f"in the imports: {a.message}")
    r = env.train(out)
    if o.check(r.rc == 0, f"the same command exited {r.rc}: {r.tail(800)!r}"):
        o.check(not r.lines("note:"), f"notes on the rerun (a stale lock?): {r.lines('note:')}")
        o.weights_equal = weights_equal(env.reference(1), run_dir)
        o.check(o.weights_equal, "final weights differ from the uninterrupted run")
        o.steps_lost = 0


@scenario("preempt_second_sigterm", "1 rank; SIGTERM after step 3, and a second one while the stopping run releases "
                                    "its lock (slowed by 2 s); then resume=auto", "resumed exactly")
def preempt_second_sigterm(env, o):
    out = env.fresh("second-sigterm")
    run_dir = str(out / "r")
    script = patched_train(out, slowed("distillery.runlock:RunLock", "release", "releasing the lock", 2))
    p = Proc(script_cmd(script, env.args(out)))
    if not reached(o, p, r"^step\s+3/", "step 3/"):
        return
    os.kill(p.pid, signal.SIGTERM)
    if o.check(p.wait_line(r"^releasing the lock"), f"no `releasing the lock` line: {p.tail()!r}"):
        os.kill(p.pid, signal.SIGTERM)
    p.rc = p.wait()
    one_line(o, p, "stopped:", r"stopped by SIGTERM after step \d+; checkpoint \S+; rerun", rc=EXIT_PREEMPTED)
    done = max(train_steps(run_dir) or [0])
    o.check(latest_step(run_dir) == done, f"latest {latest_step(run_dir)}, last finished step {done}")
    resume_and_compare(env, o, run_dir, done, 1, max_lost=1)


@scenario("preempt_sigterm_group", "2 ranks; SIGTERM to every process of the job at once (runner, launch.py, ranks: "
                                   "what a scheduler does) after step 3; then resume=auto on 2 ranks",
          "resumed exactly")
def preempt_sigterm_group(env, o):
    out = env.fresh("sigterm-group")
    run_dir = str(out / "r")
    p = env.start(out, ranks=2)
    if not reached(o, p, r"^step\s+3/", "step 3/"):
        return
    os.killpg(p.pid, signal.SIGTERM)
    p.rc = p.wait()
    got = p.lines("stopped:")
    o.check(len(got) == 1 and re.search(r"stopped by SIGTERM after step \d+; checkpoint", got[0] if got else ""),
            f"`stopped:` lines: {got!r}")
    o.check(not any("Traceback" in x for x in p.err), "a traceback on stderr")
    o.message = got[0] if got else ""
    done = max(train_steps(run_dir) or [0])
    o.check(latest_step(run_dir) == done, f"latest {latest_step(run_dir)}, last finished step {done}")
    o.note(f"the `deepspeed` runner's exit status: {p.rc} (it has no SIGTERM handler on one node; launch.py exits 1 "
           f"after its own SIGTERM, whatever the ranks' 75)")
    resume_and_compare(env, o, run_dir, done, 2, max_lost=1)


def _end_phase(env, o, label, patch, line, needle, max_latency):
    """Run to the end with eval_final; SIGTERM when the patched phase prints `line`; exit 75 with `needle` within
    max_latency s; then resume=auto finishes it: export equal to the uninterrupted run's, eval/final.json written."""
    out = env.fresh(label)
    run_dir = str(out / "r")
    script = patched_train(out, patch)
    p = Proc(script_cmd(script, env.args(out, "callbacks=[progress,eval_final]")))
    if not reached(o, p, rf"^{line}", line):
        return None
    os.kill(p.pid, signal.SIGTERM)
    t0 = time.time()
    p.rc = p.wait()
    latency = time.time() - t0
    one_line(o, p, "stopped:", needle, rc=EXIT_PREEMPTED)
    o.check(latency < max_latency, f"exited {latency:.1f} s after SIGTERM, want < {max_latency}")
    o.check(latest_step(run_dir) == STEPS, f"latest names step {latest_step(run_dir)}, want {STEPS}")
    o.check(not os.path.exists(os.path.join(run_dir, "eval", "final.json")), "eval/final.json written anyway")
    o.check(not _tmp_leftovers(run_dir), f"leftovers: {_tmp_leftovers(run_dir)}")
    o.note(f"exit {latency:.1f} s after the SIGTERM")
    export_first = weights_equal(env.reference(1), run_dir)
    r = env.train(out, "resume=auto", "callbacks=[progress,eval_final]")
    if o.check(r.rc == 0, f"resume=auto exited {r.rc}: {r.tail(800)!r}"):
        o.check(os.path.isfile(os.path.join(run_dir, "eval", "final.json")), "no eval/final.json after the resume")
        o.weights_equal = weights_equal(env.reference(1), run_dir)
        o.check(o.weights_equal, "exported weights differ from the uninterrupted run")
        o.steps_lost = 0
    return export_first


@scenario("preempt_during_export", "SIGTERM during the final export (slowed by 3 s), eval_final on; then resume=auto",
          "resumed exactly")
def preempt_during_export(env, o):
    first = _end_phase(env, o, "during-export", slowed("distillery.models", "export_hf", "exporting", 3),
                       "exporting", rf"stopped by SIGTERM after step {STEPS} and its export, before the end-of-run "
                                    r"evaluation; checkpoint \S+step00000016; rerun .*resume=auto to finish", 30)
    o.check(first, "the export the stopped run finished is missing or differs from the uninterrupted run's")


@scenario("preempt_during_final_eval", "SIGTERM during the end-of-run evaluation (eval_final, slowed by 5 s); then "
                                       "resume=auto", "resumed exactly")
def preempt_during_final_eval(env, o):
    _end_phase(env, o, "during-eval", slowed("plugins.eval_final:EvalFinal", "on_train_end", "final evaluation", 5),
               "final evaluation", rf"stopped by SIGTERM during the end-of-run evaluation of step {STEPS} \(export "
                                   r"written\); checkpoint \S+step00000016; rerun .*resume=auto to finish", 3)


@scenario("export_sigkill", "SIGKILL in the middle of the final export (after model.safetensors is written into "
                            "export.tmp-<pid>); then resume=auto", "resumed exactly")
def export_sigkill(env, o):
    out = env.fresh("export-kill")
    run_dir = str(out / "r")
    script = patched_train(out, """
        import safetensors.torch as _st
        _save = _st.save_file
        def _save_and_die(*a, **k):
            _save(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        _st.save_file = _save_and_die
        """)
    p = run(script_cmd(script, env.args(out)))
    o.check(p.rc == -signal.SIGKILL, f"exit status {p.rc}, want -9: {p.tail(600)!r}")
    left = [n for n in os.listdir(run_dir) if n.startswith("export")]
    o.check(len(left) == 1 and re.match(r"export\.tmp-\d+$", left[0]), f"after the kill: {left}, want export.tmp-<pid>")
    r = resume_and_compare(env, o, run_dir, STEPS, 1, max_lost=0)
    o.steps_lost = 0 if r.rc == 0 else None
    notes = r.lines("note:")
    o.check(any(re.search(r"removed \S+export\.tmp-\d+, left by a write killed earlier", x) for x in notes),
            f"no note on the removed leftover: {notes!r}")
    o.check(not _tmp_leftovers(run_dir), f"leftovers after the resume: {_tmp_leftovers(run_dir)}")
    removed = [x for x in notes if "removed" in x]
    o.message = removed[0] if removed else ""
    o.note(f"{len(notes)} note lines on the resume (the killed run's lock is taken over too)")


@scenario("ds_config_not_json", "--ds_config a file that is not valid JSON (a trailing comma)", "refused cleanly",
          slow=False)
def ds_config_not_json(env, o):
    out = env.fresh("ds-json")
    bad = out / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3},}\n')
    args = env.args(out / "runs")
    p = run(env.cmd(["--ds_config", bad, *args[2:]]))
    one_line(o, p, "error:", r"DeepSpeed config \S+ds.json is not valid JSON at line 1, column \d+: .*; fix the file")
    o.check(not os.path.exists(out / "runs"), "something was written")


# ============================================================================ end of issue 24's scenarios


# ---------------------------------------------------------------------------- driver
def run_scenario(name, env):
    s = SCENARIOS[name]
    o = Outcome(name, s["expect"])
    t0 = time.perf_counter()
    try:
        s["fn"](env, o)
    except Exception as e:  # noqa: BLE001  (a scenario that crashes is a FAILED row, with the reason)
        o.problems.append(Problem(f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"))
    o.seconds = time.perf_counter() - t0
    return o


def _cell(v):
    return "n.a." if v is None else ("yes" if v is True else "no" if v is False else str(v))


def table(outcomes, work=None):
    """The markdown table; `work` (the work directory) is shown as <work> in the messages."""
    rows = ["| scenario | what was done | survived | steps lost | weights equal | s | what the user saw / notes |",
            "|---|---|---|---|---|---|---|"]
    short = (lambda t: t.replace(str(work).rstrip("/"), "<work>")) if work else (lambda t: t)
    for o in outcomes:
        msg = short(o.message).replace("|", "\\|")
        if len(msg) > 300:
            msg = msg[:297] + "..."
        extra = short("; ".join(o.notes + [f"**{p}**" for p in o.problems])).replace("|", "\\|")
        cell = f"`` {msg} ``" if msg else ""
        cell += ("<br>" if cell and extra else "") + extra
        rows.append(f"| {o.scenario} | {SCENARIOS[o.scenario]['what']} | {o.survived} | {_cell(o.steps_lost)} | "
                    f"{_cell(o.weights_equal)} | {o.seconds:.0f} | {cell} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--work", default="", help="work directory (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--data", default="", help="a data_prep output to use instead of building one (vocab 512, "
                                               "64-token rows)")
    args = ap.parse_args(argv)
    if args.list:
        for n, s in SCENARIOS.items():
            print(f"{n:<24} {'' if s['slow'] else '(fast) '}{s['what']}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; see --list")
    child_env()  # sets DS_ACCELERATOR here too on a machine without CUDA (no accelerator-probe warning)
    work = args.work or tempfile.mkdtemp(prefix="faults-")
    env = Env(work, data=args.data or None)
    t0 = time.perf_counter()
    outcomes = []
    try:
        for n in names:
            print(f"[faults] {n} ...", file=sys.stderr, flush=True)
            o = run_scenario(n, env)
            outcomes.append(o)
            print(f"[faults] {n}: {o.survived} ({o.seconds:.0f} s)" +
                  "".join(f"\n    {p}" for p in o.problems), file=sys.stderr, flush=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(outcomes, work))
    print(f"\n{len(outcomes)} scenarios in {time.perf_counter() - t0:.0f} s; "
          f"{sum(o.survived == 'FAILED' for o in outcomes)} FAILED")
    print(json.dumps({o.scenario: o.summary() for o in outcomes}))
    return 1 if any(o.survived == "FAILED" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
