"""Benchmark of the KD loss seam (issue 4): fused vs plain, time and peak memory of forward + backward, in one run.

    .venv/bin/python bench/kd_loss.py            # CPU config: vocab 32000, 4096 tokens, hidden 512, fp32
    .venv/bin/python bench/kd_loss.py --gpu      # GPU config (default when CUDA is present): vocab 128256,
                                                 # 8192 tokens, hidden 2048, bf16, plus Liger's fused JSD (beta 0)
                                                 # when liger_kernel is importable

One step = compute_loss(...) with a teacher (forward KL, T = 1, alpha = 0.5, diagnostics on) + loss.backward(), gradients
w.r.t. the student's hidden states and output weight, as the trainer runs it.

Time: median of --reps steps after one warm-up, the variants interleaved step by step so that load from other users of
the machine hits both alike (CUDA: synchronised wall time).
Peak memory: extra memory at the peak of one step over what the inputs already hold; it includes the gradients the
step produces (they exist in both variants).
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before the step.
  CPU:  torch's CPU allocator is plain malloc (tracemalloc does not see it), so each variant runs in a fresh child
        process: one warm-up step, then the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs,
        and the peak RSS of one step minus the RSS before it is reported. Freed large blocks go back to the OS
        (glibc mmap), so this is the resident peak of the step, at page granularity.
Output: a human table, then ONE JSON line with the figures and the ratios fused / plain.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distillery.loss import compute_loss  # noqa: E402
from plugins import get  # noqa: E402

CPU_CFG = dict(vocab=32000, tokens=4096, hidden=512, dtype="float32")
GPU_CFG = dict(vocab=128256, tokens=8192, hidden=2048, dtype="bfloat16")
# Targets from issue 4 (peak memory and time as fractions of plain).
TARGETS = {"cpu": dict(mem=0.30, time=1.20), "cuda": dict(mem=0.25, time=1.00)}


def make_inputs(a, device):
    dt = getattr(torch, a.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    H, Ht, V, N = a.hidden, a.teacher_hidden or a.hidden, a.vocab, a.tokens
    # Scales give logits of std ~2-3, a realistic softmax spread (not uniform, not one-hot).
    hs = torch.randn(1, N, H, generator=g).to(device, dt).requires_grad_()
    ws = (torch.randn(V, H, generator=g) * (2.5 / H ** 0.5)).to(device, dt).requires_grad_()
    ht = torch.randn(1, N, Ht, generator=g).to(device, dt)
    wt = (torch.randn(V, Ht, generator=g) * (3.0 / Ht ** 0.5)).to(device, dt)
    y = torch.randint(0, V, (1, N), generator=g).to(device)
    return hs, ws, ht, wt, y


def step_fn(impl, a, inputs):
    hs, ws, ht, wt, y = inputs
    kw = dict(student_hidden=hs, student_weight=ws, targets=y, teacher_hidden=ht, teacher_weight=wt, kd_vocab=a.vocab,
              divergence=get("divergence", a.divergence), divergence_args={}, temperature=1.0,
              w_ce=0.5 / a.tokens, w_kd=0.5 / a.tokens, want_diag=not a.no_diag, chunk_size=a.chunk_size)

    def step():
        hs.grad = ws.grad = None
        compute_loss(impl=impl, **kw).loss.backward()
    return step


def liger_step_fn(a, inputs):
    """LigerFusedLinearJSDLoss at beta 0 (forward KL), weights (0.5, 0.5); None when liger_kernel is not installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    import inspect
    hs, ws, ht, wt, y = inputs
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0, temperature=1.0)
    h2, t2, y2 = hs.view(-1, hs.shape[-1]), ht.view(-1, ht.shape[-1]), y.view(-1)
    extra = {k: None for k in ("student_bias", "teacher_bias") if k in inspect.signature(fn.forward).parameters}

    def step():
        hs.grad = ws.grad = None
        fn(h2, ws, t2, wt, y2, **extra).backward()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps, reps, device):
    for s in steps.values():                      # warm-up (allocations, lazy imports, kernel autotuning)
        s()
    sync(device)
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cuda_peak(step, device):
    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_child(impl, a):
    """Runs in a fresh process: peak RSS of one step over the RSS before it, in bytes."""
    inputs = make_inputs(a, torch.device("cpu"))
    step = step_fn(impl, a, inputs)
    step()                                        # warm-up: one-off allocations, lazy imports
    inputs[0].grad = inputs[1].grad = None
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak-RSS counter (Linux >= 4.0)
        f.write("5")
    step()
    return (_status_kib("VmHWM") - base) * 1024


def cpu_peak(impl, a):
    args = [sys.executable, os.path.abspath(__file__), "--_child", impl] + a.forward_args
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU config (default when CUDA is available)")
    p.add_argument("--cpu", action="store_true", help="CPU config even when CUDA is available")
    p.add_argument("--vocab", type=int)
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--teacher-hidden", type=int, default=0, help="default: same as --hidden")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--chunk-size", type=int, default=0, help="fused rows per chunk; 0 = auto")
    p.add_argument("--no-diag", action="store_true", help="skip the per-token diagnostics (default: on, both paths)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args()
    use_cuda = torch.cuda.is_available() and not a.cpu
    if a.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: CUDA is not available here")
    base_cfg = GPU_CFG if use_cuda else CPU_CFG
    for k, v in base_cfg.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.forward_args = ["--cpu", "--vocab", str(a.vocab), "--tokens", str(a.tokens), "--hidden", str(a.hidden),
                      "--teacher-hidden", str(a.teacher_hidden), "--dtype", a.dtype, "--divergence", a.divergence,
                      "--chunk-size", str(a.chunk_size)] + (["--no-diag"] if a.no_diag else [])
    if a._child:
        print(json.dumps({"peak_bytes": cpu_peak_child(a._child, a)}))
        return

    device = torch.device("cuda" if use_cuda else "cpu")
    inputs = make_inputs(a, device)
    steps = {"plain": step_fn("plain", a, inputs), "fused": step_fn("fused", a, inputs)}
    if use_cuda:
        liger = liger_step_fn(a, inputs)
        if liger is not None:
            steps["liger"] = liger
    times = time_interleaved(steps, a.reps, device)
    if use_cuda:
        peaks = {k: cuda_peak(s, device) for k, s in steps.items()}
        dev_name = torch.cuda.get_device_name(device)
    else:
        del inputs, steps
        peaks = {k: cpu_peak(k, a) for k in ("plain", "fused")}
        dev_name = f"cpu ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"

    from distillery.fused_kd import auto_chunk_rows
    chunk = a.chunk_size or auto_chunk_rows(a.vocab)
    print(f"KD loss bench on {dev_name}: vocab {a.vocab}, tokens {a.tokens}, hidden {a.hidden}/"
          f"{a.teacher_hidden or a.hidden} (student/teacher), {a.dtype}, {a.divergence}, diag {not a.no_diag}, "
          f"fused chunk {chunk} rows, median of {a.reps}")
    print(f"{'variant':<8} {'time ms':>10} {'peak MiB':>10} {'time/plain':>11} {'mem/plain':>10}")
    for k in times:
        print(f"{k:<8} {times[k] * 1e3:>10.1f} {peaks[k] / 2**20:>10.1f} {times[k] / times['plain']:>11.3f} "
              f"{peaks[k] / peaks['plain']:>10.3f}")
    tgt = TARGETS[device.type]
    ratios = {"fused_mem": peaks["fused"] / peaks["plain"], "fused_time": times["fused"] / times["plain"]}
    if "liger" in times:
        ratios.update(liger_mem=peaks["liger"] / peaks["plain"], liger_time=times["liger"] / times["plain"])
    record = {
        "bench": "kd_loss", "device": dev_name,
        "config": dict(vocab=a.vocab, tokens=a.tokens, hidden=a.hidden, teacher_hidden=a.teacher_hidden or a.hidden,
                       dtype=a.dtype, divergence=a.divergence, diag=not a.no_diag, chunk_rows=chunk, reps=a.reps),
        "time_ms": {k: round(v * 1e3, 2) for k, v in times.items()},
        "peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "targets": tgt,
        "meets_targets": ratios["fused_mem"] <= tgt["mem"] and ratios["fused_time"] <= tgt["time"],
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
