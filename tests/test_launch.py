"""distillery/launch.py: the process group of a world of one, and no DeepSpeed C++ op build on CPU."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os
os.environ["DS_ACCELERATOR"] = "cpu"
from deepspeed.ops.op_builder import builder
def refuse(self, *a, **k):
    raise SystemExit("an op build was attempted: " + self.name)
builder.OpBuilder.load = refuse
import torch
from distillery.launch import init_distributed
print(init_distributed(), hasattr(torch, "build_shm_op"))
"""


def test_init_distributed_builds_no_op_and_leaves_torch_alone():
    """A world of one comes up without compiling DeepSpeed's CPU shared-memory op (a process killed during that build
    leaves a torch_extensions lock that hangs every later launch), and the patch lands on deepspeed.comm.torch, not
    on the torch package that deepspeed.comm re-exports under the same attribute name."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(0, 1) False"


def test_shutdown_leaves_the_process_group():
    """launch.shutdown (train.py and data_prep.teacher_cache call it after success): barrier, then the group is
    destroyed, so the process exits without a live gloo group; a no-op when there is none."""
    code = ("from distillery.launch import init_distributed, shutdown\n"
            "import torch.distributed as dist\n"
            "shutdown()\n"                                        # nothing to leave yet
            "init_distributed()\n"
            "shutdown()\n"
            "print(dist.is_initialized())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
