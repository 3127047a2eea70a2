"""One training step from a teacher cache (issue 13) against an online-KD step and an LM-only step, in one run.

    python bench/cached_step.py                # CPU: bench/train_step.py's shapes (tiny-student 192h/4L, teacher
                                               # 96h/2L, vocab 2048, seq 128, micro-batch 8), fp32
    python bench/cached_step.py --gpu          # one GPU: train_step.py's GPU pair (vocab 128256, seq 2048), bf16

Variants (each in a fresh child process on the same random batches, after warm-up, median step time), all through
the trainer's own micro-step (distillery/step.py) on a ZeRO-3 student engine built as bench/train_step.py builds it:
  lm_only            alpha = 0: CE only, no teacher (the fused head without teacher).
  online_kd          teacher forward (ZeRO-3 inference engine) + fused KD head, alpha = 0.2.
  cached_topk        no teacher: the step reads its rows' targets from an on-disk cache (CacheReader.take, K = 32
                     top-k in the default compact layout) and the loss is distillery/sparse_kd.py (sparse_mode
                     tail), alpha = 0.2.
  cached_sampled     the same with K = 32 sampled ids and the unbiased estimator.
The cached variants route the sparse loss through the engine the way the trainer will: the bench registers
`sparse_loss` as distillery.loss.IMPLS["sparse"] in its own process (loss_impl=sparse), so StudentWithLoss gathers
the output weight and ZeRO-3 reduces its gradient as for the other paths. The cache is made before timing (from
the same teacher, in this process), so its cost is the generator's, not the step's.
Ends with one JSON line: step ms, tokens/s and peak memory per variant, and the step-time ratios
cached / lm_only, cached / online_kd, online_kd / lm_only.
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
_spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(REPO, "bench", "train_step.py"))
ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts)

ALPHA, K = 0.2, 32
VARIANTS = ("lm_only", "online_kd", "cached_topk", "cached_sampled")


def write_cache(cache_dir, s, teacher, bs, method, dev):
    """A real cache directory (distillery/teacher_cache.py format, the default compact layout) holding the bench
    batches' rows, made from the teacher's logits at T = 1 by the generator's own encoders. Returns a CacheReader."""
    import torch
    from distillery import cache_layout
    from distillery import teacher_cache as tc
    S = s["seq"]

    def batches():
        with torch.no_grad():
            for b, x in enumerate(bs):
                logp = torch.log_softmax(teacher(input_ids=x.to(dev)).logits.float().reshape(-1, s["vocab"]), -1)
                if method == "topk":
                    ids, vals, rest = tc.encode_topk(logp, K)
                else:
                    u = torch.cat([tc.row_uniforms(0, b * s["mb"] + r, S, K) for r in range(s["mb"])])
                    ids, vals, rest = tc.encode_sampled(logp, u)
                yield (ids.cpu().reshape(s["mb"], S, K).numpy(), vals.cpu().reshape(s["mb"], S, K).numpy(),
                       rest.cpu().reshape(s["mb"], S).numpy())
    return tc.write_cache(cache_dir, {
        "method": method, "k": K, "temperature": 1.0, "seed": 0, "doc_mask": False, "kd_vocab": s["vocab"],
        "seq_len": S, "version": tc.VERSION, "layout": cache_layout.spec(tc.VERSION, method, s["vocab"])}, batches())


def build(variant, s, dev):
    """-> step(i) running micro-step i on batch i % 4 of the variant."""
    import torch
    from transformers import AutoModelForCausalLM
    from distillery import loss as loss_seam
    from distillery.config import Config
    from distillery.engines import init_student, init_teacher, student_ds_config, teacher_ds_config
    from distillery.loss_parts import shift_targets
    from distillery.models import zero3_context
    from distillery.objective import Objective
    from distillery.sparse_kd import sparse_loss
    from distillery.step import micro_step
    alpha = 0.0 if variant == "lm_only" else ALPHA
    cfg = Config(micro_batch_size=s["mb"], global_batch_size=s["mb"], lr=1e-4, alpha=alpha, loss_impl="fused",
                 train_tokens=10 ** 9, seq_len=s["seq"])
    ds_base = {"zero_optimization": {"stage": 3}, **({"bf16": {"enabled": True}} if dev == "cuda" else {})}
    ds_student = student_ds_config(ds_base, cfg, world=1)
    objective = Objective.from_config(cfg, total_steps=1000)
    _, w_ce, w_kd = objective.weights(0)
    n = s["mb"] * (s["seq"] - 1)
    bs = [b.to(dev) for b in ts.batches(s)]
    teacher = reader = None
    torch.manual_seed(0)
    if variant == "online_kd":
        ds_teacher = teacher_ds_config(ds_base, cfg)
        with zero3_context(ds_teacher):
            te = AutoModelForCausalLM.from_config(ts.hf_cfg(s, s["teacher"]))
        teacher = init_teacher(te, ds_teacher)
        loss_kw = dict(objective.loss_kw(), kd_vocab=s["vocab"])
    elif variant.startswith("cached"):
        te = AutoModelForCausalLM.from_config(ts.hf_cfg(s, s["teacher"])).to(dev).eval()   # same init as online
        if dev == "cuda":
            te = te.to(torch.bfloat16)
        method = variant.split("_")[1]
        reader = write_cache(tempfile.mkdtemp(prefix="cached_step_"), s, te, bs, method, dev)
        del te
        loss_seam.IMPLS["sparse"] = sparse_loss          # this process only: how the trainer will route it
        loss_kw = dict(impl="sparse", method=method, sparse_mode="tail", kd_vocab=s["vocab"], temperature=1.0,
                       chunk_size=0)
    else:
        loss_kw = objective.loss_kw(with_teacher=False)
    with zero3_context(ds_student):
        st = AutoModelForCausalLM.from_config(ts.hf_cfg(s, s["student"]))
    engine = init_student(st, cfg, ds_student, total_steps=1000)

    def step(i):
        b = i % len(bs)
        x = bs[b]
        kw = loss_kw
        if reader is not None:  # the rows' cached targets, read from disk like the trainer will
            ids, vals, rest = reader.take(range(b * s["mb"], (b + 1) * s["mb"]))
            kw = dict(loss_kw, cache_ids=ids.to(dev, non_blocking=True), cache_vals=vals.to(dev, non_blocking=True),
                      cache_rest=rest.to(dev, non_blocking=True))
        parts = micro_step(engine, teacher, x, shift_targets(x), kw, w_ce / n, w_kd / n)
        return parts["loss"]
    return step


def measure(variant, gpu):
    from distillery.launch import init_distributed
    dev = "cuda" if gpu else "cpu"
    s = ts.shapes(gpu)
    init_distributed()
    step = build(variant, s, dev)
    return dict(variant=variant, **ts.time_steps(step, s, gpu))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.gpu)))
        return
    res = ts.run_variants(__file__, VARIANTS, a.gpu)
    lm, on = res["lm_only"]["step_ms"], res["online_kd"]["step_ms"]
    out = {"bench": "cached_step", "device": "cuda" if a.gpu else "cpu", **ts.shapes(a.gpu), "k": K,
           "alpha": ALPHA, **res, "online_over_lm": round(on / lm, 3)}
    for v in ("cached_topk", "cached_sampled"):
        out[f"{v}_over_lm"] = round(res[v]["step_ms"] / lm, 3)
        out[f"{v}_over_online"] = round(res[v]["step_ms"] / on, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
