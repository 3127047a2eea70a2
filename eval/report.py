"""Grid report: PPL change of distilled students vs their token-matched and compute-matched baselines, paired by
seed, per teacher and alpha; best alpha per teacher; gain vs teacher size and teacher tokens; in-domain vs
out-of-domain gain; entropy change vs PPL change. Writes report.md, report.csv, students.csv and PNG plots.

    python -m eval.report runs/grid/a runs/grid/b ... --out reports/grid
    python -m eval.report --glob 'runs/grid-*' --out reports/grid      # a glob of run directories
    python -m eval.report runs/alpha --out reports/alpha                # a scripts/sweep.py sweep: its run subdirs

Roles, from each run's config.yaml:
  * compute-matched baseline: `compute_match` is set (non-empty): it names the distilled run whose FLOPs it matches
    (that run's config `name`, its run directory, or the directory's basename). It serves every distilled run with
    the same teacher and run-defining settings as the named one, paired by its own seed; one naming a run of the
    same alpha is preferred (alpha does not change a run's FLOPs, the teacher does).
  * token-matched baseline: alpha == 0 and no compute_match. Paired with distilled runs of the same seed and
    run-defining settings (see Pairing below).
  * distilled: every other run, grouped by (teacher, alpha) (+ any `--by` config keys, e.g. --by temperature).
PPL change % per seed = (PPL_distilled / PPL_baseline(same seed) - 1) x 100; reported as mean and standard error
(sample std / sqrt(n), blank for n < 2) over seeds. "ood_mean" is, per seed, the mean change over every eval set but
the in-domain one (`--in-domain`, default heldout), then mean +- s.e. over seeds.
Only finished runs count: a run needs <run>/finished.json (the trainer writes it last, once the schedule is complete);
a run from before that marker counts when its metrics.jsonl reaches the schedule's last step. Every other run (one
stopped by max_steps, preempted, crashed) is left out with a note. Final numbers: <run>/eval/final.json ("ppl": {set:
{"ppl" | "ce"}}) of the finished step when present, else the last eval record of metrics.jsonl at that step
("eval/<set>/ppl", or exp of "eval/<set>/loss").
Pairing: a baseline shares with the run every run-defining key (config.RUN_DEFINING, the keys a resume may not
change) but the seed (paired) and the distillation's own (config.KD_KEYS: teacher, alpha, temperature, ...), and the
evaluation (eval data, window, window cap); an unpaired run is named in the notes with the nearest baseline's
differences. Entropy change, student - its token-matched
baseline, on the in-domain text: the "entropy" of <run>/eval/ppl.json (`python -m eval.ppl --entropy`, the paper's
analysis on fixed text) when both runs have it, else their last logged "entropy/student" (training batches; a run
without a teacher logs none).
Compute: the last "compute/run_flops" of metrics.jsonl (student training + the teacher forward over its tokens, run
live or read from a teacher cache: what compute_match equals),
or "compute/total_flops" (+ the teacher's amortised pretraining) where the compute-matched baseline was matched with
compute_match_pretrain=true; a run that logs only total_flops is read from that. Teacher size: parameters of <teacher>/config.json; teacher
tokens: <teacher>/distillery_compute.json "tokens", else the train_tokens of <teacher>/distillery_config.yaml.
See docs/compute.md.
"""
import argparse
import csv
import glob
import io
import json
import math
import os
import sys

import yaml

from distillery import flops, provenance, runlog
from distillery.atomic import atomic_path, read_jsonl, write_text
from distillery.config import PAIR_KEYS
from distillery.errors import ConfigError, EvalError, cli

# What a baseline must share with the run it is paired to: every run-defining key (the list resume.py refuses to
# change, config.RUN_DEFINING) except the seed (paired separately) and what makes a run distilled (config.KD_KEYS),
# then the evaluation its numbers come from (eval data, window, window cap). A compute-matched baseline shares them
# with the run it names, train_tokens aside.
MATCH_KEYS = PAIR_KEYS
EVAL_KEYS = ("eval_data", "eval_window", "eval_max_windows")
PATH_KEYS = ("data", "student_init", "eval_data")
CSV_COLUMNS = ["reference", "teacher", "teacher_name", "alpha", "group", "teacher_params", "teacher_tokens",
               "teacher_pretrain_flops", "eval_set", "domain", "n", "seeds", "ppl_mean", "ref_ppl_mean",
               "ppl_change_pct_mean", "ppl_change_pct_se", "flops_mean", "ref_flops_mean"]
REFS = {"token": "token-matched baseline", "compute": "compute-matched baseline"}
ROLES = {"distilled": "distilled", "token": "token-matched", "compute": "compute-matched"}
OOD = "ood_mean"


# ---------------------------------------------------------------------------- reading runs
def mean_se(xs):
    """(mean, standard error = sample std / sqrt(n)); s.e. is NaN for n < 2."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def _is_run(d):
    return os.path.isfile(os.path.join(d, "config.yaml")) or os.path.isfile(os.path.join(d, "metrics.jsonl"))


def collect_run_dirs(paths=(), globs=()):
    """Run directories from explicit paths (a directory holding run subdirs, e.g. a sweep's, expands to them) and
    glob patterns (directories only). Sorted, deduplicated."""
    out = []
    for pat in globs:
        hits = [p for p in sorted(glob.glob(pat)) if os.path.isdir(p)]
        if not hits:
            raise EvalError(f"--glob {pat!r} matches no directory; quote it and check the path (e.g. 'runs/grid-*')")
        for p in hits:
            out += [p] if _is_run(p) else _subruns(p) or [p]  # a non-run hit fails in load_run with its reason
    for p in paths:
        if not os.path.isdir(p):
            raise EvalError(f"run directory {p!r} does not exist; give runs/<name> directories")
        out += [p] if _is_run(p) else _subruns(p) or [p]
    if not out:
        raise EvalError("no run directories given; pass run dirs and/or --glob 'runs/<sweep>/*'")
    seen, uniq = set(), []
    for p in out:
        k = os.path.realpath(p)
        if k not in seen:
            seen.add(k)
            uniq.append(p)
    return uniq


def _subruns(d):
    subs = sorted(os.path.join(d, s) for s in os.listdir(d))
    return [s for s in subs if os.path.isdir(s) and _is_run(s)]


def final_ppl(run_dir, records, cfg=None, step=None):
    """({set: ppl}, source, eval) of the run's final model: eval/final.json, else the last eval record of
    metrics.jsonl; ({}, None, None) if none. With `step` (the step the run finished at) a final.json or eval record
    of another step is not the final model's and is not used. `eval` = (eval data, window, window cap) the numbers
    were measured with: final.json's own, else the run config's (`cfg`)."""
    cfg = cfg or {}
    fj = os.path.join(run_dir, "eval", "final.json")
    if os.path.isfile(fj):
        try:
            with open(fj) as f:
                d = json.load(f) or {}
            sets = d.get("ppl") or {}
        except (json.JSONDecodeError, AttributeError):
            raise EvalError(f"{fj} is not a final-eval JSON; delete it to use metrics.jsonl's last eval") from None
        out = {s: float(v["ppl"]) if "ppl" in v else math.exp(v["ce"]) for s, v in sets.items()
               if isinstance(v, dict) and ("ppl" in v or "ce" in v)}
        if out and (step is None or d.get("step") in (None, step)):
            return out, "eval/final.json", (_norm(d.get("data")), d.get("window"), d.get("max_windows"))
    for r in reversed(records):
        ev = {}
        for k, v in r.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("ppl", "loss") and v is not None:
                ppl = float(v) if parts[2] == "ppl" else math.exp(v)
                ev[parts[1]] = ev.get(parts[1], ppl) if parts[2] == "loss" else ppl  # an explicit ppl wins
        if ev:
            if step is not None and r.get("step") != step:
                break  # the last evaluation is of an earlier model
            return ev, "metrics.jsonl", (_norm(cfg.get("eval_data") or cfg.get("data")), cfg.get("eval_window"),
                                         cfg.get("eval_max_windows"))
    return {}, None, None


def _norm(path):
    return os.path.normpath(path) if isinstance(path, str) and path else path


def text_entropy(run_dir):
    """{set: mean predictive entropy} from <run>/eval/ppl.json (written by `python -m eval.ppl --entropy`)."""
    path = os.path.join(run_dir, "eval", "ppl.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            sets = (json.load(f) or {}).get("sets") or {}
    except (json.JSONDecodeError, AttributeError):
        raise EvalError(f"{path} is not an eval.ppl JSON; rerun `python -m eval.ppl --entropy --out {path}` or "
                        f"delete it") from None
    return {k: float(v["entropy"]) for k, v in sets.items() if isinstance(v, dict) and v.get("entropy") is not None}


def entropy_pair(d, b, in_domain):
    """(student entropy, baseline entropy, source) on the same footing, or (None, None, None): the in-domain text
    entropies when both runs have them, else both runs' last logged entropy/student."""
    if in_domain in d["text_entropy"] and in_domain in b["text_entropy"]:
        return d["text_entropy"][in_domain], b["text_entropy"][in_domain], f"{in_domain} text (eval/ppl.json)"
    if d["entropy"] is not None and b["entropy"] is not None:
        return d["entropy"], b["entropy"], "training batches (last entropy/student)"
    return None, None, None


def _last(records, key):
    for r in reversed(records):
        if r.get(key) is not None:
            return r
    return None


def load_run(run_dir):
    """One run: its config, role, final PPL per eval set, last entropy/student, entropies on eval text
    (eval/ppl.json), last compute/* record."""
    cfg_path, met_path = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(met_path):
        raise EvalError(f"{run_dir} has no metrics.jsonl; train that run first or leave it out")
    if not os.path.isfile(cfg_path):
        raise EvalError(f"{run_dir} has no config.yaml (the trainer writes the resolved config there); "
                        f"is it a Distillery run directory?")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or "alpha" not in cfg:
        raise EvalError(f"{cfg_path} has no alpha; give the resolved config the trainer wrote")
    records = read_jsonl(met_path)
    done, how = runlog.finished(run_dir, cfg, records)
    ppl, source, ev = final_ppl(run_dir, records, cfg, done) if done is not None else ({}, None, None)
    ent = _last(records, "entropy/student")
    comp = _last(records, "compute/total_flops") or {}
    alpha = float(cfg["alpha"])
    cm = cfg.get("compute_match")
    role = "compute" if cm not in (None, "", False) else "token" if alpha == 0 else "distilled"
    return {"dir": run_dir, "cfg": cfg, "name": str(cfg.get("name") or os.path.basename(run_dir.rstrip("/"))),
            "role": role, "alpha": alpha, "seed": cfg.get("seed"), "teacher": str(cfg.get("teacher") or ""),
            "compute_match": cm, "ppl": ppl, "source": source, "eval": ev, "finished": done, "finished_how": how,
            "entropy": None if ent is None else float(ent["entropy/student"]),
            "text_entropy": text_entropy(run_dir),
            "starts": provenance.starts(run_dir),
            "flops": _float(comp.get("compute/total_flops")),
            "run_flops": _float(comp.get("compute/run_flops", comp.get("compute/total_flops")))}


def _float(v):
    return None if v is None else float(v)


def teacher_dir(run, roots=()):
    """The teacher's export directory: absolute, else relative to the current directory, the run's launch
    directory (the run dir with its out_dir/name stripped) or a --teacher-root."""
    t = run["teacher"]
    if not t:
        return None
    if os.path.isabs(t):
        return t if os.path.isdir(t) else None
    cands = [t]
    cfg = run["cfg"]
    tail = os.path.normpath(os.path.join(str(cfg.get("out_dir") or "runs"), str(cfg.get("name") or "")))
    rd = os.path.normpath(os.path.abspath(run["dir"]))
    if rd.endswith(os.sep + tail):
        cands.append(os.path.join(rd[: -len(tail) - 1], t))
    cands += [os.path.join(r, t) for r in roots]
    return next((c for c in cands if os.path.isdir(c)), None)


def teacher_info(path, notes):
    """{params, tokens, pretrain_flops} of a teacher export (None where unknown)."""
    info = {"params": None, "tokens": None, "pretrain_flops": None}
    if path is None:
        return info
    try:
        info["params"] = flops.param_counts(path)["total"]
    except ConfigError as e:
        notes.append(f"teacher {path}: parameter count unknown ({e})")
    rec = flops.read_export_compute(path)
    if rec is not None:
        info["tokens"], info["pretrain_flops"] = rec["tokens"], rec["flops"]["total"]
    else:
        yml = os.path.join(path, "distillery_config.yaml")
        if os.path.isfile(yml):
            with open(yml) as f:
                tc = yaml.safe_load(f) or {}
            tokens = tc.get("train_tokens")
            tps = int(tc.get("global_batch_size") or 0) * int(tc.get("seq_len") or 0)
            if tokens and tps:  # what the trainer actually ran: whole steps, capped by max_steps
                steps = tokens // tps
                steps = min(steps, tc["max_steps"]) if tc.get("max_steps") else steps
                tokens = steps * tps
            info["tokens"] = tokens
    return info


def teacher_label(path):
    """runs/teacher-0.7b/export -> teacher-0.7b (the run's name); otherwise the directory's basename."""
    p = os.path.normpath(path) if path else "-"
    return os.path.basename(os.path.dirname(p)) if os.path.basename(p) == "export" else os.path.basename(p)


# ---------------------------------------------------------------------------- pairing
def _match_key(run, skip=()):
    """The run-defining settings a baseline must share (MATCH_KEYS), then the evaluation (EVAL_KEYS)."""
    cfg = run["cfg"]
    return (tuple(_norm(cfg.get(k)) if k in PATH_KEYS else cfg.get(k) for k in MATCH_KEYS if k not in skip)
            + tuple(run["eval"] or (None, None, None)))


def _key_names(skip=()):
    return [k for k in MATCH_KEYS if k not in skip] + list(EVAL_KEYS)


def _differences(a, b, skip=()):
    return [k for k, x, y in zip(_key_names(skip), _match_key(a, skip), _match_key(b, skip)) if x != y]


def _dup_error(what, a, b):
    diff = sorted(k for k in set(a["cfg"]) | set(b["cfg"])
                  if k not in ("name", "out_dir") and a["cfg"].get(k) != b["cfg"].get(k))
    hint = f"they differ in {', '.join(diff)}: add --by <key>" if diff else "they are the same run twice"
    return EvalError(f"two {what} for the same seed: {a['dir']} and {b['dir']}; {hint}, or pass only one")


def pair_runs(runs, by=()):
    """groups {group_key: {seed: distilled run}}, token_ref {dir: baseline}, compute_ref {dir: baseline}, notes."""
    notes, groups = [], {}
    distilled = [r for r in runs if r["role"] == "distilled"]
    for r in distilled:
        key = (r["teacher"], r["alpha"], *(r["cfg"].get(k) for k in by))
        seeds = groups.setdefault(key, {})
        if r["seed"] in seeds:
            raise _dup_error(f"distilled runs with teacher {r['teacher']} alpha {r['alpha']}", seeds[r["seed"]], r)
        seeds[r["seed"]] = r
    token = {}
    for b in (r for r in runs if r["role"] == "token"):
        k = (b["seed"], _match_key(b))
        if k in token:
            raise _dup_error("token-matched (alpha = 0) baselines", token[k], b)
        token[k] = b
    by_name = {}
    for r in distilled:
        for alias in {r["name"], os.path.normpath(r["dir"]), os.path.realpath(r["dir"]),
                      os.path.basename(os.path.normpath(r["dir"]))}:
            by_name.setdefault(alias, []).append(r)
    compute = {}  # (teacher, match key, seed) -> [(named alpha, baseline)]
    for b in (r for r in runs if r["role"] == "compute"):
        cm = str(b["compute_match"])
        named = by_name.get(cm) or by_name.get(os.path.normpath(cm)) or by_name.get(os.path.realpath(cm))
        if not named:
            notes.append(f"compute-matched baseline {b['dir']} names {cm!r}, which is not among the given distilled "
                         f"runs; pass that run too")
            continue
        n = named[0]
        diff = _differences(n, b, skip=("train_tokens",))
        if diff:
            notes.append(f"compute-matched baseline {b['dir']} differs from {n['dir']}, the run it names, in "
                         f"{', '.join(diff)}; not paired")
            continue
        compute.setdefault((n["teacher"], _match_key(n), b["seed"]), []).append((n["alpha"], b))
    token_ref, compute_ref = {}, {}
    for r in distilled:
        b = token.get((r["seed"], _match_key(r)))
        if b is not None:
            token_ref[r["dir"]] = b
        cands = compute.get((r["teacher"], _match_key(r), r["seed"]), [])
        exact = [b for a, b in cands if a == r["alpha"]]
        if len(exact) > 1:
            raise _dup_error(f"compute-matched baselines for teacher {r['teacher']} alpha {r['alpha']}", *exact[:2])
        if exact or cands:
            compute_ref[r["dir"]] = (exact or sorted((b for _, b in cands), key=lambda b: b["dir"]))[0]
    for r in distilled:
        if r["dir"] in token_ref or r["dir"] in compute_ref:
            continue
        near = sorted(((len(d), b["dir"], d) for b in runs if b["role"] == "token" and b["seed"] == r["seed"]
                       for d in [_differences(r, b)]))
        why = (f"; the nearest, {near[0][1]}, differs in {', '.join(near[0][2])}" if near else
               f"; no alpha = 0 run of seed {r['seed']}")
        notes.append(f"no baseline with the same seed and run-defining settings ({', '.join(_key_names())}) for "
                     f"{r['dir']}{why}")
    return groups, token_ref, compute_ref, notes


def code_note(runs):
    """One line on the code that trained the runs (distillery/provenance.py's starts.jsonl): the commits and how many
    runs each, runs that crossed a commit or ran on a modified tree, runs from before the record. None if all
    runs have no record."""
    by_commit, crossed, dirty, unknown = {}, [], [], []
    for r in runs:
        commits = {s.get("commit") for s in r.get("starts") or []}
        if not commits or commits == {None}:
            unknown.append(r["dir"])
            continue
        for c in commits - {None}:
            by_commit[c[:12]] = by_commit.get(c[:12], 0) + 1
        if len(commits) > 1:
            crossed.append(r["dir"])
        if any(s.get("dirty") for s in r["starts"]):
            dirty.append(r["dir"])
    if not by_commit:
        return None
    parts = [f"code: commit {', '.join(f'{c} ({n} run' + 's' * (n != 1) + ')' for c, n in sorted(by_commit.items()))}"]
    if crossed:
        parts.append(f"resumed on other code: {', '.join(crossed)}")
    if dirty:
        parts.append(f"trained with uncommitted changes: {', '.join(dirty)}")
    if unknown:
        parts.append(f"no record (runs from before starts.jsonl): {len(unknown)}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- numbers
def summarize(runs, in_domain="heldout", by=(), teacher_roots=()):
    """Everything the report shows, as plain data."""
    notes = []
    for r in runs:
        if r["finished"] is None:
            notes.append(f"{r['dir']}: not finished ({r['finished_how']}): left out; its numbers would be those of a "
                         f"model before the end of its schedule")
        elif not r["ppl"]:
            notes.append(f"{r['dir']}: no evaluation of its final model (step {r['finished']}: no eval/final.json, no "
                         f"eval record); left out")
    legacy = [r["dir"] for r in runs if r["ppl"] and r["finished_how"] != runlog.FINISHED]
    if legacy:
        notes.append(f"no {runlog.FINISHED} (runs from before the marker), taken as finished because metrics.jsonl "
                     f"reaches the schedule's last step: {', '.join(legacy)}")
    runs = [r for r in runs if r["ppl"]]
    code = code_note(runs)
    if code:
        notes.append(code)
    left = "".join(f" [{n}]" for n in notes if "left out" in n)  # what was skipped, in the one error line
    if not any(r["role"] == "distilled" for r in runs):
        raise EvalError(f"no distilled run (alpha > 0) with an evaluation among {len(runs)} evaluated runs; "
                        f"add the distilled runs of the grid{left}")
    if not any(r["role"] in ("token", "compute") for r in runs):
        raise EvalError("no baseline among the runs: add the alpha = 0 runs (token-matched) or runs with "
                        f"compute_match set (compute-matched){left}")
    groups, token_ref, compute_ref, pair_notes = pair_runs(runs, by)
    notes += pair_notes
    teachers = {}
    for key, seeds in groups.items():
        r = next(iter(seeds.values()))
        if key[0] not in teachers:
            path = teacher_dir(r, teacher_roots)
            if path is None and key[0]:
                notes.append(f"teacher {key[0]!r} not found from the runs' directories or --teacher-root; its size, "
                             f"tokens and pretraining FLOPs are left blank")
            teachers[key[0]] = {"path": path, "name": teacher_label(key[0]), **teacher_info(path, notes)}
    rows, per_student = [], []
    for ref_kind, refs in (("token", token_ref), ("compute", compute_ref)):
        for key, seeds in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], *map(str, kv[0][2:]))):
            pairs = [(s, seeds[s], refs[seeds[s]["dir"]]) for s in sorted(seeds, key=_seed_order)
                     if seeds[s]["dir"] in refs]
            if not pairs:
                continue
            sets = sorted(set.intersection(*(set(d["ppl"]) & set(b["ppl"]) for _, d, b in pairs)))
            ch = {s: [100 * (d["ppl"][s] / b["ppl"][s] - 1) for _, d, b in pairs] for s in sets}
            ood = [s for s in sets if s != in_domain]
            if ood:
                ch[OOD] = [sum(ch[s][i] for s in ood) / len(ood) for i in range(len(pairs))]
            # like with like: what the compute-matched baseline was matched on (run FLOPs unless it counted the
            # teacher's pretraining too)
            fk = "flops" if ref_kind == "compute" and any(b["cfg"].get("compute_match_pretrain") for _, _, b in pairs) \
                else "run_flops"
            fl = [d[fk] for _, d, _ in pairs if d[fk] is not None]
            rfl = [b[fk] for _, _, b in pairs if b[fk] is not None]
            t = teachers[key[0]]
            for s in sets + ([OOD] if ood else []):
                m, se = mean_se(ch[s])
                rows.append({
                    "reference": ref_kind, "teacher": key[0], "teacher_name": t["name"], "alpha": key[1],
                    "group": _group_label(key, by), "by": dict(zip(by, key[2:])), "teacher_params": t["params"],
                    "teacher_tokens": t["tokens"], "teacher_pretrain_flops": t["pretrain_flops"], "eval_set": s,
                    "domain": "in" if s == in_domain else "out", "n": len(pairs),
                    "seeds": " ".join(str(p[0]) for p in pairs),
                    "ppl_mean": None if s == OOD else sum(d["ppl"][s] for _, d, _ in pairs) / len(pairs),
                    "ref_ppl_mean": None if s == OOD else sum(b["ppl"][s] for _, _, b in pairs) / len(pairs),
                    "ppl_change_pct_mean": m, "ppl_change_pct_se": se, "changes": ch[s],
                    "flops_kind": fk, "flops_mean": sum(fl) / len(fl) if len(fl) == len(pairs) else None,
                    "ref_flops_mean": sum(rfl) / len(rfl) if len(rfl) == len(pairs) else None})
            if ref_kind == "token":
                for i, (seed, d, b) in enumerate(pairs):
                    hd, hb, src = entropy_pair(d, b, in_domain)
                    per_student.append({"run": d["dir"], "group": _group_label(key, by), "seed": seed,
                                        "entropy_change": None if hd is None else hd - hb,
                                        "entropy": hd, "baseline_entropy": hb, "entropy_source": src,
                                        **{f"change/{s}": ch[s][i] for s in ch}})
    paired = {b["dir"] for b in token_ref.values()} | {b["dir"] for b in compute_ref.values()}
    unpaired = [r["dir"] for r in runs if r["role"] != "distilled" and r["dir"] not in paired]
    return {"runs": runs, "rows": rows, "students": per_student, "teachers": teachers, "notes": notes,
            "unpaired_baselines": unpaired, "entropy": entropy_rows(per_student),
            "in_domain": in_domain, "by": list(by), "token_ref": token_ref, "compute_ref": compute_ref,
            "best_alpha": best_alpha(rows)}


def entropy_rows(students):
    """Per group: entropy change (student - baseline, nats) and in-domain PPL change, mean +- s.e. over seeds."""
    out = {}
    for s in students:
        if s["entropy_change"] is not None:
            out.setdefault(s["group"], []).append(s)
    rows = []
    for g, st in out.items():
        m, se = mean_se([s["entropy_change"] for s in st])
        rows.append({"group": g, "n": len(st), "entropy_change_mean": m, "entropy_change_se": se,
                     "student_entropy_mean": sum(s["entropy"] for s in st) / len(st),
                     "baseline_entropy_mean": sum(s["baseline_entropy"] for s in st) / len(st),
                     "source": "; ".join(sorted({s["entropy_source"] for s in st}))})
    return rows


def _seed_order(s):
    return (0, s, "") if isinstance(s, int) else (1, 0, str(s))


def _group_label(key, by):
    extra = "".join(f" {k}={v}" for k, v in zip(by, key[2:]))
    return f"{teacher_label(key[0])} a={key[1]:g}{extra}"


def best_alpha(rows):
    """{reference: {(teacher, by values): {eval_set: (alpha, mean change)}}}: the alpha with the lowest mean PPL
    change (largest gain) per teacher and eval set."""
    out = {}
    for r in rows:
        t = out.setdefault(r["reference"], {}).setdefault((r["teacher"], *r["by"].values()), {})
        cur = t.get(r["eval_set"])
        if cur is None or r["ppl_change_pct_mean"] < cur[1]:
            t[r["eval_set"]] = (r["alpha"], r["ppl_change_pct_mean"])
    return out


# ---------------------------------------------------------------------------- output
def _fmt_pm(m, se, n, fmt="{:+.2f}"):
    return fmt.format(m) + ("" if math.isnan(se) else " ± " + fmt.format(se).lstrip("+")) + f" (n={n})"


def _num(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.10g}" if isinstance(v, float) else str(v)


def write_csv(path, rows):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([_num(r[c]) for c in CSV_COLUMNS])
    write_text(path, buf.getvalue())


def write_students_csv(path, summary):
    cols = ["run", "role", "name", "teacher", "alpha", "seed", "source", "entropy_student", "run_flops", "total_flops"]
    sets = sorted({s for r in summary["runs"] for s in r["ppl"]})
    tsets = sorted({s for r in summary["runs"] for s in r["text_entropy"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + [f"ppl/{s}" for s in sets] + [f"entropy/{s}" for s in tsets])
    for r in summary["runs"]:
        w.writerow([r["dir"], ROLES[r["role"]], r["name"], r["teacher"] if r["role"] == "distilled" else "", r["alpha"],
                    r["seed"], r["source"], _num(r["entropy"]), _num(r["run_flops"]), _num(r["flops"])]
                   + [_num(r["ppl"].get(s)) for s in sets] + [_num(r["text_entropy"].get(s)) for s in tsets])
    write_text(path, buf.getvalue())


def _savefig(fig, path):
    # atomic: a reader never sees half a PNG; format given explicitly since the temporary name has no .png suffix
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def plots(summary, out):
    """Write the PNGs; returns {name: file} of those written (a plot without data is skipped)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = {}
    rows = summary["rows"]
    for ref in REFS:
        rs = [r for r in rows if r["reference"] == ref]
        if not rs:
            continue
        sets = sorted({r["eval_set"] for r in rs}, key=lambda s: (s == OOD, s != summary["in_domain"], s))
        groups = list(dict.fromkeys(r["group"] for r in rs))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(sets) * len(groups) + 2), 4))
        width = 0.8 / len(groups)
        for i, g in enumerate(groups):
            cell = {r["eval_set"]: r for r in rs if r["group"] == g}
            ys = [cell[s]["ppl_change_pct_mean"] if s in cell else float("nan") for s in sets]
            es = [0 if s not in cell or math.isnan(cell[s]["ppl_change_pct_se"]) else cell[s]["ppl_change_pct_se"]
                  for s in sets]
            ax.bar([j + i * width for j in range(len(sets))], ys, width, yerr=es, capsize=3, label=g)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(sets))], sets)
        ax.set(ylabel=f"PPL change % vs {REFS[ref]}", title=f"PPL change vs {REFS[ref]} (mean ± s.e. over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written[f"ppl_change_{ref}"] = f"ppl_change_{ref}.png"
        _savefig(fig, os.path.join(out, written[f"ppl_change_{ref}"]))
        plt.close(fig)
    tok = [r for r in rows if r["reference"] == "token"]
    panels = [s for s in (summary["in_domain"], OOD) if any(r["eval_set"] == s for r in tok)]
    for axis, label in (("teacher_params", "teacher parameters"), ("teacher_tokens", "teacher training tokens")):
        rs = [r for r in tok if r[axis] and r["eval_set"] in panels]
        if not rs:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, s in zip(axes[0], panels):
            for a in sorted({r["alpha"] for r in rs}):
                pts = sorted((r[axis], r["ppl_change_pct_mean"], r["ppl_change_pct_se"]) for r in rs
                             if r["eval_set"] == s and r["alpha"] == a)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[0 if math.isnan(p[2]) else p[2] for p in pts], marker="o", capsize=3,
                            label=f"alpha={a:g}")
            ax.set_xscale("log")
            ax.axhline(0, color="k", lw=0.5)
            ax.set(xlabel=label, ylabel="PPL change % vs token-matched baseline", title=s)
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = "gain_vs_" + axis
        written[name] = name + ".png"
        _savefig(fig, os.path.join(out, written[name]))
        plt.close(fig)
    ind = {r["group"]: r for r in tok if r["eval_set"] == summary["in_domain"]}
    ood = {r["group"]: r for r in tok if r["eval_set"] == OOD}
    both = [g for g in ind if g in ood]
    if both:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for g in both:
            a, b = ind[g], ood[g]
            ax.errorbar(a["ppl_change_pct_mean"], b["ppl_change_pct_mean"],
                        xerr=0 if math.isnan(a["ppl_change_pct_se"]) else a["ppl_change_pct_se"],
                        yerr=0 if math.isnan(b["ppl_change_pct_se"]) else b["ppl_change_pct_se"],
                        marker="o", capsize=3, label=g)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set(xlabel=f"in-domain ({summary['in_domain']}) PPL change %", ylabel="out-of-domain (mean) PPL change %",
               title="in-domain vs out-of-domain (vs token-matched baseline)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written["domain_gain"] = "domain_gain.png"
        _savefig(fig, os.path.join(out, written["domain_gain"]))
        plt.close(fig)
    st = summary["students"]
    if st and all(s["entropy_change"] is not None for s in st):
        key = f"change/{OOD}" if f"change/{OOD}" in st[0] else f"change/{summary['in_domain']}"
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for g in dict.fromkeys(s["group"] for s in st):
            pts = [(s["entropy_change"], s.get(key)) for s in st if s["group"] == g and s.get(key) is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=g)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        src = "; ".join(sorted({s["entropy_source"] for s in st}))
        ax.set(xlabel=f"entropy change (nats, student - baseline)\n{src}",
               ylabel=f"PPL change % ({key.split('/', 1)[1]})", title="entropy vs PPL change, one point per student")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written["entropy_vs_ppl"] = "entropy_vs_ppl.png"
        _savefig(fig, os.path.join(out, written["entropy_vs_ppl"]))
        plt.close(fig)
    return written


def _table(header, body):
    return "\n".join(["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]) + "\n"


def markdown(summary, figs):
    rows, ind = summary["rows"], summary["in_domain"]
    out = ["# Distillation grid report\n",
           f"{len(summary['runs'])} evaluated runs: "
           + ", ".join(f"{sum(r['role'] == k for r in summary['runs'])} {v}" for k, v in
                       (("distilled", "distilled"), ("token", "token-matched baselines (alpha = 0)"),
                        ("compute", "compute-matched baselines (compute_match)")))
           + (f"; {len(summary['unpaired_baselines'])} of the alpha = 0 runs pair with no distilled run (e.g. the "
              f"teachers)" if summary["unpaired_baselines"] else "") + ".\n",
           "PPL change % = (PPL_distilled / PPL_baseline - 1) x 100 for each seed against the baseline of the same "
           "seed, then mean ± standard error (sample std / sqrt(n)) over seeds; negative is better. "
           f"`{OOD}`: per seed, the mean change over every eval set but `{ind}`.\n"]
    for ref, title in REFS.items():
        rs = [r for r in rows if r["reference"] == ref]
        out.append(f"\n## PPL change vs {title}\n")
        if not rs:
            out.append("No distilled run has one." + (" Compute-matched baselines are runs whose config sets "
                                                      "`compute_match` to the distilled run they match.\n"
                                                      if ref == "compute" else "\n"))
            continue
        sets = sorted({r["eval_set"] for r in rs}, key=lambda s: (s == OOD, s != ind, s))
        groups = list(dict.fromkeys(r["group"] for r in rs))
        cells = {(r["group"], r["eval_set"]): r for r in rs}
        body = []
        for g in groups:
            any_r = next(r for r in rs if r["group"] == g)
            body.append([g] + [_fmt_pm(c["ppl_change_pct_mean"], c["ppl_change_pct_se"], c["n"])
                               if (c := cells.get((g, s))) else "-" for s in sets]
                        + [_flops_cell(any_r)])
        out.append(_table(["teacher, alpha"] + sets + ["FLOPs distilled / baseline"], body))
        kinds = {r["flops_kind"] for r in rs if r["flops_mean"] is not None}
        if kinds:
            out.append("\nFLOPs: " + " and ".join(sorted(
                {"run_flops": "student training + teacher forward, live or spent by a teacher cache on the rows "
                              "the run read (`compute/run_flops`)",
                 "flops": "student training + teacher forward + the teacher's amortised pretraining "
                          "(`compute/total_flops`, the baselines set compute_match_pretrain)"}[k] for k in kinds))
                       + "; the ratio is the baseline's share of the distilled run's.\n")
        if f"ppl_change_{ref}" in figs:
            out.append(f"\n![PPL change vs {title}]({figs[f'ppl_change_{ref}']})\n")
    out.append("\n## Best alpha per teacher (lowest mean PPL change)\n")
    for ref, per_t in summary["best_alpha"].items():
        sets = sorted({s for v in per_t.values() for s in v}, key=lambda s: (s == OOD, s != ind, s))
        body = [[teacher_label(t[0]) + "".join(f" {k}={v}" for k, v in zip(summary["by"], t[1:]))]
                + [f"{v[s][0]:g} ({v[s][1]:+.2f}%)" if s in v else "-" for s in sets] for t, v in per_t.items()]
        out.append(f"\nvs {REFS[ref]}:\n\n" + _table(["teacher"] + sets, body))
    out.append(f"\n## In-domain (`{ind}`) vs out-of-domain gain (vs token-matched baseline)\n")
    tok = [r for r in rows if r["reference"] == "token"]
    pairs = {}
    for r in tok:
        if r["eval_set"] in (ind, OOD):
            pairs.setdefault(r["group"], {})[r["eval_set"]] = r
    body = [[g, *(_fmt_pm(v[s]["ppl_change_pct_mean"], v[s]["ppl_change_pct_se"], v[s]["n"]) if s in v else "-"
                  for s in (ind, OOD))] for g, v in pairs.items()]
    out.append(_table(["teacher, alpha", f"in-domain ({ind})", "out-of-domain (mean)"], body) if body
               else f"No eval set named `{ind}` and no other set among the paired runs.\n")
    if "domain_gain" in figs:
        out.append(f"\n![in-domain vs out-of-domain]({figs['domain_gain']})\n")
    out.append("\n## Teachers\n")
    body = [[v["name"], k, _num(v["params"]), _num(v["tokens"]), _num(v["pretrain_flops"])]
            for k, v in summary["teachers"].items()]
    out.append(_table(["teacher", "path", "parameters", "training tokens", "pretraining FLOPs"], body))
    for name, label in (("gain_vs_teacher_params", "teacher size"), ("gain_vs_teacher_tokens", "teacher tokens")):
        out.append(f"\n![gain vs {label}]({figs[name]})\n" if name in figs else
                   f"\nGain vs {label}: not plotted (no teacher with a known {label.split()[1]}).\n")
    out.append("\n## Entropy change vs PPL change\n")
    st = summary["students"]
    if summary["entropy"]:
        body = [[e["group"], _fmt_pm(e["entropy_change_mean"], e["entropy_change_se"], e["n"], "{:+.4f}"),
                 f"{e['student_entropy_mean']:.4f}", f"{e['baseline_entropy_mean']:.4f}", e["source"]]
                for e in summary["entropy"]]
        out.append("Mean predictive entropy (nats) of each distilled student minus its token-matched baseline's "
                   "(same seed), mean ± s.e. over seeds; positive = the student is less confident.\n"
                   + _table(["teacher, alpha", "entropy change", "student", "baseline", "measured on"], body) + "\n")
    if "entropy_vs_ppl" in figs:
        out.append(f"\nOne point per distilled student.\n\n![entropy vs PPL change]({figs['entropy_vs_ppl']})\n")
    elif st and any(s["baseline_entropy"] is None for s in st):
        out.append("Skipped for some students: no entropy on the same footing for them and their baselines. Write "
                   "it on fixed text with `python -m eval.ppl --model <run> --entropy --out <run>/eval/ppl.json` "
                   "(the same window and sets as the run's eval) for every run, baselines included.\n")
    else:
        out.append("Skipped: the distilled runs have no entropy (eval/ppl.json or the `entropy` callback).\n")
    out.append("\n## Runs\n")
    sets = sorted({s for r in summary["runs"] for s in r["ppl"]})
    body = [[r["dir"], ROLES[r["role"]], _num(r["alpha"]), _num(r["seed"]), r["source"]]
            + [f"{r['ppl'][s]:.4g}" if s in r["ppl"] else "-" for s in sets] for r in summary["runs"]]
    out.append(_table(["run", "role", "alpha", "seed", "numbers from"] + [f"PPL {s}" for s in sets], body))
    if summary["notes"]:
        out.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in summary["notes"]))
    return "".join(out)


def _flops_cell(r):
    if r["flops_mean"] is None or r["ref_flops_mean"] is None:
        return "-"
    return f"{r['flops_mean']:.3g} / {r['ref_flops_mean']:.3g} (baseline {r['ref_flops_mean'] / r['flops_mean']:.3f}x)"


def build_report(run_dirs, out, in_domain="heldout", by=(), teacher_roots=()):
    runs = [load_run(d) for d in run_dirs]
    summary = summarize(runs, in_domain, by, teacher_roots)
    os.makedirs(out, exist_ok=True)
    figs = plots(summary, out)
    write_csv(os.path.join(out, "report.csv"), summary["rows"])
    write_students_csv(os.path.join(out, "students.csv"), summary)
    write_text(os.path.join(out, "report.md"), markdown(summary, figs))
    summary["figures"] = figs
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("runs", nargs="*", help="run directories (or a sweep directory holding them)")
    ap.add_argument("--glob", action="append", default=[], help="glob of run directories, e.g. 'runs/grid-*'")
    ap.add_argument("--out", default="runs/report", help="output directory (report.md, report.csv, *.png)")
    ap.add_argument("--in-domain", default="heldout", help="the in-domain eval set; every other set is OOD")
    ap.add_argument("--by", action="append", default=[], help="extra config key that tells distilled groups apart")
    ap.add_argument("--teacher-root", action="append", default=[],
                    help="directory relative teacher paths are resolved from (default: cwd, the runs' launch dir)")
    a = ap.parse_args(argv)
    summary = build_report(collect_run_dirs(a.runs, a.glob), a.out, a.in_domain, a.by, a.teacher_root)
    for n in summary["notes"]:
        print(f"note: {n}", file=sys.stderr)
    print(f"report: {os.path.join(a.out, 'report.md')} ({len(summary['runs'])} runs, {len(summary['rows'])} rows, "
          f"{len(summary['figures'])} plots)")
    return summary


if __name__ == "__main__":
    cli(main)
