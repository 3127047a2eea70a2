"""Preemption: a scheduler's signal becomes "finish this optimizer step, save, exit with EXIT_PREEMPTED".

SIGTERM (what Slurm, Kubernetes and most schedulers send before killing a job) and SIGUSR1 (Slurm's
`--signal=USR1@120`) set a flag; the handler does nothing else, so it is safe at any point of a step. The trainer
folds the flag into the token-count all-reduce it already does at the start of every step (no extra collective):
when any rank was signalled, every rank sees it at the same step boundary, saves one checkpoint and exits with
EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again"), so a requeue script can tell a preemption from a failure.

The deepspeed launcher: SIGTERM to its per-node `launch.py` is passed on to the ranks as SIGTERM (then SIGKILL after
30 s: a save must fit in that), but SIGTERM to the `deepspeed` runner itself (single node) kills only the runner and
leaves launch.py and the ranks running. So each rank also watches the runner process it was started under (found at
start-up from the process tree) and treats its disappearance like a SIGTERM.
"""
import os
import signal

EXIT_PREEMPTED = 75  # = distillery.errors.Preempted.exit_code
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
    """Installs the handlers (main thread only) and answers whether a stop was requested, and why."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. a test harness): signals stay as they were
                pass
        self._runner = _runner_pid()

    def _handler(self, signum, frame):
        self.signum = signum

    def requested(self):
        """1.0 if this rank was asked to stop (a signal, or its launcher is gone), else 0.0."""
        if self.signum is None and self._runner is not None and not _alive(self._runner):
            self.signum = signal.SIGTERM
        return 1.0 if self.signum is not None else 0.0

    def reason(self):
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
