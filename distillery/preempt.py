"""Preemption: a scheduler's signal becomes "stop where it is safe, keep a resumable state, exit with EXIT_PREEMPTED".

SIGTERM (what Slurm, Kubernetes and most schedulers send before killing a job) and SIGUSR1 (Slurm's
`--signal=USR1@120`) stop a run with EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again"), one `stopped:` line naming what
was kept, and the run directory left for `resume=auto`, at whatever point they arrive:

| when                                   | what happens                                                             |
|----------------------------------------|--------------------------------------------------------------------------|
| imports, config checks, process group  | stop at once (train.py calls catch_early() first thing; nothing written) |
| start-up under the run lock (data      | stop at once: Preempted raised from the handler, the lock released, no   |
| checks, engines, checkpoint load)      | file half-written (every write is atomic)                                |
| training steps, in-loop eval and saves | a flag, folded into the token-count all-reduce every step already does:  |
|                                        | every rank stops at the same step boundary; rank 0 decides whether a     |
|                                        | checkpoint is needed (not if `latest` already holds the step, or no step |
|                                        | ran, or a run of skipped updates is open: guard.py) and every rank       |
|                                        | follows, then the save, then exit                                        |
| the final export                       | it finishes (it is already gathering); then stop before the evaluation  |
| the end-of-run evaluation              | stop at once (its results are written atomically at its end)             |
| after all of it                        | ignored: the run is complete, exit 0                                     |

The checkpoint of the last step is committed before the export, so a run stopped (or killed) in the end phase is
finished by `resume=auto`: it loads that checkpoint, runs no step, exports and evaluates. A second signal while
stopping changes nothing: the handlers stay installed until the process exits, so the status stays 75 (the trainer's
command line; in-process callers get their handlers back).

The deepspeed launcher: SIGTERM to its per-node `launch.py` is passed on to the ranks as SIGTERM (then SIGKILL after
30 s: a save must fit in that), but SIGTERM to the `deepspeed` runner itself (single node) kills only the runner and
leaves launch.py and the ranks running. So each rank also watches the runner process it was started under (found at
start-up from the process tree) and treats its disappearance like a SIGTERM.
"""
import os
import signal
import sys

from distillery.errors import Preempted

EXIT_PREEMPTED = 75  # = distillery.errors.Preempted.exit_code
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_cli = False         # catch_early() ran: this process is the trainer's command line, not a caller of train.main


def catch_early():
    """First thing in the trainer's process (train.py, before its slow imports), until main() enters its
    Preemption: a signal stops the process at once with one line and EXIT_PREEMPTED, instead of killing it with -15
    and no message. Nothing has been written yet (the run lock comes later)."""
    global _cli
    _cli = True
    for s in SIGNALS:
        signal.signal(s, _exit_early)


def _exit_early(signum, frame):
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"stopped: stopped by {signal.Signals(signum).name} during start-up, before anything was written; "
              f"rerun the same command", file=sys.stderr, flush=True)
    os._exit(EXIT_PREEMPTED)


def _runner_pid():
    """The pid of the `deepspeed` runner above this rank (rank -> launch.py -> runner), or None."""
    try:
        import psutil
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return None
        runner = parent.parent()  # bin/deepspeed or `python -m deepspeed.launcher.runner`; not pdsh or a shell
        return runner.pid if runner is not None and "deepspeed" in " ".join(runner.cmdline()) else None
    except Exception:  # noqa: BLE001  (no psutil, no /proc: only the signals work)
        return None


class Preemption:
    """The signal handlers for the life of a run (`with Preemption() as p:`, main thread), in one of two modes:
    at once (`at_once(where)`: the handler raises Preempted, for phases that write nothing half-way) or deferred
    (`defer()`: the handler only sets a flag, which the trainer reads at safe points: requested(), agreed())."""

    def __init__(self):
        self.signum = None
        self._where = "during start-up, before the first step; nothing was saved; rerun the same command"
        self._previous = {}
        self._runner = None

    def __enter__(self):
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. a test harness): signals stay as they were
                pass
        self._runner = _runner_pid()
        return self

    def __exit__(self, *exc):
        self._where = None  # from here a signal changes nothing: the run's outcome is decided
        if not _cli:        # the command line keeps them until it exits (a 2nd SIGTERM must not turn 75 into -15)
            self.restore()
        return False

    def _handler(self, signum, frame):
        self.signum = self.signum or signum
        self._raise_if_at_once()

    def _raise_if_at_once(self):
        if self._where is not None and self.signum is not None:
            where, self._where = self._where, None  # once: the exception may be unwinding when a 2nd signal comes
            raise Preempted(f"stopped by {self.reason()} {where}")

    def at_once(self, where):
        """From now on a signal raises Preempted("stopped by SIG... <where>") where the program is (raised here if
        one came already)."""
        self._where = where
        self._raise_if_at_once()

    def defer(self):
        """From now on a signal only sets the flag."""
        self._where = None

    def requested(self):
        """1.0 if this rank was asked to stop (a signal, or its launcher is gone), else 0.0."""
        if self.signum is None and self._runner is not None and not _alive(self._runner):
            self.signum = signal.SIGTERM
        return 1.0 if self.signum is not None else 0.0

    def agreed(self, device):
        """Collective (every rank at the same point): True if any rank was asked to stop."""
        import torch
        import torch.distributed as dist
        t = torch.tensor([self.requested()], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t.item() > 0

    def stop_if_requested(self, device, where):
        """Collective: Preempted("stopped by SIG... <where>") on every rank if any rank was asked to stop."""
        if self.agreed(device):
            raise Preempted(f"stopped by {self.reason()} {where}")

    def reason(self):
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def save_decision(step, start_step, latest, streak, first_bad):
    """Rank 0, at the step boundary before `step` when a stop was requested: (save?, what to say instead). Every
    rank must follow rank 0's answer: a rank that decided alone from a stale `latest` (attribute caching on a shared
    filesystem) could skip the collective save the others enter, and hang them."""
    if step == start_step:
        return False, f"no step ran since {'the start' if not step else f'checkpoint {latest}'}"
    if latest == f"step{step:08d}":
        return False, None  # just saved
    if streak:
        return False, (f"not saved: steps {first_bad}..{step} skipped their updates, and an open run of skipped "
                       f"updates is never checkpointed; " + (f"the last checkpoint is {latest}" if latest else
                                                             "there is no checkpoint yet"))
    return True, None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
