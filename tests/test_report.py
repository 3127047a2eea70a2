"""eval/report.py: a fabricated grid (2 teachers x 2 alphas x 2 seeds, a token-matched and a compute-matched
baseline) checked against hand-computed paired PPL changes, the CSV contract, the plots, and one-line errors."""
import csv
import json
import math

import pytest
import yaml

from distillery import flops
from distillery.errors import EvalError, cli
from eval import report

SEEDS = (43, 44)
BASE = {43: {"heldout": 20.0, "ood_a": 40.0, "ood_b": 50.0}, 44: {"heldout": 25.0, "ood_a": 50.0, "ood_b": 40.0}}
# distilled PPL = baseline PPL x factor, so the per-seed change vs the token-matched baseline is (factor - 1) x 100
FACTORS = {
    ("t1", 0.5): {43: {"heldout": 0.95, "ood_a": 0.90, "ood_b": 0.98},
                  44: {"heldout": 0.98, "ood_a": 0.92, "ood_b": 0.98}},
    ("t1", 0.2): {43: {"heldout": 0.99, "ood_a": 0.95, "ood_b": 0.99},
                  44: {"heldout": 1.00, "ood_a": 0.97, "ood_b": 0.99}},
    ("t2", 0.2): {43: {"heldout": 0.97, "ood_a": 0.96, "ood_b": 0.97},
                  44: {"heldout": 0.97, "ood_a": 0.98, "ood_b": 0.96}},
    ("t2", 0.5): {43: {"heldout": 1.01, "ood_a": 0.99, "ood_b": 1.00},
                  44: {"heldout": 1.03, "ood_a": 0.99, "ood_b": 1.00}},
}
# the compute-matched baseline (more tokens, no teacher), matched to t1's alpha = 0.5 runs
CM = {43: {"heldout": 0.95, "ood_a": 0.95, "ood_b": 0.98}, 44: {"heldout": 1.00, "ood_a": 0.92, "ood_b": 1.00}}
TEACHER = {"t1": "teachers/t1/export", "t2": "teachers/t2/export"}
# the config.json of the 'micro' and 'tiny-teacher' presets at V = 512 (written as dicts: no transformers import)
LLAMA = dict(model_type="llama", vocab_size=512, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
MICRO = dict(LLAMA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128)
TINY_TEACHER = dict(LLAMA, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=24, intermediate_size=256)


def write_run(root, name, cfg, ppl, seed, via_final, extra=None, loss_only=False, finished=True):
    d = root / "runs" / "grid" / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"name": f"grid/{name}", "out_dir": "runs", "seed": seed,
                                                   "student": "micro", "train_tokens": 40960, **cfg}))
    recs = [{"step": 1, "loss/total": 6.0, **(extra or {})},
            {"step": 1, **{f"eval/{k}/loss": 9.0 for k in ppl}}]  # an earlier eval: superseded by the last one
    if via_final:
        (d / "eval").mkdir()
        (d / "eval" / "final.json").write_text(json.dumps({"ppl": {k: {"ce": math.log(v), "ppl": v}
                                                                   for k, v in ppl.items()}}))
    else:
        key = "loss" if loss_only else "ppl"
        recs.append({"step": 2, **{f"eval/{k}/{key}": math.log(v) if loss_only else v for k, v in ppl.items()}})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if finished:  # the trainer's marker: the schedule (2 steps here) completed
        (d / "finished.json").write_text(json.dumps({"step": 2, "total_steps": 2, "export_dir": None}))
    return d


def make_grid(root, baseline_entropy=None):
    t1 = root / TEACHER["t1"]
    t1.mkdir(parents=True)
    (t1 / "config.json").write_text(json.dumps(MICRO))
    led = flops.ComputeLedger(MICRO, 64)
    led.add_step(40960)
    flops.write_export_compute(str(t1), led.to_dict())
    t2 = root / TEACHER["t2"]
    t2.mkdir(parents=True)
    (t2 / "config.json").write_text(json.dumps(TINY_TEACHER))
    (t2 / "distillery_config.yaml").write_text(yaml.safe_dump({"train_tokens": 100000, "global_batch_size": 8,
                                                               "seq_len": 64, "max_steps": 0}))
    for s in SEEDS:
        ent = {} if baseline_entropy is None else {"entropy/student": baseline_entropy[s]}
        # seed 43's baseline logged eval losses only: PPL = exp(loss); seed 44's has eval/final.json
        write_run(root, f"alpha0-s{s}", {"alpha": 0.0, "teacher": TEACHER["t1"]}, BASE[s], s, via_final=s == 44,
                  extra=ent, loss_only=True)
        write_run(root, f"cm-t1-s{s}", {"alpha": 0.0, "teacher": TEACHER["t1"], "compute_match": f"grid/t1-a0.5-s{s}",
                                        "train_tokens": 90000},
                  {k: BASE[s][k] * CM[s][k] for k in BASE[s]}, s, via_final=False,
                  extra={"compute/total_flops": 2.0e12})
        for (t, a), f in FACTORS.items():
            extra = {"entropy/student": 3.0 + a + s / 100}
            if t == "t1":
                extra["compute/total_flops"] = 1.0e12
            write_run(root, f"{t}-a{a}-s{s}", {"alpha": a, "teacher": TEACHER[t]},
                      {k: BASE[s][k] * f[s][k] for k in BASE[s]}, s, via_final=s == 43, extra=extra)
    return root / "runs" / "grid"


def rows_of(summary):
    return {(r["reference"], r["teacher"], r["alpha"], r["eval_set"]): r for r in summary["rows"]}


def test_report_numbers_match_hand_computation(tmp_path):
    grid = make_grid(tmp_path)
    out = tmp_path / "rep"
    summary = report.main([str(grid), "--out", str(out)])  # the sweep-style parent dir expands to its runs
    assert len(summary["runs"]) == 12
    got = rows_of(summary)
    t1, t2 = TEACHER["t1"], TEACHER["t2"]
    # (mean, s.e.) with n = 2: mean of the two per-seed changes, s.e. = sample std / sqrt(2) = |c1 - c2| / 2
    want = {
        ("token", t1, 0.5, "heldout"): (-3.5, 1.5),    # seeds: -5 %, -2 %
        ("token", t1, 0.5, "ood_a"): (-9.0, 1.0),      # -10 %, -8 %
        ("token", t1, 0.5, "ood_b"): (-2.0, 0.0),      # -2 %, -2 %
        ("token", t1, 0.5, "ood_mean"): (-5.5, 0.5),   # per seed (-10 - 2) / 2 = -6, (-8 - 2) / 2 = -5
        ("token", t1, 0.2, "heldout"): (-0.5, 0.5),    # -1 %, 0 %
        ("token", t2, 0.2, "heldout"): (-3.0, 0.0),    # -3 %, -3 %
        ("token", t2, 0.2, "ood_mean"): (-3.25, 0.25),  # (-4 - 3) / 2 = -3.5, (-2 - 4) / 2 = -3
        ("token", t2, 0.5, "heldout"): (2.0, 1.0),     # +1 %, +3 %
        # vs the compute-matched baseline: 0.95 / 0.95 - 1 = 0 %, 0.98 / 1.00 - 1 = -2 %
        ("compute", t1, 0.5, "heldout"): (-1.0, 1.0),
        # t1's alpha = 0.2 runs share it (same teacher, student, tokens): (0.99 / 0.95 - 1) x 100 = +4.21 %, 0 %
        ("compute", t1, 0.2, "heldout"): ((0.99 / 0.95 - 1) * 100 / 2, (0.99 / 0.95 - 1) * 100 / 2),
        ("compute", t1, 0.5, "ood_a"): (((0.90 / 0.95 - 1) + 0) * 100 / 2, abs(0.90 / 0.95 - 1) * 100 / 2),
    }
    for k, (m, se) in want.items():
        assert got[k]["ppl_change_pct_mean"] == pytest.approx(m, abs=1e-9), k
        assert got[k]["ppl_change_pct_se"] == pytest.approx(se, abs=1e-9), k
        assert got[k]["n"] == 2 and got[k]["seeds"] == "43 44"
    assert ("compute", t2, 0.5, "heldout") not in got  # nothing compute-matched to teacher t2
    assert got[("token", t1, 0.5, "heldout")]["ppl_mean"] == pytest.approx((20 * 0.95 + 25 * 0.98) / 2)
    # runs that log only total_flops are read from it
    assert got[("compute", t1, 0.5, "heldout")]["flops_mean"] == 1.0e12
    assert got[("compute", t1, 0.5, "heldout")]["ref_flops_mean"] == 2.0e12
    # teachers: micro at V = 512 has 139584 parameters (test_flops.py, by hand); t1's tokens from its
    # distillery_compute.json, t2's from distillery_config.yaml: 100000 // (8 x 64) = 195 whole steps x 512 = 99840
    assert got[("token", t1, 0.5, "heldout")]["teacher_params"] == 139584
    assert got[("token", t1, 0.5, "heldout")]["teacher_tokens"] == 40960
    assert got[("token", t1, 0.5, "heldout")]["teacher_pretrain_flops"] == 40960 * 688128
    assert got[("token", t2, 0.5, "heldout")]["teacher_tokens"] == 99840
    best = summary["best_alpha"]["token"]
    assert best[(t1,)]["heldout"][0] == 0.5 and best[(t2,)]["heldout"][0] == 0.2
    assert best[(t2,)]["ood_mean"] == (0.2, pytest.approx(-3.25))

    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["reference", "teacher", "teacher_name", "alpha", "group", "teacher_params",
                              "teacher_tokens", "teacher_pretrain_flops", "eval_set", "domain", "n", "seeds",
                              "ppl_mean", "ref_ppl_mean", "ppl_change_pct_mean", "ppl_change_pct_se", "flops_mean",
                              "ref_flops_mean"]
    row = next(r for r in table if (r["reference"], r["teacher_name"], r["alpha"], r["eval_set"])
               == ("token", "t1", "0.5", "ood_a"))
    assert float(row["ppl_change_pct_mean"]) == pytest.approx(-9.0) and row["domain"] == "out"
    assert len(table) == len(summary["rows"]) == 4 * 4 + 2 * 4  # 4 groups x (3 sets + ood_mean), 2 compute-matched
    for png in ("ppl_change_token", "ppl_change_compute", "gain_vs_teacher_params", "gain_vs_teacher_tokens",
                "domain_gain"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "-3.50 ± 1.50 (n=2)" in md  # t1, alpha 0.5, heldout vs token-matched
    assert "Skipped for some students: no entropy on the same footing" in md
    assert not (out / "entropy_vs_ppl.png").exists()
    assert summary["unpaired_baselines"] == [] and "pair with no distilled run" not in md


def test_entropy_plot_when_baselines_log_entropy(tmp_path):
    make_grid(tmp_path, baseline_entropy={43: 3.1, 44: 3.2})
    out = tmp_path / "rep"
    summary = report.main(["--glob", str(tmp_path / "runs" / "grid" / "*"), "--out", str(out)])
    st = {(s["group"], s["seed"]): s for s in summary["students"]}
    # distilled entropy 3.0 + alpha + seed / 100 minus the baseline's: t1 alpha 0.5 seed 44: 3.94 - 3.2 = 0.74
    assert st[("t1 a=0.5", 44)]["entropy_change"] == pytest.approx(0.74)
    assert st[("t1 a=0.5", 44)]["change/ood_mean"] == pytest.approx(-5.0)
    assert (out / "entropy_vs_ppl.png").read_bytes()[:4] == b"\x89PNG"


def _write_text_entropy(run, entropies):
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "ppl.json").write_text(json.dumps({"sets": {k: {"ppl": 1.0, "ce": 0.0, "entropy": v}
                                                                for k, v in entropies.items()}}))


def test_text_entropy_preferred_and_table(tmp_path):
    """Entropies on eval text (eval/ppl.json, `eval.ppl --entropy`) win over logged entropy/student when both the
    student and its baseline have them; the table's mean +- s.e. match a hand computation; an alpha = 0 run that
    pairs with nothing (a teacher) is counted apart."""
    grid = make_grid(tmp_path, baseline_entropy={43: 3.1, 44: 3.2})
    for s, hb in ((43, 4.0), (44, 4.2)):
        _write_text_entropy(grid / f"alpha0-s{s}", {"heldout": hb, "ood_a": 9.0})
        _write_text_entropy(grid / f"t1-a0.5-s{s}", {"heldout": hb + (0.3 if s == 43 else 0.1)})
    write_run(tmp_path, "teacher", {"alpha": 0.0, "student": "tiny-teacher"}, BASE[43], 42, via_final=True)
    out = tmp_path / "rep"
    summary = report.main([str(grid), "--out", str(out)])
    st = {(s["group"], s["seed"]): s for s in summary["students"]}
    assert st[("t1 a=0.5", 43)]["entropy_change"] == pytest.approx(0.3)
    assert st[("t1 a=0.5", 43)]["entropy_source"] == "heldout text (eval/ppl.json)"
    # t1 alpha 0.2 has no eval/ppl.json: both runs' logged entropies (3.0 + 0.2 + 0.43 - 3.1)
    assert st[("t1 a=0.2", 43)]["entropy_change"] == pytest.approx(0.53)
    assert st[("t1 a=0.2", 43)]["entropy_source"] == "training batches (last entropy/student)"
    ent = {e["group"]: e for e in summary["entropy"]}
    assert ent["t1 a=0.5"]["entropy_change_mean"] == pytest.approx(0.2)      # (0.3 + 0.1) / 2
    assert ent["t1 a=0.5"]["entropy_change_se"] == pytest.approx(0.1)        # |0.3 - 0.1| / 2
    assert ent["t1 a=0.5"]["baseline_entropy_mean"] == pytest.approx(4.1)
    assert summary["unpaired_baselines"] == [str(tmp_path / "runs" / "grid" / "teacher")]
    md = (out / "report.md").read_text()
    assert "+0.2000 ± 0.1000 (n=2)" in md and "1 of the alpha = 0 runs pair with no distilled run" in md
    with open(out / "students.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert float(rows["grid/alpha0-s44"]["entropy/heldout"]) == 4.2 and rows["grid/t1-a0.2-s43"]["entropy/ood_a"] == ""
    (grid / "alpha0-s43" / "eval" / "ppl.json").write_text("{not json")
    with pytest.raises(EvalError, match="is not an eval.ppl JSON"):
        report.main([str(grid), "--out", str(out)])


def test_flops_compare_like_with_like(tmp_path):
    """The FLOPs columns show run FLOPs (student + teacher forward: what compute_match equals), not total_flops with
    the teacher's amortised pretraining, unless the compute-matched baseline set compute_match_pretrain."""
    grid = make_grid(tmp_path)
    for s in SEEDS:
        for run, run_f, total_f in ((f"t1-a0.5-s{s}", 1.0e12, 1.5e12), (f"cm-t1-s{s}", 1.0e12, 1.0e12)):
            with open(grid / run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 3, "compute/run_flops": run_f, "compute/total_flops": total_f}) + "\n")
    got = rows_of(report.main([str(grid), "--out", str(tmp_path / "rep")]))
    r = got[("compute", TEACHER["t1"], 0.5, "heldout")]
    assert (r["flops_kind"], r["flops_mean"], r["ref_flops_mean"]) == ("run_flops", 1.0e12, 1.0e12)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "1e+12 / 1e+12 (baseline 1.000x)" in md and "(`compute/run_flops`)" in md
    for s in SEEDS:
        cfg = yaml.safe_load((grid / f"cm-t1-s{s}" / "config.yaml").read_text())
        (grid / f"cm-t1-s{s}" / "config.yaml").write_text(yaml.safe_dump({**cfg, "compute_match_pretrain": True}))
    r = rows_of(report.main([str(grid), "--out", str(tmp_path / "rep")]))[("compute", TEACHER["t1"], 0.5, "heldout")]
    assert (r["flops_kind"], r["flops_mean"], r["ref_flops_mean"]) == ("flops", 1.5e12, 1.0e12)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(EvalError, match="matches no directory"):
        report.main(["--glob", str(tmp_path / "nothing-*"), "--out", str(tmp_path / "o")])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("alpha: 0.5\n")
    with pytest.raises(SystemExit) as e:
        cli(report.main, [str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "has no metrics.jsonl" in err
    with pytest.raises(EvalError, match="no distilled run"):
        grid = make_grid(tmp_path / "g")
        report.main([str(grid / "alpha0-s43"), "--out", str(tmp_path / "o")])
    # the same distilled point twice for one seed cannot be paired: the error names the differing key
    dup = write_run(tmp_path / "g", "t1-a0.5-s43-T2", {"alpha": 0.5, "teacher": TEACHER["t1"], "temperature": 2.0},
                    BASE[43], 43, via_final=False)
    with pytest.raises(EvalError, match="differ in temperature: add --by"):
        report.main([str(grid), "--out", str(tmp_path / "o")])
    summary = report.main([str(grid), "--by", "temperature", "--out", str(tmp_path / "o")])
    assert any(r["group"] == "t1 a=0.5 temperature=2.0" for r in summary["rows"]) and dup.is_dir()


def _edit(path, **kv):
    cfg = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**cfg, **kv}))


def test_only_finished_runs_count_and_pairs_share_every_run_defining_key(tmp_path):
    """Issue 20, items 4 and 5: a run stopped by max_steps before its schedule's end (no finished.json) is left out,
    with a note, not read as the run's final numbers; a run from before the marker counts when metrics.jsonl reaches
    the schedule's last step. A baseline pairs only when it shares every run-defining key but the distillation's own
    (data, seq_len, global_batch_size, doc_mask, ...) and the evaluation (eval data, window): another one is named in
    the notes with what differs."""
    grid = make_grid(tmp_path)
    for d in grid.iterdir():  # a schedule of 2 steps: 40960 tokens / (320 rows x 64)
        _edit(d / "config.yaml", global_batch_size=320, seq_len=64)
    (grid / "t1-a0.5-s44" / "finished.json").unlink()            # stopped by max_steps after step 1 of 2
    (grid / "t1-a0.2-s44" / "finished.json").unlink()            # finished before the marker existed
    with open(grid / "t1-a0.2-s44" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss/total": 5.0}) + "\n")
    summary = report.main([str(grid), "--out", str(tmp_path / "rep")])
    got, notes = rows_of(summary), " ".join(summary["notes"])
    assert "t1-a0.5-s44: not finished (no finished.json; stopped at step 1 of 2): left out" in notes
    assert "no finished.json (runs from before the marker), taken as finished because metrics.jsonl reaches the " \
           f"schedule's last step: {grid / 't1-a0.2-s44'}" in notes
    assert got[("token", TEACHER["t1"], 0.5, "heldout")]["seeds"] == "43"
    assert got[("token", TEACHER["t1"], 0.2, "heldout")]["seeds"] == "43 44"
    # seed 43's baseline trained on other data, with document masking off: nothing of seed 43 pairs with it
    _edit(grid / "alpha0-s43" / "config.yaml", data="data/other", doc_mask=False)
    summary = report.main([str(grid), "--out", str(tmp_path / "rep")])
    got, notes = rows_of(summary), " ".join(summary["notes"])
    assert got[("token", TEACHER["t2"], 0.2, "heldout")]["seeds"] == "44"
    assert "the nearest, " + str(grid / "alpha0-s43") + ", differs in data, doc_mask" in notes
    _edit(grid / "alpha0-s43" / "config.yaml", data=None, doc_mask=None)
    # seed 44's baseline was evaluated with a longer window (its eval/final.json says so): not comparable
    fj = grid / "alpha0-s44" / "eval" / "final.json"
    fj.write_text(json.dumps({**json.loads(fj.read_text()), "window": 128}))
    summary = report.main([str(grid), "--out", str(tmp_path / "rep")])
    assert rows_of(summary)[("token", TEACHER["t2"], 0.2, "heldout")]["seeds"] == "43"
    assert "differs in eval_window" in " ".join(summary["notes"])
