"""Teacher-cache bytes per token and read speed: the compact layout (v2, the default) against the fixed one (v1, the
layout before issue 23), in one run.

    .venv/bin/python bench/cache_size.py                      # the offline data + trained offline teachers (CPU)
    .venv/bin/python bench/cache_size.py --rows 128 --big_rows 8 --repeat 3      # quicker

What it does (every cache is written by distillery.teacher_cache.write_cache with the generator's own encoders and
read back by CacheReader; bytes per token = the shard files' bytes, offset tables included, / tokens):
1. offline: --rows training rows of --data (evenly spaced over the split), the trained offline teacher (--teacher,
   tiny-teacher, vocab 2048, document-masked positions as the builder runs it, T = 1); for each method (sampled,
   topk) and K in --ks: fixed, compact (default precisions: fixed16 entropy / fp16 log-probs), compact at fp32,
   and the same targets with ids packed at 17 bits (what a 128256-token vocabulary needs) with the distinct-id
   counts this teacher produced. The distinct ids per position of the sampled draws: histogram and mean, for
   --teacher and --teacher2 (the under-trained one).
2. vocab 128256: a random-weight Llama (hidden 64, 1 layer; random weights are near-uniform, so nearly all K draws
   are distinct: the worst case for the sampled layout) on --big_rows rows, the same methods and K.
3. read throughput: CacheReader.take of 40 random micro-batches (--mb rows) from the fixed and the compact cache of
   the same targets, alternating, --repeat times (median): warm (shards in the page cache) on process CPU time (the
   decode's cost; the box is shared, CPU time is what other jobs disturb least) and wall time, and cold (each pass
   on a fresh reader after posix_fadvise(DONTNEED) dropped the shards from the page cache: what a cache larger than
   memory costs), wall time; ratio compact / fixed (> 1: compact reads faster). Caches: offline sampled K = 12 and
   top-k K = 64, the same at vocab 128256, and the offline sampled K = 12 targets joined into 8192-token rows with
   17-bit ids (the study's row length and id width; --mb / 4 rows per take).
4. top-k precision: sparse_loss (renorm, tail; T = 1, 2; K = 12, 64) with the under-trained offline teacher as the
   student (its hidden states and head) on the trained teacher's cached targets at fp16 and bf16 against fp32: the
   relative change of kd_sum and of the gradients (norm of the difference / norm).
Prints tables, then one JSON line.
"""
import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distillery import cache_layout as cl  # noqa: E402
from distillery import teacher_cache as tc  # noqa: E402

BIG_V = 128256


def encode(logp_chunks, n, S, ks, row_ids, seed=0):
    """{(method, K): (ids, vals, rest) numpy [n, S, K], [n, S, K], [n, S]} from log-prob chunks [C, V] covering the n
    rows' positions in order; sampling uniforms per (seed, row) as the builder draws them."""
    u = {k: torch.cat([tc.row_uniforms(seed, r, S, k) for r in row_ids]) for k in ks}
    parts = {(m, k): [] for m in ("sampled", "topk") for k in ks}
    at = 0
    for logp in logp_chunks:
        c = logp.shape[0]
        for k in ks:
            parts["sampled", k].append(tc.encode_sampled(logp, u[k][at:at + c]))
            parts["topk", k].append(tc.encode_topk(logp, k))
        at += c
    out = {}
    for key, ps in parts.items():
        k = key[1]
        ids, vals, rest = (torch.cat(x) for x in zip(*ps))
        out[key] = (ids.reshape(n, S, k).numpy(), vals.reshape(n, S, k).numpy(), rest.reshape(n, S).numpy())
    return out


def variants(method, kd_vocab):
    """name -> (version, layout spec) of the layouts measured."""
    out = {"fixed": (cl.FIXED, None), "compact": (cl.COMPACT, cl.spec(cl.COMPACT, method, kd_vocab))}
    if method == "sampled":
        out["compact_fp32"] = (cl.COMPACT, cl.spec(cl.COMPACT, method, kd_vocab, entropy="fp32"))
    else:
        out["compact_fp32"] = (cl.COMPACT, cl.spec(cl.COMPACT, method, kd_vocab, vals="fp32"))
    if cl.id_bits(kd_vocab) != cl.id_bits(BIG_V):     # the same targets with 17-bit ids (and the 128k entropy scale)
        out["compact_17bit"] = (cl.COMPACT, {**cl.spec(cl.COMPACT, method, BIG_V), "id_bits": cl.id_bits(BIG_V)})
    return out


def write(work, name, method, k, S, kd_vocab, version, spec, targets):
    d = os.path.join(work, name)
    return tc.write_cache(d, {"method": method, "k": k, "temperature": 1.0, "seed": 0, "doc_mask": True,
                              "kd_vocab": kd_vocab, "seq_len": S, "version": version,
                              **({"layout": spec} if spec else {})}, [targets])


def sizes(work, tag, enc, S, kd_vocab, ks):
    """bytes per token of every (method, K, layout); the directories of fixed / compact kept for the read test."""
    table, readers = {}, {}
    for (method, k), targets in enc.items():
        row = table.setdefault(method, {}).setdefault(str(k), {})
        for name, (version, spec) in variants(method, kd_vocab).items():
            r = write(work, f"{tag}-{method}-{k}-{name}", method, k, S, kd_vocab, version, spec, targets)
            row[name] = r.index["bytes_per_token"]
            if name in ("fixed", "compact"):
                readers[method, k, name] = r.dir
    return table, readers


def distinct(enc, ks):
    """{K: (histogram of distinct ids per position [0..K], mean)} of the sampled targets."""
    out = {}
    for k in ks:
        n = (enc["sampled", k][1] > 0).sum(-1).reshape(-1)
        out[k] = (np.bincount(n, minlength=k + 1).tolist(), float(n.mean()))
    return out


def evict(cache_dir):
    """Drop a cache's shard files from the page cache (they are fsynced; no reader may still map them): the next
    read goes to the disk."""
    gc.collect()
    for e in tc.read_cache_index(cache_dir)["files"]:
        fd = os.open(os.path.join(cache_dir, e["path"]), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def read_speed(dirs, mb, repeat, n_batches=40, seed=0):
    """rows / s of take() on the same random micro-batches from the fixed and the compact cache (dirs: name -> cache
    directory), alternating, `repeat` times each: warm (the shards in the page cache: CPU time, the decode's cost;
    and wall) and cold (each pass on a new reader, the shards evicted from the page cache first: wall, what a cache
    larger than memory costs)."""
    readers = {name: tc.CacheReader(d) for name, d in dirs.items()}
    n = len(readers["fixed"])
    rng = np.random.default_rng(seed)
    batches = [rng.choice(n, size=min(mb, n), replace=False) for _ in range(n_batches)]
    for x, y in zip(readers["fixed"].take(batches[0]), readers["compact"].take(batches[0])):   # warm; same shapes
        assert x.shape == y.shape
    rows = sum(len(b) for b in batches)
    res = {name: {"cpu": [], "wall": [], "cold_wall": []} for name in readers}
    for _ in range(repeat):
        for name, r in readers.items():
            c, t = time.process_time(), time.perf_counter()
            for b in batches:
                r.take(b)
            res[name]["cpu"].append(rows / max(time.process_time() - c, 1e-9))
            res[name]["wall"].append(rows / max(time.perf_counter() - t, 1e-9))
    readers = None
    for _ in range(repeat):
        for name, d in dirs.items():
            evict(d)
            t = time.perf_counter()
            r = tc.CacheReader(d)
            for b in batches:
                r.take(b)
            res[name]["cold_wall"].append(rows / max(time.perf_counter() - t, 1e-9))
            r = None
    out = {name: {k: round(float(np.median(v))) for k, v in d.items()} for name, d in res.items()}
    for k in ("cpu", "wall", "cold_wall"):
        out[f"ratio_{k}"] = round(out["compact"][k] / out["fixed"][k], 3)
    return out


def teacher_logp(model_dir, x, eos, T=1.0):
    from transformers import AutoModelForCausalLM
    from distillery.packing import doc_positions
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        pos = doc_positions(x, eos)
        return lm, pos, torch.log_softmax(lm(input_ids=x, position_ids=pos).logits.float() / T, -1)


def topk_precision(work, teacher, student, x, eos, y):
    """Relative change of kd_sum and the gradients with fp16 / bf16 top-k values against fp32 (read back through
    the compact layout), the under-trained teacher as the student."""
    from distillery.sparse_kd import sparse_loss
    n, S = x.shape
    st, pos, _ = teacher_logp(student, x, eos)
    with torch.no_grad():
        hs = st.model(input_ids=x, position_ids=pos).last_hidden_state.float()
    ws = st.lm_head.weight.detach().float()
    out = {}
    for T in (1.0, 2.0):
        _, _, logp = teacher_logp(teacher, x, eos, T)
        V = logp.shape[-1]
        for k in (12, 64):
            ids, vals, rest = (a.numpy() for a in tc.encode_topk(logp.reshape(-1, V), k))
            targets = (ids.reshape(n, S, k), vals.reshape(n, S, k), rest.reshape(n, S))
            taken = {}
            for kind in ("fp32", "fp16", "bf16"):
                r = write(work, f"prec-{T}-{k}-{kind}", "topk", k, S, V, cl.COMPACT,
                          cl.spec(cl.COMPACT, "topk", V, vals=kind), targets)
                taken[kind] = r.take(np.arange(n))
            for mode in ("renorm", "tail"):
                res = {}
                for kind, (i, v, rr) in taken.items():
                    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
                    o = sparse_loss(student_hidden=h, student_weight=w, targets=y, cache_ids=i, cache_vals=v,
                                    cache_rest=rr, method="topk", temperature=T, w_ce=0.0, w_kd=1.0,
                                    sparse_mode=mode, kd_vocab=V)
                    o.loss.backward()
                    res[kind] = (o.kd_sum.double(), h.grad.double(), w.grad.double())
                ref = res["fp32"]
                for kind in ("fp16", "bf16"):
                    kd, gh, gw = res[kind]
                    out[f"T{T:g}_k{k}_{mode}_{kind}"] = {
                        "kd": float(abs(kd - ref[0]) / abs(ref[0])),
                        "grad_h": float((gh - ref[1]).norm() / ref[1].norm()),
                        "grad_w": float((gw - ref[2]).norm() / ref[2].norm())}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/main/data/offline")
    ap.add_argument("--teacher", default="/work/main/runs/mini/t-small-well/export")
    ap.add_argument("--teacher2", default="/work/main/runs/mini/t-small-under/export")
    ap.add_argument("--rows", type=int, default=512, help="offline training rows cached")
    ap.add_argument("--big_rows", type=int, default=16, help="rows cached at vocab 128256")
    ap.add_argument("--ks", default="1,8,12,32,64")
    ap.add_argument("--mb", type=int, default=8, help="rows per take() in the read test (a micro-batch)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one, removed)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ks = [int(k) for k in a.ks.split(",")]
    from distillery.loss_parts import shift_targets
    from distillery.shards import TokenRows, read_index
    work = a.work or tempfile.mkdtemp(prefix="cache_size_")
    t_start = time.time()
    try:
        rows = TokenRows(a.data)
        eos = read_index(a.data)["eos_id"]
        row_ids = np.linspace(0, len(rows) - 1, a.rows).astype(np.int64)
        x = torch.from_numpy(rows.take(row_ids))
        n, S = x.shape
        # 1. offline
        _, _, logp = teacher_logp(a.teacher, x, eos)
        V = logp.shape[-1]
        enc = encode(logp.reshape(-1, V).split(4096), n, S, ks, row_ids.tolist())
        off_sizes, off_readers = sizes(work, "off", enc, S, V, ks)
        hist = distinct(enc, ks)
        del enc
        _, _, logp2 = teacher_logp(a.teacher2, x, eos)
        hist2 = distinct(encode(logp2.reshape(-1, V).split(4096), n, S, ks, row_ids.tolist()), ks)
        del logp2
        # 2. vocab 128256, random weights
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        big = LlamaForCausalLM(LlamaConfig(vocab_size=BIG_V, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                           max_position_embeddings=S)).eval()
        xb = x[:a.big_rows] % BIG_V
        with torch.no_grad():
            hb = big.model(input_ids=xb).last_hidden_state.reshape(-1, 64)
        wb = big.lm_head.weight.detach()
        chunks = (torch.log_softmax(hb[i:i + 256] @ wb.t(), -1) for i in range(0, hb.shape[0], 256))
        benc = encode(chunks, len(xb), S, ks, row_ids[:a.big_rows].tolist())
        big_sizes, big_readers = sizes(work, "big", benc, S, BIG_V, ks)
        big_hist = distinct(benc, ks)
        del benc, big
        # 3. reading: the caches above, and the offline sampled K = 12 targets as 8192-token rows at 17-bit ids
        # (the study's row length and id width; consecutive rows' positions joined, sizes and speed only)
        speed = {}
        for tag, dirs, key in (("offline", off_readers, ("sampled", 12)), ("offline", off_readers, ("topk", 64)),
                               ("vocab128256", big_readers, ("sampled", 12)),
                               ("vocab128256", big_readers, ("topk", 64))):
            if (*key, "fixed") in dirs:
                speed[f"{tag}_{key[0]}_k{key[1]}"] = read_speed(
                    {"fixed": dirs[(*key, "fixed")], "compact": dirs[(*key, "compact")]}, a.mb, a.repeat)
        if 12 in ks and n * S >= 2 * 8192:
            r = tc.CacheReader(off_readers["sampled", 12, "fixed"])
            ids, vals, rest = (x.numpy() for x in r.take(np.arange(n)))
            m = n * S // 8192
            long = (ids.reshape(-1)[:m * 8192 * 12].reshape(m, 8192, 12),
                    vals.reshape(-1)[:m * 8192 * 12].reshape(m, 8192, 12), rest.reshape(-1)[:m * 8192].reshape(m, 8192))
            lv = variants("sampled", V)
            dirs = {name: write(work, f"long-{name}", "sampled", 12, 8192, V, *lv[src], long).dir
                    for name, src in (("fixed", "fixed"), ("compact", "compact_17bit"))}
            speed["offline_rows8192_sampled_k12_17bit"] = read_speed(dirs, max(1, a.mb // 4), a.repeat)
        # 4. top-k precision
        y = shift_targets(x[:32])
        prec = topk_precision(work, a.teacher, a.teacher2, x[:32], eos, y)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"bytes per token (shard bytes incl. offset tables / tokens); offline: {n} rows x {S} tokens, vocab {V}, "
          f"{os.path.basename(os.path.dirname(a.teacher))}; vocab {BIG_V}: {a.big_rows} rows, random weights")
    for tag, table in (("offline", off_sizes), (f"vocab {BIG_V}", big_sizes)):
        for method, byk in table.items():
            names = list(next(iter(byk.values())))
            print(f"  {tag:13s} {method:8s} K   " + "  ".join(f"{nm:>14s}" for nm in names))
            for k, row in byk.items():
                print(f"  {'':13s} {'':8s} {k:>3s} " + "  ".join(f"{row[nm]:14.2f}" for nm in names))
    for label, h in ((os.path.basename(os.path.dirname(a.teacher)), hist),
                     (os.path.basename(os.path.dirname(a.teacher2)), hist2), (f"random vocab {BIG_V}", big_hist)):
        print(f"distinct ids per position, {label}: " + ", ".join(f"K={k}: mean {m:.2f}" for k, (_, m) in h.items()))
    print(f"  histogram K=12 ({os.path.basename(os.path.dirname(a.teacher))}), n = 0..12: {hist[12][0]}"
          if 12 in hist else "")
    for name, s in speed.items():
        print(f"read {name}: rows/s fixed / compact: warm CPU {s['fixed']['cpu']:,} / {s['compact']['cpu']:,} "
              f"(x{s['ratio_cpu']}), warm wall {s['fixed']['wall']:,} / {s['compact']['wall']:,} (x{s['ratio_wall']}), "
              f"cold wall {s['fixed']['cold_wall']:,} / {s['compact']['cold_wall']:,} (x{s['ratio_cold_wall']})")
    worst = {kind: {q: max(v[q] for key, v in prec.items() if key.endswith(kind)) for q in ("kd", "grad_h", "grad_w")}
             for kind in ("fp16", "bf16")}
    for kind, w in worst.items():
        print(f"top-k values at {kind} vs fp32 (worst over T, K, mode): kd {w['kd']:.1e}, grad_h {w['grad_h']:.1e}, "
              f"grad_w {w['grad_w']:.1e}")
    k12 = off_sizes.get("sampled", {}).get("12", {})
    mean12 = hist[12][1] if 12 in hist else None
    bits_fixed = 16 + 11                                  # fixed16 entropy + K - 1 mask bits, per position
    out = {"bench": "cache_size", "rows": n, "seq_len": S, "vocab": V, "teacher": a.teacher,
           "offline_bytes_per_token": off_sizes, "vocab128256_bytes_per_token": big_sizes,
           "distinct_mean": {k: round(m, 3) for k, (_, m) in hist.items()},
           "distinct_mean_teacher2": {k: round(m, 3) for k, (_, m) in hist2.items()},
           "distinct_mean_random128256": {k: round(m, 3) for k, (_, m) in big_hist.items()},
           "distinct_hist_k12": hist[12][0] if 12 in hist else None,
           "sampled_k12_17bit_bytes_per_token": k12.get("compact_17bit"),
           "target_20_met": bool(k12.get("compact_17bit", 1e9) <= 20),
           "distinct_mean_for_20_bytes": round((20 * 8 - bits_fixed) / 17, 2),
           "mean_distinct_k12": round(mean12, 3) if mean12 else None,
           "read": speed, "topk_precision_worst": worst, "seconds": round(time.time() - t_start, 1),
           "loadavg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
