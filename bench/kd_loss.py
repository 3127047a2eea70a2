"""Benchmark of the KD loss seam (issues 4, 11): time and peak memory of forward + backward, all variants in one run.

    .venv/bin/python bench/kd_loss.py            # CPU config: vocab 32000, 4096 tokens, hidden 512, fp32
    .venv/bin/python bench/kd_loss.py --gpu      # GPU config (default when CUDA is present): vocab 128256,
                                                 # 8192 tokens, hidden 2048, bf16

Variants (--variants, default all):
  plain           distillery.loss.plain_loss, full [N, V] logits (the reference; diagnostics off)
  fused           the fused head (closed form for forward KL), diagnostics off: the row compared with Liger
  fused_diag      the same with the five diagnostics on (their cost is this row minus fused)
  fused_autograd  the fused head with closed_form=False: autograd per chunk, the route every other divergence takes
  fused_autograd_compiled  the same with compile=True (torch.compile'd chunk objective); not in the default set
  liger           Liger-Kernel's chunked LigerFusedLinearJSDLoss(beta=0), compiled=False
  liger_compiled  the same with compiled=True (its default: torch.compile per chunk)
The liger rows need the optional extra `pip install liger-kernel` (never required: skipped when not importable).

One step = one loss with a teacher + loss.backward(), gradients w.r.t. the student's hidden states and output weight,
as the trainer runs it. Same objective in every variant: (1 - alpha) CE / n + alpha KL(p_t^T || p_s^T) / n, Liger's
convention (weight_hard_loss = 1 - alpha, weight_soft_loss = alpha, no T^2), i.e. w_ce = (1 - alpha) / n and
w_kd = alpha / (T^2 n) for ours, whose kd_sum carries T^2. The warm-up step's loss and gradients of every variant are
compared with plain's (column "rel err"), so a mapping mistake shows.

Time: the first call (allocations, lazy imports, torch.compile) is reported on its own ("first s"); the steady state
is the median of --reps steps after it, the variants interleaved step by step so that load from other users of the
machine hits all alike. CPU: both wall and process CPU seconds are reported and ratios use CPU seconds (a shared box's
wall time measures the neighbours too); CUDA: synchronised wall time.
Peak memory: extra memory at the peak of one step over what the inputs already hold; it includes the gradients the
step produces (they exist in every variant).
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before the step.
  CPU:  torch's CPU allocator is plain malloc (tracemalloc does not see it), so each variant runs in a fresh child
        process: one warm-up step, then the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs,
        and the peak RSS of one step minus the RSS before it is reported. Freed large blocks go back to the OS
        (glibc mmap), so this is the resident peak of the step, at page granularity.
Output: a human table, then ONE JSON line with the figures, the ratios and the targets met.
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
# Targets. Issue 4: fused vs plain. Issue 11: fused (diagnostics off) vs Liger's compiled chunked loss, and memory vs
# plain; time is CPU seconds on CPU (the box is shared: wall time measures the neighbours too), wall time on CUDA.
TARGETS = {"cpu": dict(mem_vs_plain=0.20, time_vs_plain=1.20, mem_vs_liger_compiled=1.0, time_vs_liger_compiled=1.0),
           "cuda": dict(mem_vs_plain=0.25, time_vs_plain=1.00, mem_vs_liger_compiled=1.0, time_vs_liger_compiled=1.0)}
VARIANTS = ("plain", "fused", "fused_diag", "fused_autograd", "liger", "liger_compiled", "fused_autograd_compiled")
DEFAULT_VARIANTS = VARIANTS[:6]                   # fused_autograd_compiled on request (a minute of compilation)


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


def step_fn(variant, a, inputs):
    """One forward + backward of a variant; the step returns the loss (detached). Objective: see the docstring."""
    if variant.startswith("liger"):
        return liger_step_fn(a, inputs, compiled=variant == "liger_compiled")
    hs, ws, ht, wt, y = inputs
    n, T = a.tokens, a.temperature
    impl = "plain" if variant == "plain" else "fused"
    kw = dict(student_hidden=hs, student_weight=ws, targets=y, teacher_hidden=ht, teacher_weight=wt, kd_vocab=a.vocab,
              divergence=get("divergence", a.divergence), divergence_args={}, temperature=T,
              w_ce=(1 - a.alpha) / n, w_kd=a.alpha / (T * T * n), want_diag=variant == "fused_diag",
              chunk_size=a.chunk_size, closed_form=not variant.startswith("fused_autograd"),
              compile=variant == "fused_autograd_compiled")

    def step():
        hs.grad = ws.grad = None
        loss = compute_loss(impl=impl, **kw).loss
        loss.backward()
        return loss.detach()
    return step


def liger_available():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
        return True
    except ImportError:
        return False


def liger_step_fn(a, inputs, compiled):
    """Liger-Kernel's chunked LigerFusedLinearJSDLoss (pure PyTorch; torch.compile'd per chunk when compiled) at beta 0
    (forward KL): (1 - alpha) CE / n + alpha KL / n, with n its own count of non-ignored targets."""
    if a.divergence != "forward_kl":
        raise SystemExit("the Liger variants compute forward KL only (beta 0): use --divergence forward_kl")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    import inspect
    hs, ws, ht, wt, y = inputs
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=1 - a.alpha, weight_soft_loss=a.alpha, beta=0.0,
                                 temperature=a.temperature, compiled=compiled, chunk_size=a.liger_chunk)
    h2, t2, y2 = hs.view(-1, hs.shape[-1]), ht.view(-1, ht.shape[-1]), y.view(-1)
    extra = {k: None for k in ("student_bias", "teacher_bias") if k in inspect.signature(fn.forward).parameters}

    def step():
        hs.grad = ws.grad = None
        loss = fn(h2, ws, t2, wt, y2, **extra)
        loss.backward()
        return loss.detach()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps, reps, device, inputs):
    """Warm-up (first call: allocations, lazy imports, torch.compile) timed on its own, then reps rounds with the
    variants interleaved. Returns per variant: first-call wall seconds, median wall and CPU (process) seconds, and the
    warm-up's loss and gradients (for the objective check)."""
    hs, ws = inputs[0], inputs[1]
    first, outs = {}, {}
    for k, s in steps.items():
        t0 = time.perf_counter()
        loss = s()
        sync(device)
        first[k] = time.perf_counter() - t0
        outs[k] = (loss.float(), hs.grad.float().clone(), ws.grad.float().clone())
    wall, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(reps):
        for k, s in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s()
            sync(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in steps}
    return first, med, outs


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


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


def cpu_peak_child(variant, a):
    """Runs in a fresh process: peak RSS of one step over the RSS before it, in bytes."""
    inputs = make_inputs(a, torch.device("cpu"))
    step = step_fn(variant, a, inputs)
    step()                                        # warm-up: one-off allocations, lazy imports, compilation
    inputs[0].grad = inputs[1].grad = None
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak-RSS counter (Linux >= 4.0)
        f.write("5")
    step()
    return (_status_kib("VmHWM") - base) * 1024


def cpu_peak(variant, a):
    args = [sys.executable, os.path.abspath(__file__), "--_child", variant] + a.forward_args
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def chunk_sweep(a, use_cuda):
    """The fused head at several chunk sizes, interleaved: the measurement behind the automatic chunk size."""
    variant = next((v for v in a.variants.split(",") if v.startswith("fused")), "fused")
    sizes = [int(c) for c in a.chunk_sweep.split(",")]
    device = torch.device("cuda" if use_cuda else "cpu")
    inputs = make_inputs(a, device)
    steps = {}
    for c in sizes:
        a.chunk_size = c
        steps[c] = step_fn(variant, a, inputs)
    first, med, _ = time_interleaved(steps, a.reps, device, inputs)
    if use_cuda:
        peaks = {c: cuda_peak(s, device) for c, s in steps.items()}
    else:
        del inputs, steps
        peaks = {}
        for c in sizes:
            a.chunk_size = c
            a.forward_args[a.forward_args.index("--chunk-size") + 1] = str(c)
            peaks[c] = cpu_peak(variant, a)
    t_idx = 0 if use_cuda else 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"chunk sweep of {variant}: vocab {a.vocab}, tokens {a.tokens}, hidden {a.hidden}, {a.dtype}, "
          f"T {a.temperature}, median of {a.reps}, load average {load}")
    print(f"{'rows':>6} {'first s':>8} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}")
    for c in sizes:
        print(f"{c:>6} {first[c]:>8.2f} {med[c][0]:>8.2f} {med[c][1]:>8.2f} {peaks[c] / 2**20:>9.1f}")
    print(json.dumps({"bench": "kd_loss_chunk_sweep", "variant": variant, "loadavg_1m": load,
                      "config": dict(vocab=a.vocab, tokens=a.tokens, hidden=a.hidden, dtype=a.dtype,
                                     temperature=a.temperature, reps=a.reps),
                      "time_s": {c: round(med[c][t_idx], 3) for c in sizes},
                      "peak_mib": {c: round(peaks[c] / 2**20, 1) for c in sizes}}))


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
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5, help="KD share: (1 - alpha) CE + alpha KD")
    p.add_argument("--chunk-size", type=int, default=0, help="fused rows per chunk; 0 = auto")
    p.add_argument("--liger-chunk", type=int, default=1024, help="Liger's chunk_size (its default 1024)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated subset of " + ", ".join(VARIANTS) + " (liger* skipped when not installed)")
    p.add_argument("--chunk-sweep", default="", help="e.g. 256,512,1024,2048: time and peak of the fused variant "
                   "(--variants' first fused* one, default fused) at each chunk size instead of the comparison")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-rel-err", type=float, default=None,
                   help="fail (exit 1) when a variant's loss or gradients differ from plain's by more (relative); "
                        "bench/gpu_checks.py uses 4e-2 in bf16: each head is within 2e-2 of float64 "
                        "(tests/test_fused_kd.py::test_bf16_error_is_bounded), so two are within 4e-2 of each other")
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
                      "--temperature", str(a.temperature), "--alpha", str(a.alpha), "--chunk-size", str(a.chunk_size),
                      "--liger-chunk", str(a.liger_chunk)]
    if a._child:
        print(json.dumps({"peak_bytes": cpu_peak_child(a._child, a)}))
        return

    if a.chunk_sweep:
        return chunk_sweep(a, use_cuda)
    names = [v for v in a.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown or "plain" not in names:
        sys.exit(f"--variants: unknown {sorted(unknown)} or no plain (the reference); known: {', '.join(VARIANTS)}")
    if not liger_available():
        names = [v for v in names if not v.startswith("liger")]
    device = torch.device("cuda" if use_cuda else "cpu")
    inputs = make_inputs(a, device)
    steps = {k: step_fn(k, a, inputs) for k in names}
    first, med, outs = time_interleaved(steps, a.reps, device, inputs)
    # Objective check: every variant's loss and gradients against plain's (same inputs, same objective).
    check = {k: dict(loss=rel(outs[k][0], outs["plain"][0]), grad_h=rel(outs[k][1], outs["plain"][1]),
                     grad_w=rel(outs[k][2], outs["plain"][2])) for k in names if k != "plain"}
    del outs
    if use_cuda:
        peaks = {k: cuda_peak(s, device) for k, s in steps.items()}
        dev_name = torch.cuda.get_device_name(device)
    else:
        del inputs, steps
        peaks = {k: cpu_peak(k, a) for k in names}
        dev_name = f"cpu ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    from distillery.fused_kd import auto_chunk_rows
    chunk = a.chunk_size or auto_chunk_rows(a.vocab)
    t_idx = 0 if use_cuda else 1                                     # CUDA: wall time; CPU: process CPU time
    print(f"KD loss bench on {dev_name}: vocab {a.vocab}, tokens {a.tokens}, hidden {a.hidden}/"
          f"{a.teacher_hidden or a.hidden} (student/teacher), {a.dtype}, {a.divergence}, T {a.temperature}, "
          f"alpha {a.alpha}, fused chunk {chunk} rows, Liger chunk {a.liger_chunk}, median of {a.reps}, "
          f"load average {load}")
    print(f"{'variant':<15} {'first s':>8} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9} {'t/plain':>8} {'mem/plain':>9} "
          f"{'rel err loss / grad_h / grad_w vs plain':>40}")
    for k in names:
        c = check.get(k)
        err = f"{c['loss']:.1e} / {c['grad_h']:.1e} / {c['grad_w']:.1e}" if c else "-"
        print(f"{k:<15} {first[k]:>8.2f} {med[k][0]:>8.2f} {med[k][1]:>8.2f} {peaks[k] / 2**20:>9.1f} "
              f"{med[k][t_idx] / med['plain'][t_idx]:>8.3f} {peaks[k] / peaks['plain']:>9.3f} {err:>40}")
    tm = {k: med[k][t_idx] for k in names}
    ratios = {}
    if "fused" in names:
        ratios.update(fused_mem_vs_plain=peaks["fused"] / peaks["plain"], fused_time_vs_plain=tm["fused"] / tm["plain"])
        for ref in ("liger_compiled", "liger"):
            if ref in names:
                ratios[f"fused_mem_vs_{ref}"] = peaks["fused"] / peaks[ref]
                ratios[f"fused_time_vs_{ref}"] = tm["fused"] / tm[ref]
        if "fused_diag" in names:
            ratios.update(diag_extra_time=tm["fused_diag"] / tm["fused"] - 1,
                          diag_extra_mem=peaks["fused_diag"] / peaks["fused"] - 1)
        if "fused_autograd" in names:
            ratios.update(autograd_time_vs_fused=tm["fused_autograd"] / tm["fused"],
                          autograd_mem_vs_fused=peaks["fused_autograd"] / peaks["fused"])
        if "fused_autograd_compiled" in names:
            ratios.update(autograd_compiled_time_vs_fused=tm["fused_autograd_compiled"] / tm["fused"],
                          autograd_compiled_mem_vs_fused=peaks["fused_autograd_compiled"] / peaks["fused"])
    tgt = TARGETS[device.type]
    meets = {}
    if "fused" in names:
        meets["mem_vs_plain"] = ratios["fused_mem_vs_plain"] <= tgt["mem_vs_plain"]
        meets["time_vs_plain"] = ratios["fused_time_vs_plain"] <= tgt["time_vs_plain"]
        if "liger_compiled" in names:
            meets["mem_vs_liger_compiled"] = ratios["fused_mem_vs_liger_compiled"] <= tgt["mem_vs_liger_compiled"]
            meets["time_vs_liger_compiled"] = ratios["fused_time_vs_liger_compiled"] <= tgt["time_vs_liger_compiled"]
    record = {
        "bench": "kd_loss", "device": dev_name, "loadavg_1m": load,
        "config": dict(vocab=a.vocab, tokens=a.tokens, hidden=a.hidden, teacher_hidden=a.teacher_hidden or a.hidden,
                       dtype=a.dtype, divergence=a.divergence, temperature=a.temperature, alpha=a.alpha,
                       chunk_rows=chunk, liger_chunk=a.liger_chunk, reps=a.reps,
                       time="wall" if use_cuda else "cpu_process"),
        "first_call_s": {k: round(v, 2) for k, v in first.items()},
        "wall_s": {k: round(v[0], 3) for k, v in med.items()},
        "cpu_s": {k: round(v[1], 3) for k, v in med.items()},
        "peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "max_rel_err_vs_plain": {k: max(v.values()) for k, v in check.items()},
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "targets": tgt,
        "meets": meets,
        "meets_targets": all(meets.values()) if meets else None,
    }
    if a.max_rel_err is not None:
        record["max_rel_err_bound"] = a.max_rel_err
        record["objective_ok"] = all(max(v.values()) <= a.max_rel_err for v in check.values())
    print(json.dumps(record))
    if record.get("objective_ok") is False:
        sys.exit(f"error: a variant's loss or gradients differ from plain's by more than {a.max_rel_err:g} "
                 f"(relative): {record['max_rel_err_vs_plain']}")


if __name__ == "__main__":
    main()
