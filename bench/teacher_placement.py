"""Bytes each teacher placement moves and memory it holds, on 2 CPU ranks (gloo), beside distillery/zero_cost.py.

    python bench/teacher_placement.py              # replicated, partitioned, offload; ~9 min on 2 busy cores

Per placement, a fresh pair of ranks (the deepspeed launcher) builds the trainer's teacher (distillery.placement.
build_teacher, fp32 on CPU) and ZeRO-3 student (distillery.engines.init_student) and runs the trainer's own micro-step
(distillery/step.py) for WARM + STEPS optimizer steps of GA micro-batches. A counter around torch.distributed's
collectives (distillery/commcount.py) records the bytes each rank sends, with the teacher's share (its forward and
the gather of its head: micro_step's teacher_timer hook) apart from the student's; the numbers are per optimizer step
over the last STEPS (ZeRO-3 traces its first step, which gathers more). Predicted beside them, for this world size:
  teacher   GA x zero_cost.teacher_gather_bytes (0 replicated);
  student   all-gather between GA x all_gather_min + persistent_gather and GA x all_gather_max + persistent_gather
            (the range zero_cost.student_comm_bytes states), reduce-scatter GA x reduce_scatter.
Memory per rank (glibc told to mmap allocations over 128 KiB, so RSS follows live tensors): RSS before any model,
after building the teacher (against its parameters: all, or the partition), and the peak over the measured steps
(VmHWM, reset after building; against zero_cost's teacher_resident_bytes + teacher_forward_bytes + student_bytes).
On CPU the offloaded partitions are host memory too, so offload's RSS is predicted as partitioned's. Also: the RSS a
replicated teacher adds when a bf16 run loads it from the fp32 file (no fp32 copy: about the bf16 size).
Losses: every placement's, on the same batches, must be bitwise equal (losses_equal). Model sizes: a teacher of 34M
parameters (134 MB fp32), large next to the 5.5M student so the placements' memory differs visibly in RSS.
Ends with one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PLACEMENTS = ("replicated", "partitioned", "offload")
WORLD, GA, MB, SEQ, WARM, STEPS = 2, 2, 2, 64, 2, 3
MMAP = 1 << 17  # glibc: allocations over 128 KiB are mmapped and unmapped on free, so RSS follows live tensors
TEACHER = dict(vocab=8192, hidden=512, layers=8, heads=8, kv=4, ffn=1536)
STUDENT = dict(vocab=8192, hidden=256, layers=2, heads=4, kv=2, ffn=768)


def llama(p):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                       num_attention_heads=p["heads"], num_key_value_heads=p["kv"], intermediate_size=p["ffn"],
                       head_dim=p["hidden"] // p["heads"], max_position_embeddings=SEQ, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 5e5}, use_cache=False,
                       attn_implementation="sdpa")


def rss(field):
    """VmRSS / VmHWM of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(placement, teacher_dir, out):
    """One rank: build, run, count, write out/rank<r>.json."""
    import torch
    from distillery.commcount import CommCounter
    counter = CommCounter(WORLD).install()  # before the process group: DeepSpeed binds the functions at creation
    from distillery.launch import init_distributed, shutdown
    rank, world = init_distributed()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from distillery.config import Config
    from distillery.engines import init_student, student_ds_config
    from distillery.loss_parts import shift_targets
    from distillery.models import zero3_context
    from distillery.objective import Objective
    from distillery.placement import build_teacher
    from distillery.step import micro_step
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported before the baseline RSS)
    cfg = Config(teacher=teacher_dir, teacher_placement=placement, micro_batch_size=MB, seq_len=SEQ,
                 global_batch_size=MB * GA * world, lr=1e-4, alpha=0.5, train_tokens=10 ** 6)
    ds_base = {"zero_optimization": {"stage": 3}}
    rss_base = rss("VmRSS")
    teacher = build_teacher(cfg, ds_base)
    rss_teacher = rss("VmRSS")
    ds_student = student_ds_config(ds_base, cfg, world)
    torch.manual_seed(0)
    with zero3_context(ds_student):
        lm = AutoModelForCausalLM.from_config(llama(STUDENT))
    engine = init_student(lm, cfg, ds_student, total_steps=100)
    objective = Objective.from_config(cfg, total_steps=100)
    loss_kw = dict(objective.loss_kw(), kd_vocab=STUDENT["vocab"])
    g = torch.Generator().manual_seed(rank)
    rss_built = rss("VmRSS")
    teacher_phase = lambda: counter.phase("teacher")  # noqa: E731  (micro_step's hook around the teacher's share)
    times, losses = [], []
    for step in range(WARM + STEPS):
        if step == WARM:
            counter.reset()
            with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS from here on
                f.write("5")
        t0 = time.perf_counter()
        for _ in range(GA):
            x = torch.randint(0, STUDENT["vocab"], (MB, SEQ), generator=g)
            with counter.phase("student"):
                parts = micro_step(engine, teacher, x, shift_targets(x), loss_kw, 1e-3, 1e-3,
                                   teacher_timer=teacher_phase)
            losses.append(float(parts["loss"]))
        if step >= WARM:
            times.append(time.perf_counter() - t0)
    res = {"rank": rank, "bytes": {p: {k: v / STEPS for k, v in d.items()} for p, d in counter.totals().items()},
           "rss_base": rss_base, "rss_teacher": rss_teacher, "rss_built": rss_built, "rss_peak": rss("VmHWM"),
           "step_s": sorted(times)[STEPS // 2],
           "losses": losses}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    shutdown()


def load_bf16(teacher_dir):
    """The replicated teacher of a bf16 run, loaded from the fp32 safetensors file: RSS it adds (bytes)."""
    import torch
    from transformers.models.llama import modeling_llama  # noqa: F401
    from distillery.config import Config
    from distillery.placement import build_teacher
    torch.set_num_threads(1)
    before = rss("VmRSS")
    t = build_teacher(Config(teacher=teacher_dir, teacher_placement="replicated"), {"bf16": {"enabled": True}})
    assert all(p.dtype == torch.bfloat16 for p in t.module.parameters())
    print(json.dumps({"rss_added": rss("VmRSS") - before, "params": sum(p.numel() for p in t.module.parameters())}))


def predict(placement):
    """zero_cost's numbers for this bench's models, per rank: bytes per optimizer step, memory (bytes)."""
    from distillery import zero_cost
    from distillery.config import Config
    t, s = llama(TEACHER), llama(STUDENT)
    c = zero_cost.student_comm_bytes(s, WORLD, 4)
    like = "partitioned" if placement == "offload" else placement  # on CPU the offloaded partitions are RSS too
    teacher = zero_cost.teacher_resident_bytes(like, t, WORLD, 4)
    rest = (zero_cost.teacher_forward_bytes(t, MB, SEQ, 4)
            + zero_cost.student_bytes(s, {"zero_optimization": {"stage": 3}}, WORLD, Config(micro_batch_size=MB,
                                                                                              seq_len=SEQ), 4))
    gather = 0.0 if placement == "replicated" else GA * zero_cost.teacher_gather_bytes(t, WORLD, 4)
    return {"teacher_all_gather": gather,
            "student_all_gather": [GA * c["all_gather_min"] + c["persistent_gather"],
                                   GA * c["all_gather_max"] + c["persistent_gather"]],
            "student_reduce_scatter": GA * c["reduce_scatter"]}, {
            # what the built teacher holds before any forward: all of it, or its partition (host memory on CPU)
            "teacher_built": 4 * (sum(zero_cost.tensor_numels(t).values()) if placement == "replicated"
                                  else zero_cost.partition_elems(t, WORLD)),
            "teacher": teacher, "peak_over_base": teacher + rest}


def run(placement, teacher_dir):
    from distillery.launch import free_port
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(WORLD), "--master_port",
               str(free_port()), os.path.abspath(__file__), "--child", placement, "--teacher", teacher_dir,
               "--out", out]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                           env=dict(env, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MALLOC_MMAP_THRESHOLD_=str(MMAP)))
        if p.returncode != 0:
            raise SystemExit(f"{placement} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(WORLD)]
    return ranks


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "load_bf16":
        return load_bf16(a.teacher)
    if a.child:
        return child(a.child, a.teacher, a.out)
    import torch
    from transformers import AutoModelForCausalLM
    mib = lambda x: round(x / 2 ** 20, 1)  # noqa: E731
    nbytes, memory, steps = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(llama(TEACHER)).save_pretrained(tmp)  # safetensors, fp32
        for placement in PLACEMENTS:
            ranks = run(placement, tmp)
            pb, pm = predict(placement)
            tb, sb = ranks[0]["bytes"].get("teacher", {}), ranks[0]["bytes"].get("student", {})
            nbytes[placement] = {
                "teacher_all_gather": tb.get("all_gather", 0.0),
                "teacher_other": sum(v for k, v in tb.items() if k != "all_gather"),
                "student_all_gather": sb.get("all_gather", 0.0),
                "student_reduce_scatter": sb.get("reduce_scatter", 0.0),
                "student_all_reduce": sb.get("all_reduce", 0.0),
                "same_on_both_ranks": ranks[0]["bytes"] == ranks[1]["bytes"], "predicted": pb}
            memory[placement] = {
                "teacher_built": [mib(r["rss_teacher"] - r["rss_base"]) for r in ranks],
                "predicted_teacher_built": mib(pm["teacher_built"]),
                "peak_over_base": [mib(r["rss_peak"] - r["rss_base"]) for r in ranks],
                "predicted_peak_over_base": mib(pm["peak_over_base"]), "predicted_teacher": mib(pm["teacher"]),
                "rss_base": [mib(r["rss_base"]) for r in ranks]}
            steps[placement] = ranks[0]
            b, m = nbytes[placement], memory[placement]
            print(f"{placement:<12} teacher all-gather {b['teacher_all_gather']:>12,.0f} B/step (predicted "
                  f"{pb['teacher_all_gather']:,.0f}); student all-gather {b['student_all_gather']:,.0f} (predicted "
                  f"{pb['student_all_gather'][0]:,.0f}..{pb['student_all_gather'][1]:,.0f}), reduce-scatter "
                  f"{b['student_reduce_scatter']:,.0f} (predicted {pb['student_reduce_scatter']:,.0f}); teacher "
                  f"built {m['teacher_built']} MiB (predicted {m['predicted_teacher_built']}), peak RSS over base "
                  f"{m['peak_over_base']} MiB (predicted {m['predicted_peak_over_base']})", flush=True)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "load_bf16", "--teacher", tmp],
                           cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MALLOC_MMAP_THRESHOLD_=str(MMAP)))
        if p.returncode != 0:
            raise SystemExit(f"load_bf16 failed:\n{p.stderr[-3000:]}")
        bf16 = json.loads(p.stdout.strip().splitlines()[-1])
        bf16 = {"rss_added": mib(bf16["rss_added"]), "bf16_weights": mib(2 * bf16["params"]),
                "fp32_copy_would_be": mib(4 * bf16["params"])}
        print(f"replicated bf16 load of the fp32 file: +{bf16['rss_added']} MiB RSS (bf16 weights "
              f"{bf16['bf16_weights']} MiB, an fp32 copy {bf16['fp32_copy_would_be']} MiB)", flush=True)
    ok = all(b["teacher_all_gather"] == b["predicted"]["teacher_all_gather"]
             and b["student_reduce_scatter"] == b["predicted"]["student_reduce_scatter"]
             and b["predicted"]["student_all_gather"][0] <= b["student_all_gather"]
             <= b["predicted"]["student_all_gather"][1] for b in nbytes.values())
    rep, part = memory["replicated"], memory["partitioned"]
    print(json.dumps({"bench": "teacher_placement", "device": "cpu", "world": WORLD, "grad_accum": GA,
                      "micro_batch": MB, "seq_len": SEQ, "teacher": TEACHER, "student": STUDENT,
                      "bytes_per_optimizer_step_per_rank": nbytes, "bytes_match_prediction": ok,
                      "replicated_teacher_all_gather": nbytes["replicated"]["teacher_all_gather"],
                      "memory_mib_per_rank": memory, "bf16_replicated_load_mib": bf16,
                      "replicated_minus_partitioned_peak_mib": [round(a - b, 1) for a, b in zip(
                          rep["peak_over_base"], part["peak_over_base"])],
                      "predicted_replicated_minus_partitioned_mib": round(
                          rep["predicted_teacher"] - part["predicted_teacher"], 1),
                      "losses_equal": steps["replicated"]["losses"] == steps["partitioned"]["losses"]
                      == steps["offload"]["losses"],
                      "step_s": {p: round(r["step_s"], 3) for p, r in steps.items()},
                      "replicated_step_time_ratio": round(
                          steps["replicated"]["step_s"] / steps["partitioned"]["step_s"], 3)}))


if __name__ == "__main__":
    main()
