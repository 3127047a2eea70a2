"""The study's main grid in miniature, on CPU, offline (issue 12; docs/results/mini-grid.md says why these sizes).

    python scripts/mini_grid.py                  # every run not finished yet (41 min on 2 cores), then the report
    python scripts/mini_grid.py --report-only    # just the report from what has finished
    python scripts/mini_grid.py --dry-run        # the commands, nothing run

Three teachers trained by this trainer (alpha = 0, seed 42), placed against the student's alpha = 0 baseline the way
the study's teachers stand against its 1.7B / 50B student (Chinchilla's fit, Hoffmann et al. 2022: 0.7B/30B is
~0.17 nats worse, 1.7B/30B ~0.06 worse, 0.7B/300B ~0.06 better): a small under-trained one, the same small model
trained longer, and one of the student's size with fewer tokens. Then for seeds 43 and 44: the alpha = 0 baseline,
the student distilled from each teacher at alpha 0.2 and 0.5, and for each teacher a compute-matched baseline
(alpha = 0 with compute_match= the alpha 0.2 run: the same FLOPs, student training + teacher forward). Finished runs
(an export/ exists) are skipped, so the command resumes. Then every student's export is scored on the run's eval
windows with `python -m eval.ppl --entropy` (<run>/eval/ppl.json: the mean predictive entropy on fixed text, the
paper's entropy analysis; its PPL must equal the in-loop final eval's) and `python -m eval.report` writes
docs/results/mini-grid/. runs/mini/timing.json keeps each run's wall time (merged over invocations).
"""
import os

import steps
import yaml

from distillery.atomic import read_json
from distillery.errors import cli

# name: (preset, tokens, the study's teacher it stands for)
TEACHERS = {
    "t-small-under": ("tiny-teacher", 260_000, "0.7B / 30B: small, under-trained (target gap +0.17 nats)"),
    "t-small-well": ("tiny-teacher", 1_200_000, "0.7B / 300B: the same small model trained 4.6x longer"),
    "t-large-under": ("tiny-student", 240_000, "1.7B / 30B: the student's size, 0.6x its tokens (target +0.06)"),
}
ALPHAS = (0.2, 0.5)
SEEDS = (43, 44)
OUT = "runs/mini"


def plan():
    """[(run name, config, overrides)] in dependency order: teachers, baselines, then per teacher its distilled runs
    and its compute-matched baselines (so a partial grid holds complete comparisons for the first teachers)."""
    runs = [(f"mini/{t}", "configs/mini/teacher.yaml", [f"student={p}", f"train_tokens={n}"])
            for t, (p, n, _) in TEACHERS.items()]
    for s in SEEDS:
        runs.append((f"mini/base-s{s}", "configs/mini/student.yaml", ["alpha=0", f"seed={s}"]))
    for t in TEACHERS:
        for a in ALPHAS:
            for s in SEEDS:
                runs.append((f"mini/{t}-a{a}-s{s}", "configs/mini/student.yaml",
                             [f"alpha={a}", f"seed={s}", f"teacher={OUT}/{t}/export"]))
        for s in SEEDS:
            runs.append((f"mini/cm-{t}-s{s}", "configs/mini/student.yaml",
                         ["alpha=0", f"seed={s}", f"compute_match={OUT}/{t}-a{ALPHAS[0]}-s{s}"]))
    return runs


def finished(name):
    return steps.finished(os.path.join("runs", name))


def main(argv=None):
    a = steps.parser(__doc__, "docs/results/mini-grid").parse_args(argv)
    steps.prepare(a)
    todo = [] if a.report_only else [(name, f"{name}: {' '.join(over)}", steps.train_cmd(config, over, name))
                                     for name, config, over in plan() if not finished(name)]
    steps.run_steps(todo, "mini", os.path.join(OUT, "timing.json"), a.dry_run)
    if a.dry_run:
        return None
    if not a.report_only:
        text_entropies([n for n, _, _ in plan() if n not in {f"mini/{t}" for t in TEACHERS}])
    from eval import report
    return report.main([OUT, "--out", a.out])


def text_entropies(names):
    """<run>/eval/ppl.json for each finished student: eval.ppl --entropy on the run's own eval windows and sets, and
    a check that its PPL reproduces the in-loop final eval from the export (the same windows, fp32)."""
    from eval import ppl
    for name in names:
        d = os.path.join("runs", name)
        out = os.path.join(d, "eval", "ppl.json")
        if os.path.isfile(out) or not finished(name):
            continue
        with open(os.path.join(d, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        res = ppl.main(["--model", d, "--data", cfg["data"], "--sets", "all", "--window", str(cfg["eval_window"]),
                        "--max_windows", str(cfg["eval_max_windows"]), "--entropy", "--device", "cpu", "--out", out])
        final = read_json(os.path.join(d, "eval", "final.json"))["ppl"]
        for s, r in res["sets"].items():
            if abs(r["ce"] - final[s]["ce"]) > 1e-4:
                raise SystemExit(f"error: {name} {s}: export CE {r['ce']:.6f} != in-loop final {final[s]['ce']:.6f}")


if __name__ == "__main__":
    cli(main)
