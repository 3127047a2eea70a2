"""It runs (issue 18, part 2): train.py under the deepspeed launcher, ZeRO-3 student + ZeRO-3 inference teacher,
a few optimizer steps with a live partitioned teacher (teacher_placement=partitioned: `auto` would replicate a
teacher this small), then with teacher_placement=offload, then a resume from the first run's
checkpoint. Tiny models: this part is about the machinery (launcher, engines, precision, offload, checkpoints), not
speed; the speed and the real shapes are parts 4 and 5.

    python bench/trainer_runs.py data    --work W [--gpu]   # W/data: offline corpus (BPE 2048, 128-token rows,
                                                             # 2 MB of text, ~10 s) and W/teacher (random micro)
    python bench/trainer_runs.py live    --work W [--gpu]   # 3 steps, alpha 0.4, live teacher; checkpoint at step 3
    python bench/trainer_runs.py offload --work W [--gpu]   # 2 steps, teacher_placement=offload (offload_param)
    python bench/trainer_runs.py resume  --work W [--gpu]   # resume=auto on live's run: steps 4-6

GPU: ds_configs/zero3.json (bf16, ZeRO-3); CPU: ds_configs/cpu.json (fp32, ZeRO-3, gloo). Student and teacher are the
`micro` preset; 8 rows of 128 tokens per step in 2 micro-batches of 4, one rank. doc_mask=false: document masking
is checked on its own (right_doc_mask: distillery/maskprobe.py) and runs at real shapes in the `paper` check, so a kernel problem
there does not hide whether the engines run. Each ends with one JSON line; a run that fails or logs a non-finite
loss exits non-zero with the tail of the launcher's output.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STEPS = {"live": 3, "offload": 2, "resume": 3}
BASE = ["student=micro", "alpha=0.4", "micro_batch_size=4", "global_batch_size=8", "train_tokens=10240",
        "log_interval=1", "eval_interval=-1", "eval_window=64", "eval_max_windows=4", "doc_mask=false",
        "export=false"]


def build_data(work):
    """The offline corpus and a random micro teacher sharing its tokenizer (kept when already there)."""
    from data_prep import offline
    from distillery.models import save_random_init
    data, teacher = os.path.join(work, "data"), os.path.join(work, "teacher")
    reused = os.path.isfile(os.path.join(data, "index.json"))
    if not reused:
        offline.build(data, vocab_size=2048, seq_len=128, max_train_bytes=2 * 2 ** 20, progress=False)
    if not os.path.isfile(os.path.join(teacher, "config.json")):
        save_random_init("micro", data, teacher, 128, seed=1)
    with open(os.path.join(data, "index.json")) as f:
        index = json.load(f)
    return dict(data=data, teacher=teacher, reused=reused, vocab=index["vocab_size"],
                train_rows=index["splits"]["train"].get("rows"))


def overrides(what, work):
    """The trainer's key=value overrides of run `what` (after BASE)."""
    name = "offload" if what == "offload" else "live"
    over = [f"data={work}/data", f"teacher={work}/teacher", f"out_dir={work}/runs", f"name={name}",
            f"max_steps={STEPS[what]}", f"teacher_placement={'offload' if what == 'offload' else 'partitioned'}"]
    return over + (["resume=auto"] if what == "resume" else [])


def launch(what, work, gpu):
    """One train.py run through `python -m deepspeed.launcher.runner --num_gpus 1`; returns (rc, output)."""
    from distillery.launch import free_port
    over = overrides(what, work)
    ds = os.path.join(REPO, "ds_configs", "zero3.json" if gpu else "cpu.json")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           os.path.join(REPO, "train.py"), "--ds_config", ds, *BASE, *over]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    with open(os.path.join(work, f"{what}.log"), "w") as f:
        f.write(p.stdout + p.stderr)
    return p.returncode, p.stdout + p.stderr, cmd, ds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("data", "live", "offload", "resume"))
    ap.add_argument("--work", required=True, help="scratch folder (data, teacher, runs)")
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args(argv)
    import torch
    if a.gpu and not torch.cuda.is_available():
        raise SystemExit("error: --gpu but CUDA is not available; drop --gpu for the CPU twin")
    t = time.time()
    if a.what == "data":
        print(json.dumps({"bench": "trainer_runs", "what": "data", **build_data(a.work),
                          "seconds": round(time.time() - t, 1)}))
        return
    if not os.path.isfile(os.path.join(a.work, "data", "index.json")):
        raise SystemExit(f"error: no data in {a.work}/data; run `python bench/trainer_runs.py data --work {a.work}`")
    run_dir = os.path.join(a.work, "runs", "offload" if a.what == "offload" else "live")
    if a.what == "resume" and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        raise SystemExit(f"error: no checkpoint in {run_dir}; run `live` first (the resume continues it)")
    if a.what != "resume":
        shutil.rmtree(run_dir, ignore_errors=True)  # our own scratch run from an earlier call
    rc, out, cmd, ds = launch(a.what, a.work, a.gpu)
    if rc != 0:
        print(out[-3000:])
        raise SystemExit(f"error: the launcher exited {rc} ({a.what}); full output in {a.work}/{a.what}.log")
    from distillery.runlog import read_metrics
    steps, _ = read_metrics(run_dir)
    first = 1 + (STEPS["live"] if a.what == "resume" else 0)
    want = list(range(first, first + STEPS[a.what]))
    got = {s: steps[s] for s in want if s in steps}
    losses = [got[s]["loss/total"] for s in sorted(got)]
    share = [got[s].get("perf/teacher_share") for s in sorted(got)]
    rec = {"bench": "trainer_runs", "what": a.what, "device": torch.cuda.get_device_name() if a.gpu else "cpu",
           "ds_config": os.path.relpath(ds, REPO), "steps": sorted(got), "expected_steps": want,
           "loss_total": losses, "loss_ce": [got[s]["loss/ce"] for s in sorted(got)],
           "teacher_share": share, "tokens_per_s_last": got[max(got)]["perf/tokens_per_s"] if got else None,
           "checkpoints": sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
           if os.path.isdir(os.path.join(run_dir, "checkpoints")) else [],
           "seconds": round(time.time() - t, 1)}
    live_dir = os.path.join(a.work, "runs", "live")
    if a.what == "offload" and os.path.isfile(os.path.join(live_dir, "metrics.jsonl")):
        # same seed, data and models as live's first steps: offloading the teacher's parameters moves them, it does
        # not change the arithmetic, so the losses should match (reported, not judged: the bf16 kernels may differ)
        live, _ = read_metrics(live_dir)
        both = [s for s in sorted(got) if s in live]
        rec["max_rel_diff_vs_live"] = max((abs(got[s]["loss/total"] - live[s]["loss/total"]) /
                                           abs(live[s]["loss/total"]) for s in both), default=None)
    rec["ok"] = (sorted(got) == want and all(math.isfinite(x) for x in losses)
                 and all(s is not None and 0 < s < 1 for s in share)
                 and (a.what == "offload" or f"step{want[-1]:08d}" in rec["checkpoints"]))
    print(json.dumps(rec))
    if not rec["ok"]:
        raise SystemExit(f"error: {a.what}: expected steps {want} with finite losses, a teacher share in (0, 1) and "
                         f"a checkpoint at step {want[-1]}; got {rec}")


if __name__ == "__main__":
    from distillery.errors import cli
    cli(main)
