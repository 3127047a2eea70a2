"""What ZeRO-3 moves per step for the study's students and teachers, from the model sizes (docs/scaling.md).

    python scripts/scaling.py                       # the tables of docs/scaling.md, then one JSON line
    python scripts/scaling.py --mfu 0.4 --inter_gbs 40

The counts are distillery/zero_cost.py's (the accounting the trainer's teacher_placement=auto uses, and the
predictions bench/teacher_placement.py checks against measured bytes). Per GPU and per micro-step (one forward +
backward of micro_batch_size x seq_len tokens), in bytes, bf16 parameters and gradients; a ZeRO-3 all-gather or
reduce-scatter moves (n - 1) / n of a tensor through each GPU:
  student   forward all-gather 2 P, backward re-gather of what ZeRO-3 released in between (0 to 2 P: the table
            shows both ends), gradient reduce-scatter 2 P (4 P with communication_data_type fp32). ZeRO-3
            reduce-scatters every micro-step, so gradient accumulation does not amortise it. P counts the
            partitioned parameters (above stage3_param_persistence_threshold, 1e6 in ds_configs/zero3.json).
  teacher   partitioned (ZeRO-3 inference): forward all-gather 2 P_t (threshold 1e5, DeepSpeed's default: the
            teacher's config sets none).  replicated (every GPU holds all of it): nothing, and 2 P_t bytes of GPU
            memory.  offload (offload_param to CPU): 2 P_t over PCIe per micro-step (each rank its own copy of the
            gathered layers, host to device), plus the all-gather of the partitions.
Compute per micro-step: (6 N_s + 2 N_t) x tokens + attention (distillery/flops.py), at an assumed MFU of the GPU's
bf16 dense peak. Communication time at assumed bus bandwidths: NVLink inside a node, the NIC per GPU across nodes.
The `auto` column is what teacher_placement=auto picks (distillery/placement.py) on an 80 GiB GPU (--memory_gib)
with bf16 ZeRO-3 and the paper configs' micro-batch and activation checkpointing. These are estimates from sizes
and stated bandwidths, not measurements; bench/teacher_placement.py measures the bytes on 2 CPU ranks,
bench/gpu_checks.sh the step on a GPU.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distillery import flops, models, zero_cost  # noqa: E402
from distillery.config import Config  # noqa: E402
from distillery.errors import cli  # noqa: E402
from distillery.placement import decide  # noqa: E402

GiB = 2 ** 30
ZERO3 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs", "zero3.json")
with open(ZERO3) as _f:
    STUDENT_PERSISTENCE = zero_cost.persistence_threshold(json.load(_f))   # 1e6 in zero3.json


def sizes(preset, seq_len):
    c = models.hf_config(preset, 0, seq_len)
    return flops.param_counts(c)["total"], c


def per_micro_step(student, teacher, gpus, micro_batch, seq_len, memory_gib=80.0, grad_ckpt=True):
    """Bytes each GPU sends/receives per micro-step, the FLOPs it computes, memory per GPU and what auto picks."""
    ps, cs = sizes(student, seq_len)
    pt, ct = sizes(teacher, seq_len)
    tokens = micro_batch * seq_len
    s = zero_cost.student_comm_bytes(cs, gpus, 2, STUDENT_PERSISTENCE)
    cfg = Config(micro_batch_size=micro_batch, seq_len=seq_len, grad_ckpt=grad_ckpt)
    with open(ZERO3) as f:
        ds = json.load(f)  # the student's engine settings the paper configs run with
    auto = decide(cfg, ds, gpus, ct, cs, memory=(memory_gib * GiB, f"{memory_gib:g} GiB"))
    return {"student": student, "teacher": teacher, "gpus": gpus, "student_params": ps, "teacher_params": pt,
            "student_bytes": s["all_gather_max"] + s["reduce_scatter"],
            "student_bytes_min": s["all_gather_min"] + s["reduce_scatter"],
            "teacher_bytes": zero_cost.teacher_gather_bytes(ct, gpus, 2),
            "teacher_offload_pcie_bytes": zero_cost.offload_h2d_bytes(ct, 2),
            "student_flops": flops.student_train_flops(cs, tokens, seq_len),
            "teacher_flops": flops.teacher_forward_flops(ct, tokens, seq_len), "tokens": tokens,
            "teacher_replicated_gib": zero_cost.teacher_resident_bytes("replicated", ct, gpus, 2) / GiB,
            # ZeRO-3 student memory per GPU: bf16 params + bf16 grads + fp32 master + 2 Adam moments = 16 P / n
            "student_states_gib": zero_cost.student_state_bytes(ps, gpus, 3) / GiB,
            "teacher_partition_gib": zero_cost.partition_elems(ct, gpus) * 2 / GiB,
            "auto": auto.placement}


def times(r, peak_tflops, mfu, intra_gbs, inter_gbs, pcie_gbs, gpus_per_node):
    bw = (intra_gbs if r["gpus"] <= gpus_per_node else inter_gbs) * 1e9
    t_compute = (r["student_flops"] + r["teacher_flops"]) / (peak_tflops * 1e12 * mfu)
    return {"compute_s": t_compute, "student_comm_s": r["student_bytes"] / bw, "teacher_comm_s": r["teacher_bytes"] / bw,
            "teacher_offload_s": r["teacher_offload_pcie_bytes"] / (pcie_gbs * 1e9)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="llama3-1.7b")
    ap.add_argument("--teachers", nargs="+", default=["llama3-0.7b", "llama3-1.7b", "llama3-3.8b", "llama3-8b"])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--gpus_per_node", type=int, default=8)
    ap.add_argument("--micro_batch", type=int, default=2, help="the paper configs' micro_batch_size")
    ap.add_argument("--seq_len", type=int, default=8192)
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="H100 SXM bf16 dense (spec sheet)")
    ap.add_argument("--mfu", type=float, default=0.45)
    ap.add_argument("--intra_gbs", type=float, default=360.0, help="NVLink all-gather bus bandwidth, GB/s per GPU")
    ap.add_argument("--inter_gbs", type=float, default=45.0, help="across nodes: one 400 Gb/s NIC per GPU, GB/s")
    ap.add_argument("--pcie_gbs", type=float, default=25.0, help="host-to-device (PCIe 5 x16, pinned), GB/s")
    ap.add_argument("--memory_gib", type=float, default=80.0, help="GPU memory for the auto column (H100: 80)")
    a = ap.parse_args(argv)
    rows = []
    print(f"student {a.student}, micro-batch {a.micro_batch} x {a.seq_len} tokens per GPU; assumed: "
          f"{a.peak_tflops:g} TFLOP/s x MFU {a.mfu}, NVLink {a.intra_gbs:g} GB/s, inter-node {a.inter_gbs:g} GB/s, "
          f"PCIe {a.pcie_gbs:g} GB/s; auto on {a.memory_gib:g} GiB per GPU, activation checkpointing on\n")
    print("| teacher | GPUs | student ZeRO-3 GB / micro-step | teacher ZeRO-3 GB | compute s | student comm s | "
          "teacher comm s | teacher offload s (PCIe) | teacher replicated GiB | student states GiB / GPU | auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in a.teachers:
        for n in a.gpus:
            r = per_micro_step(a.student, t, n, a.micro_batch, a.seq_len, a.memory_gib)
            r.update(times(r, a.peak_tflops, a.mfu, a.intra_gbs, a.inter_gbs, a.pcie_gbs, a.gpus_per_node))
            rows.append(r)
            print(f"| {t} ({r['teacher_params'] / 1e9:.2f}B) | {n} | {r['student_bytes_min'] / 1e9:.1f}-"
                  f"{r['student_bytes'] / 1e9:.1f} | "
                  f"{r['teacher_bytes'] / 1e9:.1f} | {r['compute_s']:.2f} | {r['student_comm_s']:.3f} | "
                  f"{r['teacher_comm_s']:.3f} | {r['teacher_offload_s']:.2f} | {r['teacher_replicated_gib']:.1f} | "
                  f"{r['student_states_gib']:.2f} | {r['auto']} |")
    print(json.dumps({"bench": "zero3_comm_estimate", "student": a.student, "rows": [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}))
    return rows


if __name__ == "__main__":
    cli(main)
