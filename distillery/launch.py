"""Process-group start-up shared by train.py, the benchmarks, the tests and the sweeps."""
import importlib
import logging
import os
import socket


def free_port():
    """A free TCP port on loopback for a rendezvous (DeepSpeed's default 29500 may be held by another job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Join the process group the deepspeed launcher describes in the environment, or make a world of one when the
    process was started without it (`python train.py`). Returns (rank, world_size)."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # instead of DeepSpeed's accelerator-probe warning
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce op (used only by its inference all_reduce; we
        # reduce through gloo) under a torch_extensions file lock: a minute on a fresh machine, and a process killed
        # while it holds the lock leaves every later launch waiting forever. Skip it.
        # (by module name: the attribute deepspeed.comm.torch is the torch package itself, re-exported by
        # deepspeed.comm's star import, so `import deepspeed.comm.torch as m` would patch torch instead)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def shutdown():
    """Leave the process group at the end of a successful run: every rank meets at a barrier, then destroys its
    group. A multi-rank CPU run that exits with a live gloo group can abort in C++ teardown after all its work is
    done ('terminate called without an active exception', exit 250), which a scheduler reads as a failure."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_world():
    """(rank, world size): from the process group when one is up, else from the launcher's environment (before
    init), else (0, 1). The one place the project asks which rank it is."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def from_rank0(obj):
    """Rank 0's `obj` on every rank (what the other ranks pass is ignored): the one way a decision rank 0 made (a
    checkpoint to resume, whether to save) reaches every rank. A collective when more than one rank is up."""
    import torch.distributed as dist
    if rank_world()[1] == 1 or not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
