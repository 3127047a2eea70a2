"""Does the weak-teacher verdict flip as the student nears convergence? (issue 21; docs/results/tpp-sweep.md)

    python scripts/tpp_sweep.py                  # every run not finished yet (resumable), then the report
    python scripts/tpp_sweep.py --report-only    # the report from what has finished
    python scripts/tpp_sweep.py --dry-run        # the plan (a weak teacher's budget shows once its probes ran)
    python scripts/tpp_sweep.py --seeds 43,44,45 --regimes r1,r3   # a third seed where effects are within 2 s.e.

The mini grid (scripts/mini_grid.py) runs its student at 0.17 tokens per parameter; the study at about 30. Here the
student is made smaller (the `micro` preset, 336,192 parameters with embeddings at vocab 2048) and trained at 1, 3
and 10 tokens per parameter; everything else is the mini grid's (configs/mini/*.yaml: data, batch 16 x 128, lr,
schedule, evaluation). The 0.17 regime *is* the mini grid: its runs are reused (run scripts/mini_grid.py first).

Per regime (T tokens):
  * base-s<seed>: the alpha = 0 baseline (token-matched).
  * t-weak: the student's own architecture trained on fewer tokens (seed 42), placed at about +0.17 nats of held-out
    loss against base-s43, as the study's 0.7B / 30B teacher stands against its student: two probes at T/2 and T/4,
    then log-linear interpolation in tokens (calibration.json keeps the probes, the budget and the gap reached; a
    probe within 0.03 nats of the target is used as it is). Same architecture: only the teacher's strength varies.
  * t-strong: `tiny-teacher` (596,448 parameters, 1.8x the student) on the same T tokens (seed 42).
  * <teacher>-a<alpha>-s<seed>: the distilled students; cm-<teacher>-s<seed>: alpha = 0 at the FLOPs of the alpha
    0.2 run (student training + teacher forward, distillery/flops.py), the compute-matched baseline.
  * gap-<teacher>-s<seed> (regimes in CONTROLLER_REGIMES): alpha_controller=gap with ceiling 0.5 (issue 21 part 2).
The grid's own teachers get the controller too (runs/mini-ctrl/), so it is measured on five teachers.
Then every student's export is scored with `python -m eval.ppl --entropy` (as mini_grid.py does), each regime gets an
`eval.report` (docs/results/tpp-sweep/<regime>/), and the summary table and plots go to docs/results/tpp-sweep/.
runs/sweep/timing.json keeps each run's wall time.
"""
import math
import os

import steps
from mini_grid import SEEDS as GRID_SEEDS, TEACHERS as GRID_TEACHERS, finished as grid_finished, text_entropies

from distillery.atomic import read_json, write_json, write_text
from distillery.errors import cli

OUT = "runs/sweep"
STUDENT, PARAMS = "micro", 336_192          # parameters with embeddings (74,048 without) at vocab 2048
STRONG = "tiny-teacher"
TOKENS_PER_STEP = 16 * 128                  # configs/mini/student.yaml: global batch x row length
REGIMES = {"r1": 1, "r3": 3, "r10": 10}     # tokens per parameter
WEAK_GAP, WEAK_TOL = 0.17, 0.03             # nats of held-out loss above the regime's seed-43 baseline
ALPHAS = (0.2, 0.5)
SEEDS = (43, 44)
CONTROLLER_REGIMES = ("r3", "r10")
CONTROLLER = ["alpha=0.5", "alpha_controller=gap"]  # the gap controller's defaults: every 10, scale 0.5, ema 0.5
STUDENT_CFG, TEACHER_CFG = "configs/mini/student.yaml", "configs/mini/teacher.yaml"


def tokens(regime):
    """The regime's token budget in whole optimizer steps."""
    return round(REGIMES[regime] * PARAMS / TOKENS_PER_STEP) * TOKENS_PER_STEP


def heldout_ce(name):
    return read_json(os.path.join("runs", name, "eval", "final.json"))["ppl"]["heldout"]["ce"]


def weak_budget(regime):
    """(tokens, probe run name or None) of the regime's weak teacher, or None while its probes are unfinished.
    Writes runs/sweep/<regime>/calibration.json."""
    t, base = tokens(regime), f"sweep/{regime}/base-s43"
    probes = {t // 2 // TOKENS_PER_STEP * TOKENS_PER_STEP: f"sweep/{regime}/probe-half",
              t // 4 // TOKENS_PER_STEP * TOKENS_PER_STEP: f"sweep/{regime}/probe-quarter"}
    if not all(steps.finished(os.path.join("runs", n)) for n in [base, *probes.values()]):
        return None
    ref = heldout_ce(base)
    gaps = {d: heldout_ce(n) - ref for d, n in probes.items()}
    close = [d for d, g in gaps.items() if abs(g - WEAK_GAP) <= WEAK_TOL]
    if close:
        d, probe = close[0], probes[close[0]]
    else:
        d, probe = interpolate({**gaps, t: 0.0}, t), None
    write_json(os.path.join(OUT, regime, "calibration.json"),
               {"baseline": base, "baseline_heldout_ce": ref, "target_gap": WEAK_GAP,
                "probes": {str(k): {"run": probes[k], "gap": g} for k, g in gaps.items()},
                "weak_tokens": d, "weak_run": probe or f"sweep/{regime}/t-weak"})
    return d, probe


def interpolate(points, t):
    """The token budget at which the gap is WEAK_GAP, from {tokens: gap} points: gap = a + b ln D through the two
    points that bracket the target (the student's own architecture at T tokens is the baseline itself, gap 0, so
    (T, 0) is one of the points; loss is not log-linear over a 4x range of budgets, hence the bracketing pair rather
    than a fit through all); extrapolated from the two smallest budgets when every gap is below the target. In
    whole steps, within [T/8, T]."""
    pts = sorted(points.items())                       # increasing tokens, decreasing gap
    pair = next(((p, q) for p, q in zip(pts, pts[1:]) if p[1] >= WEAK_GAP >= q[1]), pts[:2])
    (d1, g1), (d2, g2) = pair
    b = (g2 - g1) / math.log(d2 / d1)
    d = math.exp(math.log(d1) + (WEAK_GAP - g1) / b) if b < 0 else t
    return int(min(max(d, t / 8), t)) // TOKENS_PER_STEP * TOKENS_PER_STEP


def teacher_dirs(regime, weak):
    """{"weak": export dir, "strong": export dir} (weak: the probe used, or t-weak)."""
    w = weak[1] or f"sweep/{regime}/t-weak"
    return {"weak": f"runs/{w}/export", "strong": f"runs/sweep/{regime}/t-strong/export"}


def plan(regime, seeds, alphas):
    """[(run name, config, overrides)] of a regime in dependency order, as far as it is known now (the weak teacher's
    budget needs its probes; the distilled runs need their teachers)."""
    t, r = tokens(regime), f"sweep/{regime}"
    s43 = [(f"{r}/base-s43", STUDENT_CFG, [f"student={STUDENT}", f"train_tokens={t}", "alpha=0", "seed=43"])]
    probes = [(f"{r}/probe-half", TEACHER_CFG, [f"student={STUDENT}", f"train_tokens={t // 2 // TOKENS_PER_STEP * TOKENS_PER_STEP}"]),
              (f"{r}/probe-quarter", TEACHER_CFG, [f"student={STUDENT}", f"train_tokens={t // 4 // TOKENS_PER_STEP * TOKENS_PER_STEP}"])]
    runs = s43 + probes + [(f"{r}/t-strong", TEACHER_CFG, [f"student={STRONG}", f"train_tokens={t}"])]
    runs += [(f"{r}/base-s{s}", STUDENT_CFG, [f"student={STUDENT}", f"train_tokens={t}", "alpha=0", f"seed={s}"])
             for s in seeds if s != 43]
    weak = weak_budget(regime)
    if weak is None:
        return runs, False
    if weak[1] is None:
        runs.append((f"{r}/t-weak", TEACHER_CFG, [f"student={STUDENT}", f"train_tokens={weak[0]}"]))
    student = [f"student={STUDENT}", f"train_tokens={t}"]
    for kind, tdir in teacher_dirs(regime, weak).items():
        for a in alphas:
            runs += [(f"{r}/{kind}-a{a}-s{s}", STUDENT_CFG, student + [f"alpha={a}", f"seed={s}", f"teacher={tdir}"])
                     for s in seeds]
        runs += [(f"{r}/cm-{kind}-s{s}", STUDENT_CFG, student + ["alpha=0", f"seed={s}",
                                                                 f"compute_match=runs/{r}/{kind}-a{alphas[0]}-s{s}"])
                 for s in seeds]
        if regime in CONTROLLER_REGIMES:
            runs += [(f"{r}/gap-{kind}-s{s}", STUDENT_CFG, student + CONTROLLER + [f"seed={s}", f"teacher={tdir}"])
                     for s in seeds]
    return runs, True


def grid_controller_plan(seeds):
    """The gap controller on the mini grid's three teachers (its student, budget and seeds: those of `seeds` the
    grid has baselines for)."""
    return [(f"mini-ctrl/gap-{t}-s{s}", STUDENT_CFG, CONTROLLER + [f"seed={s}", f"teacher=runs/mini/{t}/export"])
            for t in GRID_TEACHERS for s in seeds if s in GRID_SEEDS]


def run_all(a):
    """Regime by regime, cheapest first; a regime's plan grows once its probes have run. Finished runs are skipped."""
    timing = os.path.join(OUT, "timing.json")
    missing = [t for t in GRID_TEACHERS if not grid_finished(f"mini/{t}")]
    if missing:
        raise SystemExit(f"error: the mini grid's teachers ({', '.join(missing)}) are not trained; run "
                         f"python scripts/mini_grid.py first (the 0.17 regime is its runs)")
    todo = [(n, f"{n}: {' '.join(o)}", steps.train_cmd(c, o, n)) for n, c, o in grid_controller_plan(a.seeds)
            if not steps.finished(os.path.join("runs", n))]
    steps.run_steps(todo, "sweep mini-ctrl", timing, a.dry_run)
    for regime in a.regimes:
        while True:
            runs, complete = plan(regime, a.seeds, a.alphas)
            todo = [(n, f"{n}: {' '.join(o)}", steps.train_cmd(c, o, n)) for n, c, o in runs
                    if not steps.finished(os.path.join("runs", n))]
            steps.run_steps(todo, f"sweep {regime}", timing, a.dry_run)
            if complete or a.dry_run:
                break
        if not a.dry_run:
            text_entropies([n for n, _, o in runs if "/t-" not in n and "/probe-" not in n])
    if not a.dry_run:
        text_entropies([n for n, _, _ in grid_controller_plan(a.seeds)])


# ---------------------------------------------------------------------------- report
def regime_runs(regime):
    """Student run dirs of a regime for eval.report (finished ones only)."""
    if regime == "r0.17":
        names = [f"mini/{n}" for n in sorted(os.listdir("runs/mini")) if n not in GRID_TEACHERS] \
            if os.path.isdir("runs/mini") else []
        names += [f"mini-ctrl/{n}" for n in sorted(os.listdir("runs/mini-ctrl"))] \
            if os.path.isdir("runs/mini-ctrl") else []
    else:
        d = os.path.join(OUT, regime)
        names = [f"sweep/{regime}/{n}" for n in sorted(os.listdir(d)) if not n.startswith(("t-", "probe-"))
                 and os.path.isdir(os.path.join(d, n))] if os.path.isdir(d) else []
    return [os.path.join("runs", n) for n in names if steps.finished(os.path.join("runs", n))]


def kind_of(teacher, regime):
    """weak / strong / weak2 for a teacher path of a regime (the grid: t-small-under, t-small-well, t-large-under)."""
    if regime == "r0.17":
        return {"t-small-under": "weak", "t-small-well": "strong", "t-large-under": "weak (student-sized, +0.40)"}.get(
            teacher.split("/")[-2], teacher)
    return "strong" if "/t-strong/" in teacher else "weak"


def teacher_gaps(regime):
    """{kind: held-out loss of the teacher - the seed-43 baseline's} (nats)."""
    if regime == "r0.17":
        base = heldout_ce("mini/base-s43")
        return {kind_of(f"runs/mini/{t}/export", regime): heldout_ce(f"mini/{t}") - base for t in GRID_TEACHERS}
    cal = os.path.join(OUT, regime, "calibration.json")
    out = {}
    if os.path.isfile(cal):
        c = read_json(cal)
        if steps.finished(os.path.join("runs", c["weak_run"])):
            out["weak"] = heldout_ce(c["weak_run"]) - c["baseline_heldout_ce"]
        strong = f"sweep/{regime}/t-strong"
        if steps.finished(os.path.join("runs", strong)):
            out["strong"] = heldout_ce(strong) - c["baseline_heldout_ce"]
    return out


def summarize(out):
    """Per regime: an eval.report (by alpha_controller), then one table over regimes and the plots."""
    from eval import report
    rows, controller = [], []
    regimes = {"r0.17": {"tpp": 400_000 / 2_410_176, "student": "tiny-student", "params": 2_410_176,
                         "tokens": 400_000}}
    regimes.update({r: {"tpp": tokens(r) / PARAMS, "student": STUDENT, "params": PARAMS, "tokens": tokens(r)}
                    for r in REGIMES})
    for regime, info in regimes.items():
        dirs = regime_runs(regime)
        if not any(report.load_run(d)["role"] == "distilled" for d in dirs):
            continue
        summ = report.build_report(dirs, os.path.join(out, regime), by=("alpha_controller",))
        info["gaps"] = teacher_gaps(regime)
        controller += controller_rows(regime, summ)
        ent = {e["group"]: e for e in summ["entropy"]}
        for r in summ["rows"]:
            if r["eval_set"] not in ("heldout", report.OOD):
                continue
            ctrl = r["by"].get("alpha_controller") or ""
            rows.append({"regime": regime, "tpp": info["tpp"], "teacher": kind_of(r["teacher"], regime),
                         "alpha": f"gap (ceiling {r['alpha']})" if ctrl else r["alpha"], "reference": r["reference"],
                         "eval_set": r["eval_set"], "mean": r["ppl_change_pct_mean"], "se": r["ppl_change_pct_se"],
                         "n": r["n"], "entropy": ent.get(r["group"], {}).get("entropy_change_mean"),
                         "entropy_se": ent.get(r["group"], {}).get("entropy_change_se")})
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "summary.json"), {"regimes": regimes, "rows": rows})
    write_json(os.path.join(out, "controller.json"), controller)
    write_text(os.path.join(out, "summary.md"), markdown(regimes, rows) + controller_markdown(controller))
    plot(rows, os.path.join(out, "gain_vs_tpp.png"))
    plot_controller(os.path.join(out, "controller_alpha.png"))
    return rows


def _ood_change(a, b):
    """PPL change % of run a against run b, mean over the out-of-domain sets (negative: a is better)."""
    sets = sorted(k for k in a["ppl"] if k != "heldout")
    return sum((a["ppl"][k] / b["ppl"][k] - 1) * 100 for k in sets) / len(sets)


def controller_rows(regime, summ):
    """Per teacher given the gap controller, from a regime's eval.report summary (its runs and its token-matched
    pairing): the controller's OOD-mean PPL change against alpha = 0 and against the teacher's best fixed alpha
    (lowest mean OOD change vs alpha = 0, known only after the fact), each paired by seed (mean ± s.e.), with the
    issue's two tests: within one s.e. of the best fixed alpha (or better), and not worse than alpha = 0 beyond noise
    (mean - 2 s.e. <= 0)."""
    from eval.report import mean_se
    base, by = summ["token_ref"], {}
    for r in summ["runs"]:
        if r["role"] == "distilled" and r["dir"] in base:
            key = "gap" if r["cfg"].get("alpha_controller") else r["alpha"]
            by.setdefault(kind_of(r["teacher"], regime), {}).setdefault(key, {})[r["seed"]] = r
    out = []
    for teacher, arms in sorted(by.items()):
        if "gap" not in arms:
            continue
        seeds = sorted(arms["gap"])
        fixed = {a: mean_se([_ood_change(r, base[r["dir"]]) for r in runs.values()])
                 for a, runs in arms.items() if a != "gap"}
        best = min(fixed, key=lambda a: fixed[a][0])
        vs0 = mean_se([_ood_change(arms["gap"][s], base[arms["gap"][s]["dir"]]) for s in seeds])
        vsb = mean_se([_ood_change(arms["gap"][s], arms[best][s]) for s in seeds if s in arms[best]])
        out.append({"regime": regime, "teacher": teacher, "seeds": seeds, "best_alpha": best,
                    "best_vs_alpha0": fixed[best], "gap_vs_alpha0": vs0, "gap_vs_best": vsb,
                    "within_1se_of_best": bool(vsb[0] <= 0 or vsb[0] <= vsb[1]),
                    "not_worse_than_alpha0": bool(vs0[0] - 2 * vs0[1] <= 0)})
    return out


def controller_markdown(rows):
    if not rows:
        return ""
    lines = ["", "The gap controller (ceiling 0.5) against each teacher's best fixed alpha (chosen after the fact) and "
             "alpha = 0: OOD-mean PPL change %, paired by seed, mean ± s.e.:", "",
             "| regime | teacher | seeds | best fixed alpha: vs alpha = 0 | controller: vs alpha = 0 | "
             "controller vs best fixed | within 1 s.e. of best | not worse than alpha = 0 (2 s.e.) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['teacher']} | {len(r['seeds'])} | {r['best_alpha']}: "
                     f"{_pm(*r['best_vs_alpha0'])} | {_pm(*r['gap_vs_alpha0'])} | {_pm(*r['gap_vs_best'])} | "
                     f"{'yes' if r['within_1se_of_best'] else 'no'} | {'yes' if r['not_worse_than_alpha0'] else 'no'} |")
    return "\n".join(lines) + "\n"


def controller_runs():
    """{label: run dir} of every finished gap-controller run (grid teachers and sweep regimes)."""
    out = {}
    for root in ("runs/mini-ctrl", *(os.path.join(OUT, r) for r in REGIMES)):
        if not os.path.isdir(root):
            continue
        for n in sorted(os.listdir(root)):
            d = os.path.join(root, n)
            if "gap-" in n and steps.finished(d):
                regime = "r0.17" if root.endswith("mini-ctrl") else os.path.basename(root)
                out[f"{regime} {n.replace('gap-', '')}"] = d
    return out


def plot_controller(path):
    """The alpha the gap controller chose (and the gap it measured) over each run, x = fraction of the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from distillery.atomic import read_jsonl
    runs = controller_runs()
    if not runs:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    teachers = list(dict.fromkeys(label.rsplit("-s", 1)[0] for label in runs))              # one colour each
    for label, d in runs.items():
        recs = [r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if "alpha" in r]
        last = recs[-1]["step"]
        x = [r["step"] / last for r in recs]
        teacher, seed = label.rsplit("-s", 1)
        style = dict(color=f"C{teachers.index(teacher)}", ls={"43": "-", "44": ":"}.get(seed, "--"))
        ax.plot(x, [r["alpha"] for r in recs], label=teacher if seed == "43" else None, **style)
        bx.plot(x, [r.get("alpha/gap", float("nan")) for r in recs], **style)
    ax.set_xlabel("fraction of the run")
    ax.set_ylabel("alpha chosen (ceiling 0.5)")
    bx.set_xlabel("fraction of the run")
    bx.set_ylabel("gap = student CE - teacher CE (nats, EMA)")
    bx.axhline(0, color="k", lw=0.5)
    ax.legend(title="teacher (seed 43 solid, 44 dotted, 45 dashed)", fontsize=7, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(m, se):
    if m is None:
        return ""
    return f"{m:+.2f}" + ("" if se is None or (isinstance(se, float) and math.isnan(se)) else f" ± {se:.2f}")


def markdown(regimes, rows):
    lines = ["| regime | student, tokens | tokens / param | teacher gaps reached (nats, vs base-s43) |", "|---|---|---|---|"]
    for r, i in regimes.items():
        gaps = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(i.get("gaps", {}).items()))
        lines.append(f"| {r} | {i['student']} ({i['params']:,}), {i['tokens']:,} | {i['tpp']:.2f} | {gaps} |")
    lines += ["", "PPL change % (mean ± s.e. over seeds, paired by seed; negative = the distilled student is better); "
              "entropy change in nats on held-out text (student - token-matched baseline):", "",
              "| regime | teacher | alpha | n | vs token-matched: heldout | OOD mean | vs compute-matched: heldout | "
              "OOD mean | entropy change |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["regime"], r["teacher"], str(r["alpha"])) for r in rows},
                  key=lambda k: (regimes[k[0]]["tpp"], k[1], k[2]))
    for k in keys:
        cell = {(r["reference"], r["eval_set"]): r for r in rows if (r["regime"], r["teacher"], str(r["alpha"])) == k}
        get = lambda ref, s: _pm(cell[(ref, s)]["mean"], cell[(ref, s)]["se"]) if (ref, s) in cell else ""  # noqa
        any_row = next(iter(cell.values()))
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {any_row['n']} | {get('token', 'heldout')} | "
                     f"{get('token', 'ood_mean')} | {get('compute', 'heldout')} | {get('compute', 'ood_mean')} | "
                     f"{_pm(any_row['entropy'], any_row['entropy_se'])} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """KD gain (PPL change %, alpha 0.2) against tokens per parameter, weak and strong teacher: one row of panels per
    baseline (token-matched, compute-matched), one column per eval set (held-out, OOD mean). r0.17 (the mini grid's
    student and teachers) is drawn hollow: another student, and its weak teacher is a smaller model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for i, ref in enumerate(("token", "compute")):
        for j, s in enumerate(("heldout", "ood_mean")):
            ax = axes[i][j]
            for kind, color in (("weak", "C3"), ("strong", "C0")):
                pts = sorted((r["tpp"], r["mean"], 0 if r["se"] is None or math.isnan(r["se"]) else r["se"])
                             for r in rows if r["teacher"] == kind and r["reference"] == ref and r["alpha"] == 0.2
                             and r["eval_set"] == s)
                if not pts:
                    continue
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, color=color, capsize=3, label=f"{kind} teacher")
                for hollow in (False, True):
                    xy = [(p, v) for p, v in zip(x, y) if (p < 0.5) == hollow]
                    if xy:
                        ax.plot(*zip(*xy), "o", color=color, mfc="white" if hollow else color)
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xscale("log")
            ax.set_title(f"{'held-out' if s == 'heldout' else 'out-of-domain mean'}, vs {ref}-matched baseline",
                         fontsize=10)
            ax.set_ylabel("PPL change % (alpha 0.2; < 0: KD helps)")
            if i == 1:
                ax.set_xlabel("student tokens per parameter (hollow: the mini grid's student)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = steps.parser(__doc__, "docs/results/tpp-sweep")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated student seeds")
    ap.add_argument("--alphas", default=",".join(map(str, ALPHAS)), help="comma-separated; the first is the one "
                    "compute-matched")
    ap.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated, of " + ", ".join(REGIMES))
    a = ap.parse_args(argv)
    a.regimes = [r for r in a.regimes.split(",") if r]
    unknown = [r for r in a.regimes if r not in REGIMES]
    if unknown:
        raise SystemExit(f"error: unknown regime(s) {', '.join(unknown)}; known: {', '.join(REGIMES)}")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.alphas = [float(x) for x in a.alphas.split(",")]
    steps.prepare(a)
    if not a.report_only:
        run_all(a)
    if a.dry_run:
        return None
    return summarize(a.out)


if __name__ == "__main__":
    cli(main)
