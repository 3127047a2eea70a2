"""Shared fixtures: a small offline data set (real text, 512-token BPE, 64-token rows) and a micro teacher."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add contention on 2 cores

# Every trainer test uses these: micro model, 8 rows of 64 tokens per step, 2 micro-batches of 4 on one rank.
BASE = ["student=micro", "micro_batch_size=4", "global_batch_size=8", "log_interval=1", "eval_window=64",
        "eval_max_windows=4", "train_tokens=5120", "lr=3e-3"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "offline"
    from data_prep import offline
    offline.main(["--out", str(out), "--vocab_size", "512", "--seq_len", "64", "--max_train_mb", "3"])
    return str(out)


def make_teacher(data_dir, out, preset="micro", seed=0):
    """A random-init Hugging Face teacher directory sharing the data's tokenizer."""
    from distillery.models import save_random_init
    return save_random_init(preset, data_dir, out, 64, seed)


@pytest.fixture(scope="session")
def teacher_dir(data_dir, tmp_path_factory):
    return make_teacher(data_dir, tmp_path_factory.mktemp("teacher") / "t")


def clean_env():
    """Environment for a child process: without the process-group variables an in-process run has set here."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, PYTHONPATH=str(REPO))


def run_inprocess(data_dir, out_dir, *overrides, ds_config="ds_configs/cpu.json"):
    """train.main in this process (world of one); returns the run directory."""
    import train
    return train.main(["--ds_config", str(REPO / ds_config), f"data={data_dir}", f"out_dir={out_dir}", *BASE,
                       *overrides])


def run_launcher(data_dir, out_dir, *overrides, nproc=2, ds_config="ds_configs/cpu.json", timeout=600):
    """The real entry point: the deepspeed launcher with nproc CPU ranks (gloo)."""
    from distillery.launch import free_port
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
           str(REPO / "train.py"), "--ds_config", str(REPO / ds_config), f"data={data_dir}", f"out_dir={out_dir}",
           *BASE, *overrides]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = {r["step"]: r for r in rows if "loss/total" in r}
    evals = {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}
    return train, evals


@pytest.fixture
def small_fs(tmp_path):
    """A real, tiny filesystem (a 2 MiB tmpfs) to fill up: where mounting is not permitted (not root, no
    CAP_SYS_ADMIN, a container without mount rights) the test is skipped and says why."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({(p.stderr or p.stdout).strip()}): the real full-disk test needs "
                    f"root with mount rights")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
