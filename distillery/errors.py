"""The one exception root of Distillery, and the one place an entry point turns it into a one-line message.

Every error that is the user's to fix (a bad config, data, plugin, evaluation request, or a run that must stop) is a
DistilleryError whose message names the problem and the fix. Each entry point (`train.py`, every `python -m` tool,
`scripts/*.py`) wraps its main in `cli()`: such an error prints `error: <message>` once (rank 0 only under a
launcher) and exits with status 2 (a Preempted stop: `stopped: ...` and EXIT_PREEMPTED 75, at once, without the
interpreter's slow teardown); anything else is a bug and keeps its traceback.
The kinds subclass ValueError too (RuntimeError for TrainingError), so `except ValueError` callers keep working.
"""
import sys


class DistilleryError(Exception):
    """Root: an error the user can fix; the message says how."""


class ConfigError(DistilleryError, ValueError):
    """A config key, preset, override or DeepSpeed JSON that cannot work."""


class DataError(DistilleryError, ValueError):
    """Shards, indexes, tokenizers or eval sets that are missing, corrupt or do not match."""


class PluginError(DistilleryError, ValueError):
    """An unknown, duplicate or misconfigured plugin (divergence, mix, schedule, callback)."""


class EvalError(DistilleryError, ValueError):
    """An evaluation request that cannot be served (no model, no tokenizer, mismatched sets)."""


class TrainingError(DistilleryError, RuntimeError):
    """The run must stop (non-finite loss, ...); the message says where to resume from."""


class Preempted(DistilleryError):
    """Stopped on request (SIGTERM / SIGUSR1) after saving; exits with EXIT_PREEMPTED so a scheduler can requeue."""
    exit_code = 75  # distillery.preempt.EXIT_PREEMPTED (EX_TEMPFAIL)


def cli(main, argv=None):
    """Run an entry point's main(argv): a DistilleryError becomes `error: ...` on stderr (rank 0) and exit code 2."""
    try:
        return main(argv)
    except DistilleryError as e:
        from distillery.launch import rank_world
        if rank_world()[0] == 0:
            print(f"{'stopped' if isinstance(e, Preempted) else 'error'}: {e}", file=sys.stderr)
        if isinstance(e, Preempted):
            # Everything is committed by now (checkpoint, writers closed, lock released). The interpreter's teardown
            # with torch and DeepSpeed loaded takes seconds (5.6 s measured after a stop in the end-of-run
            # evaluation, 2-core box): a scheduler's SIGKILL a fixed time after its SIGTERM would land there and turn
            # the status 75 into 137. So leave at once.
            import logging
            import os
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        sys.exit(getattr(e, "exit_code", 2))
