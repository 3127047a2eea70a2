"""Preemption (distillery/preempt.py): the handler's two modes, the save decision, and rank 0 deciding for all ranks.
End-to-end signals to the trainer (during start-up, steps, export, evaluation, a second SIGTERM) are scenarios of
bench/faults.py (tests/test_faults.py)."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, clean_env
from distillery import preempt
from distillery.errors import Preempted


def test_at_once_raises_where_the_program_is_and_deferred_only_flags():
    before = signal.getsignal(signal.SIGTERM)
    with preempt.Preemption() as p:
        with pytest.raises(Preempted, match=r"^stopped by SIGUSR1 during start-up, before the first step; nothing "
                                            r"was saved; rerun the same command$"):
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
        p.signum = None
        p.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested() == 1.0 and p.reason() == "SIGTERM"  # still running: only the flag
        with pytest.raises(Preempted, match="^stopped by SIGTERM during the evaluation$"):
            p.at_once("during the evaluation")  # a signal that came earlier raises on entering at-once mode
    assert signal.getsignal(signal.SIGTERM) == before  # an in-process caller gets its handlers back


def test_save_decision():
    """No save when `latest` holds the step, when no step ran since the start, or inside a run of skipped updates."""
    assert preempt.save_decision(4, 0, "step00000002", 0, None) == (True, None)
    assert preempt.save_decision(4, 0, "step00000004", 0, None) == (False, None)
    assert preempt.save_decision(0, 0, None, 0, None) == (False, "no step ran since the start")
    assert preempt.save_decision(8, 8, "step00000008", 0, None) == (False, "no step ran since checkpoint step00000008")
    assert preempt.save_decision(4, 0, "step00000002", 2, 3) == (
        False, "not saved: steps 3..4 skipped their updates, and an open run of skipped updates is never "
               "checkpointed; the last checkpoint is step00000002")


STALE_LATEST = """
import datetime, os, sys, types
sys.path.insert(0, {repo!r})
import torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
import train
from distillery import checkpoint
rank = dist.get_rank()
d = os.path.join({run!r}, "checkpoints")
if rank == 1:  # attribute caching: rank 1 already sees a `latest` naming step 4, rank 0 still step 2's
    checkpoint.read_latest = lambda _d: "step00000004"
saved = []
def save(run, step):  # a collective, like DeepSpeed's save
    saved.append(step)
    dist.barrier()
    return os.path.join(d, checkpoint.tag_for(step))
train.save = save
run = types.SimpleNamespace(plan=types.SimpleNamespace(cfg=types.SimpleNamespace(run_dir={run!r})),
                            ctx=types.SimpleNamespace(rank=rank, start_step=0),
                            guard=types.SimpleNamespace(streak=0, first_bad=None),
                            preemption=types.SimpleNamespace(reason=lambda: "SIGTERM"))
try:
    train.preempt(run, 4)
except train.Preempted as e:
    sys.stdout.write(f"rank {{rank}} saved {{saved}} | {{e}}\\n")  # one write: the ranks share the pipe (print interleaves)
    sys.stdout.flush()
from distillery.launch import shutdown
shutdown()  # leave the gloo group: exiting with it live can abort in C++ teardown after the work is done
"""


def test_rank0_decides_the_preemption_save_for_every_rank(tmp_path):
    """Issue 24 (4): each rank read `latest` itself; one with a stale view skipped the collective save the others
    entered (a hang on a cluster; here gloo's 20 s timeout). Rank 0 decides and every rank follows."""
    from distillery.launch import free_port
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "checkpoints"))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step00000002")
    script = tmp_path / "stale.py"
    script.write_text(STALE_LATEST.format(repo=str(REPO), run=run))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script)], cwd=REPO, env=dict(clean_env(), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for r in (0, 1):
        assert f"rank {r} saved [4] | stopped by SIGTERM after step 4; checkpoint {run}/checkpoints/step00000004" \
            in p.stdout, p.stdout
