"""The paper's logit analysis: a student, its alpha = 0 baseline and its teacher on one token set.

Protocol (paper_setup.md, "Entropy analysis"): non-overlapping windows (default 200 x 2048 tokens, the paper's
wikitext-103 setting), every token but the first of a window is a target. Per target token, over the vocabulary shared
by the three models (the smallest vocab; padded embedding rows beyond it are dropped and each distribution is
renormalised, peers_and_pitfalls.md trap 2):
  entropy        H(p) = -sum p log p, nats, for each model; reported as means and student - baseline
  PPL            exp(mean NLL of the true token) per model; change % = (ppl_student - ppl_baseline) / ppl_baseline * 100
  KL both ways   KL(ref || student) and KL(student || ref), ref = teacher and ref = baseline (and baseline vs teacher)
  JS             0.5 KL(ref || m) + 0.5 KL(student || m), m = (p_ref + p_student) / 2
  top-1 agreement  argmax equal; top-5 overlap = |top5(student) & top5(ref)| / 5
  accuracy       argmax == true token, per model
  exclusive      share of tokens where only the teacher (teacher right, baseline wrong) or only the baseline
                 (baseline right, teacher wrong) ranks the true token first, and how often the student is right there
  entropy bins   tokens sorted by baseline entropy and split into `bins` equal-count groups ("hard tokens" = the
                 high-entropy bins); every metric above per bin
All means are token means accumulated in float64.

    python -m eval.logit_analysis --student runs/a02 --baseline runs/a0 --teacher runs/teacher \
        --data data/offline --set ood_english --out analysis.json --plot analysis.png
"""
import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

from eval.ppl import make_windows

PER_TOKEN = ("H_s", "H_b", "H_t", "nll_s", "nll_b", "nll_t", "ok_s", "ok_b", "ok_t")
PAIRS = {"teacher": ("t", "s"), "baseline": ("b", "s"), "baseline_vs_teacher": ("t", "b")}


def _logits_fn(model):
    if callable(model) and not isinstance(model, torch.nn.Module):
        return model
    return lambda x: model(input_ids=x).logits


def _entropy(logp):
    return -(logp.exp() * logp).sum(-1)


def _kl(logp_a, logp_b):
    """KL(a || b) per row."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def _js(logp_a, logp_b):
    logm = torch.logaddexp(logp_a, logp_b) - math.log(2.0)
    return 0.5 * _kl(logp_a, logm) + 0.5 * _kl(logp_b, logm)


def token_stats(s_logits, b_logits, t_logits, y, vocab=None, dtype=torch.float32):
    """Per-token statistics (dict of 1-D float64 numpy arrays) for logits [N, V*] of student, baseline, teacher and
    true tokens y [N]."""
    v = vocab or min(s_logits.shape[-1], b_logits.shape[-1], t_logits.shape[-1])
    lp = {k: F.log_softmax(z[:, :v].to(dtype), -1) for k, z in (("s", s_logits), ("b", b_logits), ("t", t_logits))}
    out = {}
    for k, l in lp.items():
        out[f"H_{k}"] = _entropy(l)
        out[f"nll_{k}"] = -l.gather(-1, y[:, None]).squeeze(-1)
        out[f"ok_{k}"] = (l.argmax(-1) == y).to(dtype)
    top5 = {k: l.topk(5, -1).indices for k, l in lp.items()}
    for name, (r, c) in PAIRS.items():
        out[f"kl_ref_{name}"] = _kl(lp[r], lp[c])
        out[f"kl_rev_{name}"] = _kl(lp[c], lp[r])
        out[f"js_{name}"] = _js(lp[r], lp[c])
        out[f"top1_{name}"] = (lp[r].argmax(-1) == lp[c].argmax(-1)).to(dtype)
        out[f"top5_{name}"] = (top5[r][:, :, None] == top5[c][:, None, :]).any(-1).double().sum(-1) / 5
    return {k: v.double().cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def collect(student, baseline, teacher, tokens, window=2048, max_windows=200, batch_size=1, device="cpu",
            dtype=torch.float32, rows_per_chunk=1024):
    """Per-token statistics over the windows of a token stream (concatenated over windows, in order)."""
    fns = [_logits_fn(m) for m in (student, baseline, teacher)]
    wins = make_windows(tokens, window, max_windows)
    parts = []
    for i in range(0, len(wins), batch_size):
        x = torch.from_numpy(wins[i:i + batch_size]).to(device)
        logits = [f(x)[:, :-1] for f in fns]
        y = x[:, 1:].reshape(-1)
        flat = [z.reshape(-1, z.shape[-1]) for z in logits]
        for a in range(0, len(y), rows_per_chunk):
            parts.append(token_stats(*(z[a:a + rows_per_chunk] for z in flat), y[a:a + rows_per_chunk], dtype=dtype))
    stats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    stats["_windows"] = len(wins)
    return stats


def _ppl(nll):
    return float(math.exp(nll.mean()))


def _block(st, idx=None):
    """Aggregate metrics over the tokens idx (all when None)."""
    g = {k: (v if idx is None else v[idx]) for k, v in st.items() if not k.startswith("_")}
    ppl = {m: _ppl(g[f"nll_{k}"]) for m, k in (("student", "s"), ("baseline", "b"), ("teacher", "t"))}
    only_t = (g["ok_t"] == 1) & (g["ok_b"] == 0)
    only_b = (g["ok_b"] == 1) & (g["ok_t"] == 0)
    out = {
        "tokens": int(len(g["H_s"])),
        "entropy": {"student": g["H_s"].mean(), "baseline": g["H_b"].mean(), "teacher": g["H_t"].mean(),
                    "student_minus_baseline": g["H_s"].mean() - g["H_b"].mean()},
        "ppl": {**ppl, "student_change_pct_vs_baseline": (ppl["student"] - ppl["baseline"]) / ppl["baseline"] * 100},
        "accuracy": {"student": g["ok_s"].mean(), "baseline": g["ok_b"].mean(), "teacher": g["ok_t"].mean()},
        "exclusive": {
            "only_teacher_correct": only_t.mean(), "only_baseline_correct": only_b.mean(),
            "student_correct_when_only_teacher": g["ok_s"][only_t].mean() if only_t.any() else None,
            "student_correct_when_only_baseline": g["ok_s"][only_b].mean() if only_b.any() else None},
    }
    names = {"teacher": ("kl_teacher_student", "kl_student_teacher"),
             "baseline": ("kl_baseline_student", "kl_student_baseline"),
             "baseline_vs_teacher": ("kl_teacher_baseline", "kl_baseline_teacher")}
    for pair, (fwd, rev) in names.items():
        out[f"vs_{pair}" if pair != "baseline_vs_teacher" else pair] = {
            fwd: g[f"kl_ref_{pair}"].mean(), rev: g[f"kl_rev_{pair}"].mean(), "js": g[f"js_{pair}"].mean(),
            "top1_agreement": g[f"top1_{pair}"].mean(), "top5_overlap": g[f"top5_{pair}"].mean()}
    return _floats(out)


def _floats(o):
    if isinstance(o, dict):
        return {k: _floats(v) for k, v in o.items()}
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return o


def summarize(stats, bins=5):
    """The JSON-able analysis from collect()'s per-token statistics."""
    out = _block(stats)
    out["windows"] = stats.get("_windows")
    order = np.argsort(stats["H_b"], kind="stable")
    out["entropy_bins"] = []
    for i, idx in enumerate(np.array_split(order, bins)):
        if len(idx) == 0:
            continue
        b = _block(stats, idx)
        b["bin"] = i
        b["baseline_entropy_range"] = [float(stats["H_b"][idx].min()), float(stats["H_b"][idx].max())]
        out["entropy_bins"].append(b)
    return out


def analyze(student, baseline, teacher, tokens, window=2048, max_windows=200, bins=5, batch_size=1, device="cpu",
            dtype=torch.float32):
    st = collect(student, baseline, teacher, tokens, window, max_windows, batch_size, device, dtype)
    out = summarize(st, bins)
    out.update(window=window, max_windows=max_windows, bins=bins)
    return out


def plot(result, path, title=None):
    """Bars per baseline-entropy bin: mean entropy of the three models, entropy change student - baseline, student PPL
    change % vs baseline, top-1 agreement of the student with the teacher and with the baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bins = result["entropy_bins"]
    x = np.arange(len(bins))
    labels = [f"{b['baseline_entropy_range'][0]:.2f}-{b['baseline_entropy_range'][1]:.2f}" for b in bins]
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.4))
    for j, (m, c) in enumerate((("student", "C0"), ("baseline", "C1"), ("teacher", "C2"))):
        ax[0].bar(x + (j - 1) * 0.27, [b["entropy"][m] for b in bins], 0.27, label=m, color=c)
    ax[0].set_ylabel("mean entropy (nats)")
    ax[0].legend(loc="lower right", fontsize=8, framealpha=0.9)
    dh = [b["entropy"]["student_minus_baseline"] for b in bins]
    ax[1].bar(x, dh, color="C0")
    ax[1].axhline(0, color="k", lw=0.8)
    ax[1].set_ylabel("entropy change, student - baseline (nats)")
    ch = [b["ppl"]["student_change_pct_vs_baseline"] for b in bins]
    ax[2].bar(x, ch, color=["C2" if v < 0 else "C3" for v in ch])
    ax[2].axhline(0, color="k", lw=0.8)
    ax[2].set_ylabel("student PPL change vs baseline (%)")
    for j, (k, c) in enumerate((("vs_teacher", "C2"), ("vs_baseline", "C1"))):
        ax[3].bar(x + (j - 0.5) * 0.4, [b[k]["top1_agreement"] for b in bins], 0.4, label=f"student {k}", color=c)
    ax[3].set_ylabel("top-1 agreement")
    ax[3].legend(fontsize=8, framealpha=0.9)
    for a in ax:
        a.set_xticks(x, labels, rotation=30, fontsize=8)
        a.set_xlabel("baseline-entropy bin (nats)")
    fig.suptitle(title or f"logit analysis: {result['tokens']} tokens, "
                          f"entropy change {result['entropy']['student_minus_baseline']:+.4f} nats, "
                          f"PPL change {result['ppl']['student_change_pct_vs_baseline']:+.2f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    from eval import common
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True)
    ap.add_argument("--baseline", required=True, help="the alpha = 0 run trained identically")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default=None, help="data dir; default: the student run's data dir")
    ap.add_argument("--set", default="heldout", help="stream split name")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--max_windows", type=int, default=200)
    ap.add_argument("--bins", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES), help="model weights dtype")
    ap.add_argument("--out", default=None, help="JSON output path (printed when absent)")
    ap.add_argument("--plot", default=None, help="PNG with entropy-bin bars")
    a = ap.parse_args(argv)
    data = a.data or common.data_dir_from_run(a.student)
    if data is None:
        ap.error("--data is required (no data dir found in the student run's config.yaml)")
    device = common.auto_device(a.device)
    models = {}
    for role in ("student", "baseline", "teacher"):
        path = getattr(a, role)
        models[role] = common.load_model(path, device, a.dtype)
        common.check_compatible(models[role], data, common.load_tokenizer(common.resolve_model_dir(path)), role)
    tokens = common.load_sets(data, [a.set])[a.set]
    res = analyze(models["student"], models["baseline"], models["teacher"], tokens, a.window, a.max_windows, a.bins,
                  a.batch_size, device)
    res.update(set=a.set, data=data, models={r: common.resolve_model_dir(getattr(a, r)) for r in models})
    if a.out:
        common.write_json(a.out, res)
    else:
        import json
        print(json.dumps(res, indent=1))
    if a.plot:
        plot(res, a.plot)
    return res


if __name__ == "__main__":
    from distillery.errors import cli
    cli(main)
