"""Grid x seeds sweep with error bars: run every point of a grid for several seeds, then compare with a reference.

    python scripts/sweep.py --name alpha-sweep --grid alpha=0,0.2,0.5 --seeds 43,44,45 \
        -- --ds_config ds_configs/cpu.json --config configs/offline/student_kd.yaml [key=value ...]
    python scripts/sweep.py --name alpha-sweep --grid alpha=0,0.2,0.5 --seeds 43,44,45 --summarize-only

Each run is `<launcher> train.py <args after --> <grid overrides> seed=<s> name=<sweep>/<point>-s<seed>` with
out_dir=runs; finished runs (distillery.runlog.finished) are skipped, so a sweep can be resumed or extended. The seed
moves the initialisation and the data order together (the paper's students differ from their teachers that way).

The summary pairs every grid point with the reference point (default: the first value of the first grid key, e.g.
alpha=0, the baseline) *seed by seed*: PPL change % = (ppl - ppl_ref) / ppl_ref x 100 per seed, reported as mean
+- standard error over seeds (sample std / sqrt(n)). Pairing removes the seed-to-seed spread both runs share, which
is what makes small distillation gains visible. Output: a table, runs/<sweep>/summary.json, and a plot with error bars.
"""
import argparse
import itertools
import math
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distillery import atomic, runlog  # noqa: E402
from distillery.errors import cli  # noqa: E402
from distillery.launch import free_port  # noqa: E402
from eval.report import mean_se  # noqa: E402  (mean and standard error over seeds)


def points(grid):
    """[('alpha', ['0', '0.2'])...] -> [{'alpha': '0'}, {'alpha': '0.2'}] (cartesian product, in order)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, vals)) for vals in itertools.product(*[v for _, v in grid])]


def label(point):
    return ",".join(f"{k}={v}" for k, v in point.items())


def run_name(sweep, point, seed):
    return f"{sweep}/" + "-".join(f"{k}{v}" for k, v in point.items()) + f"-s{seed}"


def final_losses(run_dir):
    """Last evaluation of a run: {set: loss}, or None if it has not finished (runlog.finished: its schedule)."""
    if not os.path.isfile(runlog.metrics_path(run_dir)) or runlog.finished(run_dir)[0] is None:
        return None
    return runlog.final_losses(run_dir)


def summarize(sweep, pts, seeds, out_dir="runs"):
    ref = pts[0]
    table = {}
    for p in pts:
        per_set = {}
        for s in seeds:
            cur = final_losses(os.path.join(out_dir, run_name(sweep, p, s)))
            base = final_losses(os.path.join(out_dir, run_name(sweep, ref, s)))
            if cur is None or base is None:
                continue
            for name, loss in cur.items():
                d = per_set.setdefault(name, {"loss": [], "ppl_change_pct": []})
                d["loss"].append(loss)
                d["ppl_change_pct"].append(100 * (math.exp(loss) - math.exp(base[name])) / math.exp(base[name]))
        table[label(p)] = {name: {"n": len(d["loss"]), "loss_mean_se": mean_se(d["loss"]),
                                  "ppl_change_pct_mean_se": mean_se(d["ppl_change_pct"])}
                           for name, d in per_set.items()}
    return {"sweep": sweep, "reference": label(ref), "seeds": seeds, "points": table}


def print_table(summary):
    sets = sorted({s for v in summary["points"].values() for s in v})
    print(f"\nsweep {summary['sweep']}: PPL change % vs {summary['reference']} (paired by seed), "
          f"mean +- s.e. over seeds {summary['seeds']}")
    print(f"{'point':<28}" + "".join(f"{s:>22}" for s in sets))
    for point, per_set in summary["points"].items():
        cells = []
        for s in sets:
            if s not in per_set:
                cells.append(f"{'-':>22}")
                continue
            m, se = per_set[s]["ppl_change_pct_mean_se"]
            cells.append(f"{m:>+10.2f} +- {se:<5.2f} (n={per_set[s]['n']})")
        print(f"{point:<28}" + "".join(f"{c:>22}" for c in cells))
    print()


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = sorted({s for v in summary["points"].values() for s in v})
    pts = list(summary["points"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sets) * len(pts) / 2), 4))
    width = 0.8 / max(len(pts), 1)
    for i, p in enumerate(pts):
        ys = [summary["points"][p].get(s, {}).get("ppl_change_pct_mean_se", (float("nan"),) * 2) for s in sets]
        ax.bar([j + i * width for j in range(len(sets))], [y[0] for y in ys], width,
               yerr=[0 if math.isnan(y[1]) else y[1] for y in ys], capsize=3, label=p)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks([j + width * (len(pts) - 1) / 2 for j in range(len(sets))], sets)
    ax.set(ylabel=f"PPL change % vs {summary['reference']}", title=f"{summary['sweep']} (mean +- s.e. over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="sweep name: runs go to runs/<name>/<point>-s<seed>")
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable; cartesian product)")
    ap.add_argument("--seeds", default="43", help="comma-separated seeds")
    ap.add_argument("--launcher", default="deepspeed", help="e.g. 'deepspeed --num_gpus 8' or 'python'")
    ap.add_argument("--summarize-only", action="store_true")
    a = ap.parse_args(own)
    grid = []
    for g in a.grid:
        if "=" not in g:
            raise SystemExit(f"error: --grid {g!r} is not key=v1,v2 (e.g. --grid alpha=0,0.2,0.5)")
        k, vs = g.split("=", 1)
        grid.append((k, vs.split(",")))
    if not grid:
        raise SystemExit("error: give at least one --grid key=v1,v2,...")
    seeds = [int(s) for s in a.seeds.split(",")]
    pts = points(grid)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not a.summarize_only:
        todo = [(p, s) for p in pts for s in seeds if final_losses(os.path.join("runs", run_name(a.name, p, s))) is None]
        for i, (p, s) in enumerate(todo):
            launcher = shlex.split(a.launcher)
            if os.path.basename(launcher[0]) == "deepspeed" and "--master_port" not in launcher:
                launcher += ["--master_port", str(free_port())]  # runs beside other jobs on one machine
            cmd = [*launcher, os.path.join(repo, "train.py"), *train_args,
                   *[f"{k}={v}" for k, v in p.items()], f"seed={s}", f"name={run_name(a.name, p, s)}", "out_dir=runs"]
            print(f"[sweep {i + 1}/{len(todo)}] {label(p)} seed={s}", flush=True)
            r = subprocess.run(cmd)
            if r.returncode != 0:
                raise SystemExit(f"error: run {run_name(a.name, p, s)} failed (exit {r.returncode}); fix it and rerun "
                                 f"the same command: finished runs are skipped")
    summary = summarize(a.name, pts, seeds)
    print_table(summary)
    os.makedirs(os.path.join("runs", a.name), exist_ok=True)
    out = os.path.join("runs", a.name, "summary.json")
    atomic.write_json(out, summary)
    plot(summary, os.path.join("runs", a.name, "summary.png"))
    print(f"summary: {out} and summary.png")
    return summary


if __name__ == "__main__":
    cli(main)
