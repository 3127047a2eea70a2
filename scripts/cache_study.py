"""Issue 13's experiment: one teacher and one alpha of the offline setting, distilled online, from a top-k cache and
from a sampled cache (the same K), 2 seeds; held-out and out-of-domain PPL side by side with each run's wall time and
teacher FLOPs (docs/results/teacher-cache.md says what was chosen and why).

    python scripts/cache_study.py                 # every step not finished yet, then the tables (resumes)
    python scripts/cache_study.py --report-only   # just the tables from what has finished
    python scripts/cache_study.py --dry-run       # the commands, nothing run
    python scripts/cache_study.py --topk_sweep 32 64   # + top-k renorm at k = 32, 64 from one K = 64 cache

Steps: the offline teacher (configs/offline/teacher.yaml: tiny-teacher, 400k tokens, alpha = 0, seed 42); a top-k
and a sampled cache of it over the whole training split (`python -m data_prep.teacher_cache`, K = --k, one process);
then for seeds 43 and 44 the offline student (configs/offline/student_kd.yaml: tiny-student, 400k tokens, alpha 0.2)
trained online, from the top-k cache (renorm, and tail: both read the same cache), from the sampled cache, and its
alpha = 0 baseline (configs/offline/student_baseline.yaml). Everything lands in runs/cache-study/; the tables go to
--out (markdown + JSON) and `python -m eval.report` adds the paired PPL changes vs the baseline.
"""
import os
import sys

from steps import finished, parser, prepare, run_steps, train_cmd

from distillery import flops
from distillery.atomic import read_json, read_jsonl, write_json, write_text
from distillery.errors import cli
from eval import report
from eval.report import mean_se

OUT = "runs/cache-study"
SEEDS = (43, 44)
TEACHER = f"{OUT}/teacher"
BASE, KD = "configs/offline/student_baseline.yaml", "configs/offline/student_kd.yaml"


def caches(k, sweep=()):
    """{cache key: dir}: the K-entry top-k and sampled caches, and for --topk_sweep one top-k cache of the largest k
    (a top-k cache serves every smaller k exactly: teacher_cache_k=)."""
    out = {"topk": f"{OUT}/cache-topk{k}", "sampled": f"{OUT}/cache-sampled{k}"}
    if sweep and max(sweep) != k:
        out["topk-sweep"] = f"{OUT}/cache-topk{max(sweep)}"
    return out


def variants(k, sweep=()):
    """{variant: (config, overrides, cache key or None)}; the student's own config stays the offline one. Cached
    variants name teacher= too: no teacher is loaded, but the trainer checks it made the cache and the report groups
    by it."""
    c, t = caches(k, sweep), f"teacher={TEACHER}/export"
    out = {"baseline": (BASE, [], None), "online": (KD, [t], None),
           "topk-renorm": (KD, [t, f"teacher_cache={c['topk']}", "teacher_cache_mode=renorm"], "topk"),
           "topk-tail": (KD, [t, f"teacher_cache={c['topk']}", "teacher_cache_mode=tail"], "topk"),
           "sampled": (KD, [t, f"teacher_cache={c['sampled']}"], "sampled")}
    for kk in sweep:
        if kk != k:
            key = "topk-sweep" if "topk-sweep" in c else "topk"
            out[f"topk-renorm-k{kk}"] = (KD, [t, f"teacher_cache={c[key]}", "teacher_cache_mode=renorm",
                                              f"teacher_cache_k={kk}"], key)
    return out


def steps(k, sweep=()):
    """[(kind, key, output dir, command)] in dependency order."""
    out = [("teacher", "teacher", TEACHER, train_cmd("configs/offline/teacher.yaml", [], TEACHER[len("runs/"):]))]
    for key, d in caches(k, sweep).items():
        method, kk = ("sampled", k) if key == "sampled" else ("topk", max(sweep) if key == "topk-sweep" else k)
        out.append(("cache", key, d, [sys.executable, "-m", "data_prep.teacher_cache", "--teacher", f"{TEACHER}/export",
                                      "--data", "data/offline", "--out", d, "--k", str(kk), "--method", method,
                                      "--seed", "0"]))
    for s in SEEDS:
        for v, (config, over, _) in variants(k, sweep).items():
            name = f"{OUT[len('runs/'):]}/{v}-s{s}"
            out.append(("student", v, f"runs/{name}", train_cmd(config, [f"seed={s}", *over], name)))
    return out


def done(kind, path):
    return os.path.isfile(os.path.join(path, "index.json")) if kind == "cache" else finished(path)


def fmt(m, se, f="{:.2f}"):
    return f.format(m) + ("" if se != se else " ± " + f.format(se).lstrip("+"))


def tables(k, timing, sweep=()):
    """The side-by-side numbers: per variant mean ± s.e. over seeds of PPL per eval set, PPL change vs online
    (paired by seed), wall time, teacher FLOPs in the run and the one-time cache cost."""
    c, vs = caches(k, sweep), variants(k, sweep)
    tcfg = read_json(f"{TEACHER}/export/config.json")
    gen = {}
    for m, d in c.items():
        if not os.path.isfile(os.path.join(d, "index.json")):
            continue
        idx = read_json(os.path.join(d, "index.json"))
        gen[m] = {"tokens": idx["tokens"], "bytes": idx["bytes"], "bytes_per_token": idx["bytes_per_token"],
                  "teacher_flops": flops.teacher_forward_flops(tcfg, idx["tokens"], idx["seq_len"]),
                  "k": idx["k"], "method": idx["method"], "seconds": timing.get(f"cache:{m}")}
    runs = {}
    for s in SEEDS:
        for v in vs:
            d = f"{OUT}/{v}-s{s}"
            if not finished(d):
                continue
            recs = read_jsonl(os.path.join(d, "metrics.jsonl"))
            comp = next(r for r in reversed(recs) if "compute/teacher_flops" in r)
            tps = [r["perf/tokens_per_s"] for r in recs if r.get("perf/tokens_per_s")]
            runs[(v, s)] = {"ppl": {n: x["ppl"] for n, x in read_json(os.path.join(d, "eval", "final.json"))["ppl"]
                                    .items()},
                            "teacher_flops": comp["compute/teacher_flops"], "student_flops": comp["compute/student_flops"],
                            "tokens_per_s": sum(tps) / len(tps), "seconds": timing.get(f"student:{v}-s{s}")}
    sets = sorted({n for r in runs.values() for n in r["ppl"]}, key=lambda n: (n != "heldout", n))
    rows = []
    for v, (_, _, cache_key) in vs.items():
        rs = [(s, runs[(v, s)]) for s in SEEDS if (v, s) in runs]
        if not rs:
            continue
        row = {"variant": v, "n": len(rs), "seeds": [s for s, _ in rs]}
        for n in sets:
            row[f"ppl/{n}"] = mean_se([r["ppl"][n] for _, r in rs])
            on = [(r["ppl"][n], runs[("online", s)]["ppl"][n]) for s, r in rs if ("online", s) in runs]
            if on and v != "online":
                row[f"vs_online/{n}"] = mean_se([100 * (a / b - 1) for a, b in on])
        row["teacher_flops_in_run"] = sum(r["teacher_flops"] for _, r in rs) / len(rs)
        row["student_flops"] = sum(r["student_flops"] for _, r in rs) / len(rs)
        row["tokens_per_s"] = mean_se([r["tokens_per_s"] for _, r in rs])
        secs = [r["seconds"] for _, r in rs if r["seconds"] is not None]
        row["seconds"] = mean_se(secs) if secs else None
        row["cache"] = gen.get(cache_key) if cache_key else None
        rows.append(row)
    return {"k": k, "sets": sets, "rows": rows, "caches": gen, "teacher_config": f"{TEACHER}/export/config.json"}


def markdown(t):
    sets = t["sets"]
    head = ["variant", "n"] + [f"PPL {n}" for n in sets] + [f"vs online {n} %" for n in sets] + [
        "wall s / run", "tok/s", "teacher FLOPs in the run", "one-time cache: teacher FLOPs, s, bytes"]
    body = []
    for r in t["rows"]:
        cache = r["cache"]
        body.append([r["variant"], str(r["n"])] + [fmt(*r[f"ppl/{n}"]) for n in sets]
                    + [fmt(*r[f"vs_online/{n}"], "{:+.2f}") if f"vs_online/{n}" in r else "-" for n in sets]
                    + [fmt(*r["seconds"], "{:.0f}") if r["seconds"] else "-", fmt(*r["tokens_per_s"], "{:.0f}"),
                       f"{r['teacher_flops_in_run']:.3g}",
                       "-" if cache is None else f"{cache['teacher_flops']:.3g}, "
                       f"{'-' if cache['seconds'] is None else round(cache['seconds'])}, {cache['bytes'] / 1e9:.2f} GB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = parser(__doc__, "docs/results/teacher-cache")
    ap.add_argument("--k", type=int, default=12, help="cache entries per position, both methods")
    ap.add_argument("--topk_sweep", type=int, nargs="*", default=[],
                    help="also top-k renorm at these k, from one top-k cache of the largest (e.g. 32 64)")
    a = ap.parse_args(argv)
    prepare(a)
    tpath = os.path.join(OUT, "timing.json")
    todo = [] if a.report_only else [(f"{kind}:{key if kind != 'student' else os.path.basename(path)}",
                                      f"{kind} {path}", cmd)
                                     for kind, key, path, cmd in steps(a.k, a.topk_sweep) if not done(kind, path)]
    run_steps(todo, "cache-study", tpath, a.dry_run)
    if a.dry_run:
        return None
    t = tables(a.k, read_json(tpath).get("runs", {}) if os.path.isfile(tpath) else {}, a.topk_sweep)
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "tables.json"), t)
    write_text(os.path.join(a.out, "table.md"), markdown(t))
    print(markdown(t))
    vs = variants(a.k, a.topk_sweep)
    students = [f"{OUT}/{v}-s{s}" for v in vs for s in SEEDS if finished(f"{OUT}/{v}-s{s}")]
    if any(v != "baseline" for v in vs if finished(f"{OUT}/{v}-s{SEEDS[0]}")):
        report.main([*students, "--out", a.out, "--by", "teacher_cache", "--by", "teacher_cache_mode", "--by",
                     "teacher_cache_k"])
    return t


if __name__ == "__main__":
    cli(main)
