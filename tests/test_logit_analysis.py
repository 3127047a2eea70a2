"""eval/logit_analysis.py against an independent float64 numpy computation on a tiny student/baseline/teacher trio."""
import json
import math

import numpy as np
import pytest
import torch

from eval import logit_analysis as LA
import harness as T

V = 264
W, NW = 24, 3


@pytest.fixture(scope="module")
def trio():
    student = T.tiny_llama(seed=11, vocab_size=V, hidden=32, scale=0.6)
    baseline = T.tiny_llama(seed=12, vocab_size=V, hidden=32, scale=1.5)
    teacher = T.tiny_llama(seed=13, vocab_size=V + 8, hidden=48)  # padded vocab: compared on the shared V
    toks = np.random.default_rng(0).integers(0, V, NW * W + 5)
    return student, baseline, teacher, toks


def reference(models, toks, bins):
    """Float64 numpy, token by token, from float64 copies of the models."""
    logits = []
    wins = toks[: NW * W].reshape(NW, W)
    for m in models:
        m64 = T.tiny_llama(seed=0, vocab_size=m.config.vocab_size, hidden=m.config.hidden_size).double()
        m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        with torch.no_grad():
            z = m64(input_ids=torch.tensor(wins)).logits[:, :-1, :V].reshape(-1, V).numpy()
        logits.append(z)
    y = wins[:, 1:].reshape(-1)
    rows = []
    for i in range(len(y)):
        p = {}
        for k, z in zip("sbt", logits):
            e = np.exp(z[i] - z[i].max())
            p[k] = e / e.sum()
        r = {f"H_{k}": -np.sum(p[k] * np.log(p[k])) for k in "sbt"}
        r.update({f"nll_{k}": -math.log(p[k][y[i]]) for k in "sbt"})
        r.update({f"ok_{k}": float(np.argmax(p[k]) == y[i]) for k in "sbt"})
        for name, (a, b) in (("teacher", ("t", "s")), ("baseline", ("b", "s")), ("bt", ("t", "b"))):
            kl_ab = np.sum(p[a] * np.log(p[a] / p[b]))
            kl_ba = np.sum(p[b] * np.log(p[b] / p[a]))
            m = (p[a] + p[b]) / 2
            js = 0.5 * np.sum(p[a] * np.log(p[a] / m)) + 0.5 * np.sum(p[b] * np.log(p[b] / m))
            t5a, t5b = set(np.argsort(-p[a])[:5]), set(np.argsort(-p[b])[:5])
            r.update({f"fwd_{name}": kl_ab, f"rev_{name}": kl_ba, f"js_{name}": js,
                      f"top1_{name}": float(np.argmax(p[a]) == np.argmax(p[b])), f"top5_{name}": len(t5a & t5b) / 5})
        rows.append(r)

    def agg(rs):
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        ppl = {k: math.exp(mean(f"nll_{k}")) for k in "sbt"}
        only_t = [r for r in rs if r["ok_t"] == 1 and r["ok_b"] == 0]
        only_b = [r for r in rs if r["ok_b"] == 1 and r["ok_t"] == 0]
        return {"n": len(rs), "H": {k: mean(f"H_{k}") for k in "sbt"}, "ppl": ppl,
                "ppl_change": (ppl["s"] - ppl["b"]) / ppl["b"] * 100,
                "acc": {k: mean(f"ok_{k}") for k in "sbt"},
                "only_t": len(only_t) / len(rs), "only_b": len(only_b) / len(rs),
                "s_given_only_t": (sum(r["ok_s"] for r in only_t) / len(only_t)) if only_t else None,
                **{f"{a}_{n}": mean(f"{a}_{n}") for a in ("fwd", "rev", "js", "top1", "top5")
                   for n in ("teacher", "baseline", "bt")}}

    full = agg(rows)
    ranked = sorted(range(len(rows)), key=lambda i: (rows[i]["H_b"], i))
    size, extra = divmod(len(rows), bins)
    groups, a = [], 0
    for b in range(bins):
        n = size + (1 if b < extra else 0)
        groups.append([rows[i] for i in ranked[a:a + n]])
        a += n
    return full, [agg(g) for g in groups]


def check_block(got, want, rel=2e-4):
    assert got["tokens"] == want["n"]
    for m, k in (("student", "s"), ("baseline", "b"), ("teacher", "t")):
        assert got["entropy"][m] == pytest.approx(want["H"][k], rel=rel)
        assert got["ppl"][m] == pytest.approx(want["ppl"][k], rel=rel)
        assert got["accuracy"][m] == pytest.approx(want["acc"][k], abs=1e-12)
    assert got["entropy"]["student_minus_baseline"] == pytest.approx(want["H"]["s"] - want["H"]["b"], rel=rel, abs=1e-5)
    assert got["ppl"]["student_change_pct_vs_baseline"] == pytest.approx(want["ppl_change"], rel=rel, abs=1e-4)
    assert got["exclusive"]["only_teacher_correct"] == pytest.approx(want["only_t"], abs=1e-12)
    assert got["exclusive"]["only_baseline_correct"] == pytest.approx(want["only_b"], abs=1e-12)
    if want["s_given_only_t"] is not None:
        assert got["exclusive"]["student_correct_when_only_teacher"] == pytest.approx(want["s_given_only_t"])
    for key, name, fwd, rev in (("vs_teacher", "teacher", "kl_teacher_student", "kl_student_teacher"),
                                ("vs_baseline", "baseline", "kl_baseline_student", "kl_student_baseline"),
                                ("baseline_vs_teacher", "bt", "kl_teacher_baseline", "kl_baseline_teacher")):
        assert got[key][fwd] == pytest.approx(want[f"fwd_{name}"], rel=rel, abs=1e-6)
        assert got[key][rev] == pytest.approx(want[f"rev_{name}"], rel=rel, abs=1e-6)
        assert got[key]["js"] == pytest.approx(want[f"js_{name}"], rel=rel, abs=1e-6)
        assert got[key]["top1_agreement"] == pytest.approx(want[f"top1_{name}"], abs=1e-12)
        assert got[key]["top5_overlap"] == pytest.approx(want[f"top5_{name}"], abs=1e-12)


def test_matches_independent_reference(trio):
    student, baseline, teacher, toks = trio
    got = LA.analyze(student, baseline, teacher, toks, window=W, max_windows=256, bins=4)
    full, bins = reference((student, baseline, teacher), toks, 4)
    assert got["windows"] == NW and got["tokens"] == NW * (W - 1)
    check_block(got, full)
    assert len(got["entropy_bins"]) == 4
    for g, w in zip(got["entropy_bins"], bins):
        check_block(g, w)
    # bins are ordered by baseline entropy and partition the tokens
    assert sum(b["tokens"] for b in got["entropy_bins"]) == got["tokens"]
    los = [b["baseline_entropy_range"][0] for b in got["entropy_bins"]]
    assert los == sorted(los)
    # the trio was built to differ: the sanity of the fixture itself
    assert got["entropy"]["student"] > got["entropy"]["baseline"]
    assert got["vs_teacher"]["kl_teacher_student"] > 0 and got["vs_teacher"]["js"] <= math.log(2)


def test_identical_models_give_zero_divergence(trio):
    student, _, _, toks = trio
    got = LA.analyze(student, student, student, toks, window=W, max_windows=2, bins=2)
    assert got["tokens"] == 2 * (W - 1)
    assert got["vs_teacher"]["kl_teacher_student"] == pytest.approx(0, abs=1e-6)
    assert got["vs_baseline"]["js"] == pytest.approx(0, abs=1e-6)
    assert got["vs_teacher"]["top1_agreement"] == 1 and got["vs_teacher"]["top5_overlap"] == 1
    assert got["ppl"]["student_change_pct_vs_baseline"] == pytest.approx(0, abs=1e-9)
    assert got["exclusive"]["only_teacher_correct"] == 0 and got["exclusive"]["only_baseline_correct"] == 0


def test_cli_json_and_plot(trio, tmp_path):
    student, baseline, teacher, toks = trio
    tok = T.tiny_tokenizer(vocab_size=V)
    assert len(tok) == V
    data = T.write_stream_data(str(tmp_path / "data"), {"wiki": toks}, tok)
    dirs = {}
    for name, m in (("student", student), ("baseline", baseline), ("teacher", teacher)):
        dirs[name] = T.save_model(m, str(tmp_path / name), tok)
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    LA.main(["--student", dirs["student"], "--baseline", dirs["baseline"], "--teacher", dirs["teacher"],
             "--data", data, "--set", "wiki", "--window", str(W), "--bins", "3", "--out", str(out),
             "--plot", str(png)])
    got = json.load(open(out))
    full, _ = reference((student, baseline, teacher), toks, 3)
    check_block(got, full)
    assert len(got["entropy_bins"]) == 3 and got["set"] == "wiki"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
