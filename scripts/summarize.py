"""Baseline vs distilled: final held-out loss / perplexity per eval set, as a table (and optionally a plot).

    python scripts/summarize.py runs/<baseline> runs/<distilled> [runs/<more> ...] [--plot out.png]

The first run is the reference; PPL change % = (ppl - ppl_baseline) / ppl_baseline x 100 (paper_setup.md).
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distillery import runlog  # noqa: E402
from distillery.errors import cli  # noqa: E402


def final_eval(run_dir):
    """({eval set: final loss}, [(tokens seen, train CE)])."""
    train, _ = runlog.read_metrics(run_dir)
    return runlog.final_losses(run_dir), [(r["tokens/seen"], r["loss/ce"]) for _, r in sorted(train.items())]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--plot", default=None)
    a = ap.parse_args(argv)
    results = {r: final_eval(r) for r in a.runs}
    base = results[a.runs[0]][0]
    names = [os.path.basename(r.rstrip("/")) for r in a.runs]
    print(f"\n{'eval set':<14}" + "".join(f"{n[-24:]:>26}" for n in names) + "   PPL change vs first")
    for s in base:
        cells, changes = [], []
        for r in a.runs:
            loss = results[r][0].get(s, float("nan"))
            cells.append(f"{loss:>10.4f} (ppl {math.exp(loss):>7.2f})")
            changes.append(100 * (math.exp(loss) - math.exp(base[s])) / math.exp(base[s]))
        print(f"{s:<14}" + "".join(f"{c:>26}" for c in cells) + "   " +
              " ".join(f"{c:+.2f}%" for c in changes[1:]))
    print("(loss = mean token cross-entropy in nats on non-overlapping windows; lower is better)\n")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for r, n in zip(a.runs, names):
            xs, ys = zip(*results[r][1]) if results[r][1] else ((), ())
            ax1.plot(xs, ys, label=n)
        ax1.set(xlabel="tokens seen", ylabel="train CE (nats)", title="training loss")
        ax1.legend()
        width = 0.8 / max(len(a.runs) - 1, 1)
        for i, (r, n) in enumerate(zip(a.runs[1:], names[1:])):
            ch = [100 * (math.exp(results[r][0][s]) - math.exp(base[s])) / math.exp(base[s]) for s in base]
            ax2.bar([j + i * width for j in range(len(base))], ch, width, label=n)
        ax2.axhline(0, color="k", lw=0.5)
        ax2.set_xticks(range(len(base)), list(base))
        ax2.set(ylabel=f"PPL change % vs {names[0]}", title="held-out perplexity")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    cli(main)
