"""What ZeRO-3 moves per step for the study's students and teachers, from the model sizes (docs/scaling.md).

    python scripts/scaling.py                       # the tables of docs/scaling.md, then one JSON line
    python scripts/scaling.py --mfu 0.4 --inter_gbs 40

Counts, per GPU and per micro-step (one forward + backward of micro_batch_size x seq_len tokens), in bytes, for
bf16 parameters and gradients (ZeRO-3 all-gathers and reduce-scatters move (n - 1) / n of a tensor per GPU; the
(n - 1) / n is kept):
  student   forward all-gather 2 P  +  backward all-gather 2 P (parameters are released after their forward use;
            with activation checkpointing the recompute and the backward share one gather)  +  gradient
            reduce-scatter 2 P (bf16; 4 P with communication_data_type fp32). ZeRO-3 reduce-scatters every
            micro-step, so gradient accumulation does not amortise it.
  teacher   ZeRO-3 inference: forward all-gather 2 P_t.  Replicated (every GPU holds all of it): nothing, and 2 P_t
            bytes of GPU memory.  offload_param to CPU: 2 P_t over PCIe per micro-step (each rank its own copy of
            the gathered layers, host to device), plus the all-gather of the partitions.
Compute per micro-step: (6 N_s + 2 N_t) x tokens + attention (distillery/flops.py), at an assumed MFU of the GPU's
bf16 dense peak. Communication time at assumed bus bandwidths: NVLink inside a node, the NIC per GPU across nodes.
These are estimates from sizes and stated bandwidths, not measurements; bench/gpu_checks.sh measures on a device.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distillery import flops, models  # noqa: E402
from distillery.errors import cli  # noqa: E402

GiB = 2 ** 30


def sizes(preset, seq_len):
    c = models.hf_config(preset, 0, seq_len)
    return flops.param_counts(c)["total"], c


def per_micro_step(student, teacher, gpus, micro_batch, seq_len):
    """Bytes each GPU sends/receives per micro-step, and the FLOPs it computes."""
    ps, cs = sizes(student, seq_len)
    pt, ct = sizes(teacher, seq_len)
    frac = (gpus - 1) / gpus
    tokens = micro_batch * seq_len
    return {"student": student, "teacher": teacher, "gpus": gpus, "student_params": ps, "teacher_params": pt,
            "student_bytes": 3 * 2 * ps * frac, "teacher_bytes": 2 * pt * frac, "teacher_offload_pcie_bytes": 2 * pt,
            "student_flops": flops.student_train_flops(cs, tokens, seq_len),
            "teacher_flops": flops.teacher_forward_flops(ct, tokens, seq_len), "tokens": tokens,
            "teacher_replicated_gib": 2 * pt / GiB,
            # ZeRO-3 student memory per GPU: bf16 params + bf16 grads + fp32 master + 2 Adam moments = 16 P / n
            "student_states_gib": 16 * ps / gpus / GiB, "teacher_partition_gib": 2 * pt / gpus / GiB}


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
    a = ap.parse_args(argv)
    rows = []
    print(f"student {a.student}, micro-batch {a.micro_batch} x {a.seq_len} tokens per GPU; assumed: "
          f"{a.peak_tflops:g} TFLOP/s x MFU {a.mfu}, NVLink {a.intra_gbs:g} GB/s, inter-node {a.inter_gbs:g} GB/s, "
          f"PCIe {a.pcie_gbs:g} GB/s\n")
    print("| teacher | GPUs | student ZeRO-3 GB / micro-step | teacher ZeRO-3 GB | compute s | student comm s | "
          "teacher comm s | teacher offload s (PCIe) | teacher replicated GiB | student states GiB / GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in a.teachers:
        for n in a.gpus:
            r = per_micro_step(a.student, t, n, a.micro_batch, a.seq_len)
            r.update(times(r, a.peak_tflops, a.mfu, a.intra_gbs, a.inter_gbs, a.pcie_gbs, a.gpus_per_node))
            rows.append(r)
            print(f"| {t} ({r['teacher_params'] / 1e9:.2f}B) | {n} | {r['student_bytes'] / 1e9:.1f} | "
                  f"{r['teacher_bytes'] / 1e9:.1f} | {r['compute_s']:.2f} | {r['student_comm_s']:.3f} | "
                  f"{r['teacher_comm_s']:.3f} | {r['teacher_offload_s']:.2f} | {r['teacher_replicated_gib']:.1f} | "
                  f"{r['student_states_gib']:.2f} |")
    print(json.dumps({"bench": "zero3_comm_estimate", "student": a.student, "rows": [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}))
    return rows


if __name__ == "__main__":
    cli(main)
