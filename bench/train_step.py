"""One KD training step: Distillery's engines against the plain-torch naive KD loop, same models, same run.

    python bench/train_step.py                 # CPU: tiny presets (vocab 2048, seq 128, micro-batch 8), fp32
    python bench/train_step.py --gpu           # one GPU: the anchor's pair (gpu_anchor.py: student 2048h/16L tied,
                                               # teacher 1024h/12L, vocab 128256, seq 2048, micro-batch 4), bf16
    python bench/train_step.py --gpu --paper   # issue 14 item 4: the study's 1.7B student + 0.7B teacher (llama3
                                               # presets), seq 8192, micro-batch 1, activation checkpointing on;
                                               # the trainer's variants only (tokens/s, peak memory)
    python bench/train_step.py --paper         # its CPU twin: the same code path at tiny shapes, checkpointing on
    python bench/train_step.py --gpu --variants distillery_lm,distillery --peak_tflops 800
                                               # a subset (bench/gpu_checks.py's fast_step); a given matmul peak
    python bench/train_step.py [--gpu] --placements  # issue 22: the trainer's step with the teacher partitioned
                                               # (ZeRO-3, the distillery variant), replicated and offloaded

Variants (each measured on the same random batches, after warm-up, median step time):
  naive       plain torch: student forward with autocast, teacher forward under no_grad, full fp32 [tokens x vocab]
              logits of both, (1 - a) CE + a KL(t || s), AdamW. What a typical KD script does (the anchor's naive_kd).
  distillery  the trainer's path: engines from distillery.engines (ZeRO-3 StudentWithLoss + fused KD head, AdamW with
              the trainer's parameter groups and LR schedule, clip 1.0; a ZeRO-3 inference teacher) and the trainer's
              own micro-step (distillery/step.py: teacher forward, gathered head, loss, backward, step), one rank.
  distillery_lm  the same student engine (same ZeRO-3 config, optimizer, fused head) with alpha = 0 and no teacher:
              the LM-only step of the same engine. kd_over_lm_step_time = distillery's step time / this one's
              (issue 18's target: at most 1.12 on the GPU).
  distillery_doc_mask  the same as distillery with document masking (doc_mask=true, the trainer's default):
              restarting positions to student and teacher, so transformers masks per document, on the kernel the
              trainer picks (distillery.models.attn_implementation("auto", True): flash-attn 2 if installed, else
              flex attention on a GPU, SDPA on CPU); rows hold ~DOC_LEN-token documents here.
              doc_mask_step_time_ratio = its step time / distillery's. Every other variant uses SDPA, as the anchor.
  distillery_replicated, distillery_offload (--placements)  the distillery variant with the teacher replicated (no
              ZeRO hooks, distillery.placement.ReplicatedTeacher) or ZeRO-3 offloaded to CPU memory, instead of
              partitioned (distillery/placement.py); *_step_time_ratio = its step time / distillery's. Timing only:
              the replicated teacher is initialised outside ZeRO-3, so its random weights (and loss) differ.
Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU, peak RSS of a fresh child process per variant.
MFU: tokens/s x model FLOPs per token (student 6N + teacher 2N + attention, distillery/flops.py; LM-only: the
student alone) / the measured matmul peak (bf16 8192^3 on GPU; --peak_tflops gives one measured elsewhere).
Ends with one JSON line: tokens/s, step ms, peak memory, MFU per variant, the ratios of the variants that ran, and
on the GPU the issue's targets beside them. A variant that fails is recorded with its error and the bench exits 1
after the others ran. The anchor's DeepSpeed ZeRO-3 + naive KD row (peers_and_pitfalls.md) was 19,864 tok/s and
64.7 GiB on an H100.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALPHA = 0.2


def shapes(gpu, paper=False):
    if paper and gpu:  # the study's pair (distillery/models.py llama3-1.7b / llama3-0.7b), its seq and recompute
        return dict(vocab=128256, seq=8192, mb=1, steps=6, warm=2, grad_ckpt=True,
                    student=dict(hidden=2048, layers=16, heads=32, kv=8, head_dim=128, ffn=8192, tie=False),
                    teacher=dict(hidden=1024, layers=12, heads=32, kv=8, head_dim=128, ffn=8192, tie=False))
    if paper:
        return dict(shapes(False), grad_ckpt=True)
    if gpu:  # gpu_anchor.py's pair
        return dict(vocab=128256, seq=2048, mb=4, steps=10, warm=3,
                    student=dict(hidden=2048, layers=16, heads=32, kv=8, ffn=8192, tie=True),
                    teacher=dict(hidden=1024, layers=12, heads=16, kv=8, ffn=4096, tie=True))
    return dict(vocab=2048, seq=128, mb=8, steps=6, warm=2,
                student=dict(hidden=192, layers=4, heads=4, kv=2, ffn=512, tie=False),
                teacher=dict(hidden=96, layers=2, heads=4, kv=2, ffn=256, tie=False))


def hf_cfg(s, p, attn="sdpa"):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=s["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                       num_attention_heads=p["heads"], num_key_value_heads=p["kv"], intermediate_size=p["ffn"],
                       head_dim=p.get("head_dim", p["hidden"] // p["heads"]), max_position_embeddings=max(s["seq"], 128),
                       tie_word_embeddings=p["tie"], rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                       use_cache=False, attn_implementation=attn)


VARIANTS = ("naive", "fused_torch", "distillery_zero0", "distillery", "distillery_lm", "distillery_doc_mask",
            "distillery_replicated", "distillery_offload")
PAPER_VARIANTS = ("distillery", "distillery_doc_mask")
TARGETS = {"kd_tokens_per_s": 40000, "kd_mfu": 0.45, "kd_peak_gib": 32.0, "kd_over_lm": 1.12}  # issue 18, GPU
PLACED = ("distillery", "distillery_replicated", "distillery_offload")  # --placements: the teacher's placements
EOS, DOC_LEN = 0, 64  # documents of ~64 tokens: two per CPU row, so the doc_mask variant really masks


def batches(s):
    """Random rows with an EOS (id 0) ending a document every ~DOC_LEN tokens; every variant gets the same rows."""
    import torch
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        x = torch.randint(1, s["vocab"], (s["mb"], s["seq"]), generator=g)
        x[torch.rand(x.shape, generator=g) < 1.0 / DOC_LEN] = EOS
        out.append(x)
    return out


def run_naive(s, dev):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    st = AutoModelForCausalLM.from_config(hf_cfg(s, s["student"])).to(dev)
    te = AutoModelForCausalLM.from_config(hf_cfg(s, s["teacher"])).to(dev).eval()
    if dev == "cuda":
        te = te.to(torch.bfloat16)
    for p in te.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(st.parameters(), lr=1e-4, fused=dev == "cuda")

    def step(x):
        y = torch.roll(x, -1, 1)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            sl = st(input_ids=x).logits
            with torch.no_grad():
                tl = te(input_ids=x).logits
        sl, tl = sl.float().flatten(0, 1), tl.float().flatten(0, 1)
        ce = F.cross_entropy(sl, y.flatten())
        kd = F.kl_div(F.log_softmax(sl, -1), F.log_softmax(tl, -1), log_target=True, reduction="batchmean")
        loss = (1 - ALPHA) * ce + ALPHA * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


class TorchEngine:
    """The engine surface micro_step uses (call, backward, step), over a plain module and torch AdamW: the trainer's
    micro-step and fused head with no DeepSpeed at all (the fused_torch variant)."""

    def __init__(self, module, opt):
        self.module, self.opt = module, opt

    def __call__(self, *args, **kw):
        return self.module(*args, **kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        import torch
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run_fused_torch(s, dev):
    import torch
    from transformers import AutoModelForCausalLM
    from distillery.engines import StudentWithLoss, TeacherHidden
    from distillery.loss_parts import shift_targets
    from distillery.step import micro_step
    import plugins
    torch.manual_seed(0)
    te = TorchEngine(TeacherHidden(AutoModelForCausalLM.from_config(hf_cfg(s, s["teacher"])).to(dev)), None)
    st = StudentWithLoss(AutoModelForCausalLM.from_config(hf_cfg(s, s["student"])).to(dev))
    engine = TorchEngine(st, torch.optim.AdamW(st.parameters(), lr=1e-4, fused=dev == "cuda"))
    loss_kw = dict(impl="fused", kd_vocab=s["vocab"], divergence=plugins.get("divergence", "forward_kl"),
                   temperature=1.0)
    n = s["mb"] * (s["seq"] - 1)

    def step(x):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            return micro_step(engine, te, x, shift_targets(x), loss_kw, (1 - ALPHA) / n, ALPHA / n)["loss"]
    return step


def run_distillery(s, dev, doc_mask=False, zero_stage=3, lm_only=False, placement="partitioned"):
    """The trainer's own pieces: engines from distillery.engines (param groups, AdamW, LR schedule, clipping from the
    Config), the Objective, and distillery.step.micro_step, the function train.py calls for every micro-batch.
    doc_mask: document positions (distillery/packing.py) to student and teacher, as train.py does by default, on the
    attention kernel train.py picks. lm_only: alpha = 0, no teacher built, as train.py runs a baseline.
    placement: the teacher's (distillery/placement.py): partitioned / offload build the trainer's ZeRO-3 inference
    engine, replicated its ReplicatedTeacher around the same model in the run's dtype (built in memory, not loaded)."""
    import torch
    from transformers import AutoModelForCausalLM
    from distillery.config import Config
    from distillery.engines import init_student, init_teacher, student_ds_config, teacher_ds_config
    from distillery.loss_parts import shift_targets
    from distillery.models import attn_implementation, zero3_context
    from distillery.objective import Objective
    from distillery.packing import doc_positions
    from distillery.step import micro_step
    from distillery.placement import ReplicatedTeacher
    cfg = Config(micro_batch_size=s["mb"], global_batch_size=s["mb"], lr=1e-4, alpha=0.0 if lm_only else ALPHA,
                 loss_impl="fused", train_tokens=10 ** 9, seq_len=s["seq"], teacher_placement=placement)
    attn = attn_implementation("auto", True) if doc_mask else "sdpa"
    ds_base = {"zero_optimization": {"stage": zero_stage}, **({"bf16": {"enabled": True}} if dev == "cuda" else {})}
    ds_teacher, ds_student = teacher_ds_config(ds_base, cfg), student_ds_config(ds_base, cfg, world=1)
    if zero_stage == 0:  # the same engines with nothing partitioned: isolates what ZeRO-3's hooks cost
        ds_teacher = dict(ds_teacher, zero_optimization={"stage": 0})
    torch.manual_seed(0)
    teacher = None
    if not lm_only and placement == "replicated":
        te = AutoModelForCausalLM.from_config(hf_cfg(s, s["teacher"], attn))
        teacher = ReplicatedTeacher(te.to(torch.bfloat16 if dev == "cuda" else torch.float32), dev)
    elif not lm_only:
        with zero3_context(ds_teacher):
            te = AutoModelForCausalLM.from_config(hf_cfg(s, s["teacher"], attn))
        teacher = init_teacher(te, ds_teacher)
    with zero3_context(ds_student):
        st = AutoModelForCausalLM.from_config(hf_cfg(s, s["student"], attn))
    if s.get("grad_ckpt"):  # as distillery/models.py does for grad_ckpt=true
        st.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = init_student(st, cfg, ds_student, total_steps=1000)
    objective = Objective.from_config(cfg, total_steps=1000)
    loss_kw = objective.loss_kw(with_teacher=False) if lm_only else dict(objective.loss_kw(), kd_vocab=s["vocab"])
    _, w_ce, w_kd = objective.weights(0)
    n = s["mb"] * (s["seq"] - 1)

    def step(x):
        x = x.to(engine.device)
        pos = doc_positions(x, EOS) if doc_mask else None
        parts = micro_step(engine, teacher, x, shift_targets(x), loss_kw, w_ce / n, w_kd / n, positions=pos)
        return parts["loss"]
    step.attn = attn
    return step


def measure(variant, gpu, paper=False):
    dev = "cuda" if gpu else "cpu"
    s = shapes(gpu, paper)
    if variant != "naive":
        from distillery.launch import init_distributed
        init_distributed()
    if variant == "naive":
        step = run_naive(s, dev)
    elif variant == "fused_torch":
        step = run_fused_torch(s, dev)
    else:
        step = run_distillery(s, dev, doc_mask=variant == "distillery_doc_mask",
                              zero_stage=0 if variant == "distillery_zero0" else 3, lm_only=variant == "distillery_lm",
                              placement={"distillery_replicated": "replicated",
                                         "distillery_offload": "offload"}.get(variant, "partitioned"))
    bs = [b.to(dev) for b in batches(s)]
    return dict(variant=variant, attn=getattr(step, "attn", "sdpa"), **time_steps(lambda i: step(bs[i % 4]), s, gpu))


def time_steps(step, s, gpu):
    """Median wall time of step(i) over s["steps"] calls after s["warm"] warm-up calls (device-synchronised), and the
    peak memory from here on: GPU max allocated, or on CPU the process's peak RSS (measure each variant in a fresh
    process: run_variants). Returns step_ms, tokens_per_s, peak_gib and the last loss."""
    import torch
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(s["warm"] + s["steps"]):
        sync()
        t = time.perf_counter()
        loss = step(i)
        float(loss)
        sync()
        if i >= s["warm"]:
            times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return dict(step_ms=round(med * 1e3, 2), tokens_per_s=round(s["mb"] * s["seq"] / med), peak_gib=round(peak, 3),
                final_loss=round(float(loss), 4))


def matmul_peak(gpu):
    """Measured matmul throughput, FLOP/s: bf16 8192^3 on a GPU (what the anchor's MFU is against), fp32 1024^3 on
    CPU; the best of several timed repetitions after a warm-up."""
    import torch
    n, dev, dt = (8192, "cuda", torch.bfloat16) if gpu else (1024, "cpu", torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    best = float("inf")
    for i in range(12):
        sync()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        if i >= 2:
            best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n ** 3 / best


def add_mfu(res, s, peak):
    """MFU of each variant: tokens/s x (student 6N + teacher 2N + attention, distillery/flops.py; LM-only: the student
    alone) / measured peak."""
    from distillery import flops
    student = flops.train_flops_per_token(hf_cfg(s, s["student"]), s["seq"])
    per_token = student + flops.forward_flops_per_token(hf_cfg(s, s["teacher"]), s["seq"])
    for v, r in res.items():
        if "tokens_per_s" in r:
            r["mfu"] = round(r["tokens_per_s"] * (student if v == "distillery_lm" else per_token) / peak, 3)
    return per_token


def run_variants(script, variants, gpu, extra=(), keep_going=False):
    """Each variant in a fresh child process of `script` (`--child NAME`): clean peak memory, no DeepSpeed state
    shared between variants. Prints one line per variant; returns {variant: its measure() dict}. A variant that
    fails stops the bench, or with keep_going is recorded as {"variant", "error": the tail of its output} while
    the others still run."""
    res = {}
    for v in variants:
        cmd = [sys.executable, os.path.abspath(script), "--child", v] + (["--gpu"] if gpu else []) + list(extra)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            if not keep_going:
                raise SystemExit(f"{v} failed:\n{p.stderr[-3000:]}")
            res[v] = {"variant": v, "error": (p.stdout + p.stderr)[-1500:]}
            print(f"{v} failed (exit {p.returncode}):\n{p.stderr[-3000:]}", flush=True)
            continue
        res[v] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{v:<20} {res[v]['step_ms']:>10.1f} ms/step {res[v]['tokens_per_s']:>10,} tok/s "
              f"peak {res[v]['peak_gib']:.2f} GiB{' (RSS)' if not gpu else ''}", flush=True)
    return res


def ratio(res, a, b, key, inverse=False):
    """res[a][key] / res[b][key] (b / a when inverse), rounded; None unless both variants ran."""
    if "error" in res.get(a, {"error": 1}) or "error" in res.get(b, {"error": 1}):
        return None
    x, y = res[a][key], res[b][key]
    return round(y / x if inverse else x / y, 3)


def targets(res, gpu):
    """Issue 18's targets for the KD step beside what it measured (the GPU's; on CPU they are shown, not judged)."""
    kd = res.get("distillery", {})
    if "tokens_per_s" not in kd:
        return None
    got = {"kd_tokens_per_s": kd["tokens_per_s"], "kd_mfu": kd.get("mfu"), "kd_peak_gib": kd["peak_gib"],
           "kd_over_lm": ratio(res, "distillery", "distillery_lm", "step_ms")}
    meets = {k: None if v is None or not gpu else (v <= TARGETS[k] if k in ("kd_peak_gib", "kd_over_lm")
                                                    else v >= TARGETS[k]) for k, v in got.items()}
    return {"measured": got, "target": TARGETS, "meets": meets}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--paper", action="store_true", help="the study's pair at seq 8192 (see above)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of " + ", ".join(VARIANTS) +
                    " (default: all; with --paper: " + ", ".join(PAPER_VARIANTS) + ")")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="matmul peak measured elsewhere (0: measure here)")
    ap.add_argument("--placements", action="store_true", help="the trainer's step with each teacher placement: "
                    "--variants " + ",".join(PLACED))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.gpu, a.paper)))
        return
    if a.placements:
        a.variants = ",".join(PLACED)
    variants = a.variants.split(",") if a.variants else list(PAPER_VARIANTS if a.paper else VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if a.gpu:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: --gpu but CUDA is not available; drop --gpu for the CPU shapes")
    res = run_variants(__file__, variants, a.gpu, ["--paper"] if a.paper else [], keep_going=True)
    s = shapes(a.gpu, a.paper)
    peak = a.peak_tflops * 1e12 or matmul_peak(a.gpu)
    add_mfu(res, s, peak)
    rec = {"bench": "train_step_paper" if a.paper else "train_step", "device": device_name(a.gpu), **s,
           "doc_len": DOC_LEN, **res, "matmul_peak_tflops": round(peak / 1e12, 2),
           "peak_source": "given" if a.peak_tflops else "measured here"}
    if a.paper:
        # issue 14 item 4: the study's 50B tokens on 64 such GPUs at this rate, teacher included (no comm modelled:
        # docs/scaling.md says what ZeRO-3 adds across nodes)
        for r in res.values():
            if "tokens_per_s" in r:
                r["hours_50b_on_64"] = round(50e9 / (64 * r["tokens_per_s"]) / 3600, 2)
    else:
        rec.update({
            "tokens_per_s_ratio": ratio(res, "distillery", "naive", "tokens_per_s"),
            # the decomposition of the gap: our micro-step + fused head without DeepSpeed, then DeepSpeed's engine
            # with nothing partitioned, then ZeRO-3 (each vs the naive loop's tokens/s)
            "fused_torch_ratio": ratio(res, "fused_torch", "naive", "tokens_per_s"),
            "zero0_ratio": ratio(res, "distillery_zero0", "naive", "tokens_per_s"),
            "peak_mem_ratio": ratio(res, "distillery", "naive", "peak_gib"),
            "doc_mask_step_time_ratio": ratio(res, "distillery_doc_mask", "distillery", "step_ms"),
            "kd_over_lm_step_time": ratio(res, "distillery", "distillery_lm", "step_ms"),
            # issue 22: the teacher replicated / offloaded instead of partitioned (ZeRO-3), same step otherwise
            "replicated_step_time_ratio": ratio(res, "distillery_replicated", "distillery", "step_ms"),
            "offload_step_time_ratio": ratio(res, "distillery_offload", "distillery", "step_ms"),
            "targets": targets(res, a.gpu)})
    print(json.dumps(rec))
    failed = [v for v, r in res.items() if "error" in r]
    if failed:
        raise SystemExit(f"error: variant(s) {', '.join(failed)} failed (their output is in the JSON line)")


def device_name(gpu):
    import torch
    return torch.cuda.get_device_name() if gpu else "cpu"


if __name__ == "__main__":
    main()
