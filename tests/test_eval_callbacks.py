"""Eval callbacks (plugins/eval_downstream.py, plugins/eval_final.py) and the live ZeRO-3 paths: a 2-rank CPU ZeRO-3
run evaluated in the loop must give the numbers its exported checkpoint gives standalone."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import plugins
from distillery import shards
from eval import common, downstream, ppl
import harness as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC = [{"query": f"Question {i}: what is {i} plus {i}?\nAnswer:", "choices": [str(2 * i), str(i), "water" * (i % 3 + 1)]
       [: 2 + i % 2], "gold": i % 2} for i in range(7)]  # 7 documents, 2 or 3 choices: uneven over 2 ranks


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value

    def flush(self):
        pass


class FakeEngine:
    """The trainer's engine surface the callbacks use, over the trainer's real root module (StudentWithLoss):
    engine(input_ids=, targets=, w_ce=, w_kd=, impl=) -> dict, engine.module (with .lm), engine.device."""

    def __init__(self, model):
        from distillery.engines import StudentWithLoss
        self.module = StudentWithLoss(model)
        self.device = torch.device("cpu")

    def __call__(self, **kw):
        return self.module(**kw)


def trainer_cfg(data, **extra):
    """The trainer's typed config with the eval settings the callbacks read."""
    from distillery.config import Config
    return Config(**{**dict(data=data, eval_sets=["a", "b"], eval_window=32, eval_max_windows=4, eval_batch_size=2,
                            loss_impl="plain", loss_chunk_size=1024), **extra})


def run_ctx(cfg, engine, run_dir, names, writer=None):
    """The callbacks named in `names` built as the trainer builds them (options from cfg.callback_args), with the
    Context they get, its log() bound as in the trainer (metrics.jsonl in run_dir)."""
    from plugins.base import Callbacks, Context
    cbs = Callbacks.build(names, cfg.callback_args)
    ctx = Context(cfg=cfg, engine=engine, run_dir=str(run_dir), writer=writer or FakeWriter(), end_step=5,
                  total_steps=5)
    return cbs, cbs.bind(ctx, metrics_path=os.path.join(str(run_dir), "metrics.jsonl"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cb")
    tok = T.tiny_tokenizer()
    model = T.tiny_llama(seed=7, vocab_size=len(tok), max_pos=128)
    rng = np.random.default_rng(4)
    data = T.write_stream_data(str(d / "data"), {"a": rng.integers(0, len(tok), 5 * 32 + 11),
                                                  "b": rng.integers(0, len(tok), 3 * 32)}, tok)
    mc = d / "eval_mc.jsonl"
    mc.write_text("".join(json.dumps(x) + "\n" for x in MC))
    return {"tok": tok, "model": model, "data": data, "mc": str(mc), "dir": d}


def test_registered():
    assert plugins.get("callback", "eval_final").__name__ == "EvalFinal"
    assert plugins.get("callback", "eval_downstream").__name__ == "EvalDownstream"


def test_eval_final_single_process(env, tmp_path):
    cfg = trainer_cfg(env["data"])
    w, metrics = FakeWriter(), {}
    engine = FakeEngine(env["model"])
    engine.module.train()
    cbs, ctx = run_ctx(cfg, engine, tmp_path, ["eval_final", "tensorboard"], w)
    cb = cbs.items[0]
    cbs("on_eval", ctx, step=3, results={"eval/a/loss": 1.0, "eval/a/ppl": math.e})
    cbs("on_train_end", ctx, step=5, export_dir="x", metrics=metrics)
    ctx.log(5, metrics)  # what the trainer does with the end-of-run metrics
    assert engine.module.training  # restored
    out = json.load(open(tmp_path / "eval" / "final.json"))
    assert out["source"] == "computed" and out["export_dir"] == "x"
    want = {}
    for name in ("a", "b"):
        want[name] = ppl.windowed_eval(ppl.hf_loss_fn(env["model"]), shards.load_stream(env["data"], name), 32, 4)
        assert out["ppl"][name]["ppl"] == pytest.approx(want[name]["ppl"], rel=1e-6)
        assert out["ppl"][name]["windows"] == min(4, {"a": 5, "b": 3}[name])
        assert w.scalars[(f"final/{name}/ppl", 5)] == pytest.approx(want[name]["ppl"], rel=1e-6)
        assert metrics[f"final/{name}/ppl"] == out["ppl"][name]["ppl"]
    assert out["window"] == 32 and out["step"] == 5 and out["last_in_loop_eval"]["step"] == 3
    assert cb.result == out
    # the trainer's own eval at the final step, same sets and window: reused, no second pass
    cbs2, ctx2 = run_ctx(cfg, engine, tmp_path / "r2", ["eval_final"])
    cbs2("on_eval", ctx2, step=5, results={f"eval/{n}/loss": want[n]["ce"] for n in want})
    cbs2("on_train_end", ctx2, step=5, export_dir=None, metrics={})
    r2 = cbs2.items[0].result
    assert r2["source"] == "in_loop_eval"
    for n in want:
        assert r2["ppl"][n] == pytest.approx(want[n])
    # options from the config (callback_args) override the trainer's eval settings
    cfg3 = trainer_cfg(env["data"], callbacks=["eval_final"],
                       callback_args={"eval_final": {"sets": ["b"], "window": 16, "path": "eval/f16.json"}})
    cbs3, ctx3 = run_ctx(cfg3, engine, tmp_path, ["eval_final"])
    cbs3("on_train_end", ctx3, step=5, export_dir=None, metrics={})
    r3 = cbs3.items[0].result
    assert list(r3["ppl"]) == ["b"] and r3["ppl"]["b"]["windows"] == 4 and r3["window"] == 16
    assert (tmp_path / "eval" / "f16.json").exists()
    cbs4, ctx4 = run_ctx(trainer_cfg(env["data"], callback_args={"eval_final": {"data": str(tmp_path / "none")}}),
                         engine, tmp_path, ["eval_final"])
    with pytest.raises(common.EvalError, match="no data dir"):
        cbs4("on_train_end", ctx4, step=5, export_dir=None, metrics={})
    with pytest.raises(ValueError, match="unknown option"):
        plugins.get("callback", "eval_final")(windw=3)


def test_eval_final_needs_the_finished_schedule_and_the_same_eval_to_reuse(env, tmp_path, capsys):
    """Issue 20, items 4 and 5: a run stopped by max_steps before its schedule's end writes no eval/final.json (its
    model is not the final one) and says so; the in-loop numbers are reused only when they measured the same eval
    data (a resume=auto rerun with another eval_data used to get the old numbers under the new label), window and
    window cap."""
    engine = FakeEngine(env["model"])
    cbs, ctx = run_ctx(trainer_cfg(env["data"]), engine, tmp_path / "stopped", ["eval_final"])
    assert cbs("on_train_end", ctx, step=2, export_dir=None, metrics={}) is None
    assert not (tmp_path / "stopped" / "eval" / "final.json").exists() and cbs.items[0].result is None
    assert "eval_final: skipped: the run stopped at step 2 of 5" in capsys.readouterr().out
    # the in-loop eval measured other data (same set names): recomputed on the data asked for
    rng = np.random.default_rng(5)
    other = T.write_stream_data(str(tmp_path / "other"), {"a": rng.integers(0, len(env["tok"]), 5 * 32),
                                                          "b": rng.integers(0, len(env["tok"]), 3 * 32)}, env["tok"])
    cbs, ctx = run_ctx(trainer_cfg(env["data"]), engine, tmp_path / "r", ["eval_final"])
    cbs("on_eval", ctx, step=5, results={"eval/a/loss": 1.0, "eval/b/loss": 1.0})
    state = cbs.state_dict()  # what the checkpoint holds
    for cfg, want in ((trainer_cfg(env["data"], eval_data=other), "computed"),
                      (trainer_cfg(env["data"], eval_max_windows=3), "computed"),
                      (trainer_cfg(env["data"]), "in_loop_eval")):
        cbs, ctx = run_ctx(cfg, engine, tmp_path / "r", ["eval_final"])
        cbs.load_state_dict(state)  # resume=auto: the callbacks' state comes back from the checkpoint
        cbs("on_train_end", ctx, step=5, export_dir=None, metrics={})
        got = cbs.items[0].result
        assert got["source"] == want and got["data"] == (cfg.eval_data or cfg.data), (cfg, got["source"])
        if want == "computed":
            assert got["ppl"]["a"]["ce"] != 1.0


def test_eval_downstream_single_process(env, tmp_path):
    cls = plugins.get("callback", "eval_downstream")
    with pytest.raises(ValueError, match="needs tasks"):
        cls()
    # options from the run config's callback_args, as the trainer passes them
    local = {"mc": {"path": env["mc"], "metric": "acc_norm"}}
    cbs, _ = run_ctx(trainer_cfg(env["data"], callback_args={"eval_downstream": {"steps": [2], "every": 5,
                                                                                   "local": local}}),
                     FakeEngine(env["model"]), tmp_path / "unused", ["eval_downstream"])
    assert [s for s in range(12) if cbs.items[0].due(s)] == [2, 5, 10]
    cfg = trainer_cfg(env["data"], callback_args={"eval_downstream": {"steps": [2], "local": local, "batch_size": 3}})
    w, metrics = FakeWriter(), {}
    cbs, ctx = run_ctx(cfg, FakeEngine(env["model"]), tmp_path, ["eval_downstream", "tensorboard"], w)
    for step in (1, 2, 3):
        cbs("on_step_end", ctx, step=step, metrics=metrics, diag={})
    want = downstream.evaluate_local(downstream.scorer_from_model(env["model"], env["tok"]), env["mc"])
    assert metrics["downstream/mc"] == pytest.approx(want["acc_norm"])
    assert w.scalars[("downstream/mc/acc", 2)] == pytest.approx(want["acc"])
    assert not any(step != 2 for _, step in w.scalars)
    lines = open(tmp_path / "eval" / "downstream.jsonl").read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 2 and json.loads(lines[0])["strategy"] == "lockstep"
    # the history is the callback's state: a resumed run's callback continues with it
    fresh = cls(steps=[2], local=local)
    fresh.load_state_dict(cbs.items[0].state_dict())
    assert [h["step"] for h in fresh.history] == [2]


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(path)
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def test_zero3_two_ranks_in_loop_equals_exported_standalone(env, tmp_path):
    """2 CPU ranks, ZeRO-3 (parameters partitioned), windows that do not divide evenly (5 windows of set a, batch 2),
    an odd number of multiple-choice documents: everything finishes, every rank has the same numbers, and they equal
    (a) one process on the same weights and (b) `eval.ppl` / the built-in scorer on the exported checkpoint."""
    mdir = T.save_model(env["model"], str(tmp_path / "model"), env["tok"])
    do = ["ppl", "mc_lockstep", "mc_gathered", "callbacks", "export"]
    job = {"model": mdir, "data": env["data"], "sets": ["a", "b"], "window": 32, "max_windows": 256, "batch_size": 2,
           "mc": env["mc"], "do": do, "export": str(tmp_path / "run" / "export"), "run_dir": str(tmp_path / "run"),
           "out": str(tmp_path / "out")}
    try:
        import lm_eval  # noqa: F401
        inc = downstream.write_harness_task("eval_z3_mc", env["mc"], str(tmp_path / "tasks"))
        job.update(task="eval_z3_mc", include_path=inc)
        do.append("harness")
    except ImportError:
        pass
    (tmp_path / "job.json").write_text(json.dumps(job))
    try:
        r = subprocess.run([sys.executable, "tests/harness.py", str(tmp_path / "job.json")], cwd=ROOT,
                           capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("2-rank ZeRO-3 evaluation hung")
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.load(open(tmp_path / "out" / f"rank{i}.json")) for i in range(2)]
    assert all(x["partitioned"] for x in res)
    assert res[0]["ppl"] == res[1]["ppl"]
    # (a) one process, same weights
    for name in ("a", "b"):
        want = ppl.windowed_eval(ppl.hf_loss_fn(env["model"]), shards.load_stream(env["data"], name), 32, 256)
        assert res[0]["ppl"][name]["windows"] == {"a": 5, "b": 3}[name]
        assert res[0]["ppl"][name]["targets"] == want["targets"]
        assert res[0]["ppl"][name]["ce"] == pytest.approx(want["ce"], rel=1e-5)
    # (b) the exported checkpoint, standalone, as a run directory (export/ + config.yaml)
    (tmp_path / "run" / "config.yaml").write_text(f"data: {env['data']}\n")
    alone = ppl.main(["--model", str(tmp_path / "run"), "--sets", "a", "b", "--window", "32"])
    final = json.load(open(tmp_path / "run" / "eval" / "final.json"))
    for name in ("a", "b"):
        assert final["ppl"][name]["targets"] == alone["sets"][name]["targets"]
        assert final["ppl"][name]["ppl"] == pytest.approx(alone["sets"][name]["ppl"], rel=1e-5)
        assert res[0]["callback_metrics"][f"final/{name}/ppl"] == final["ppl"][name]["ppl"]
    # downstream: lockstep (equal forward counts) and gathered copy, both equal to the exported model standalone
    sc = downstream.scorer_from_dir(str(tmp_path / "run"))
    single = downstream.evaluate_local(sc, env["mc"])
    for strategy in ("lockstep", "gathered"):
        a, b = res[0][f"mc_{strategy}"], res[1][f"mc_{strategy}"]
        assert a["strategy"] == strategy and a["n"] == len(MC)
        assert a["acc"] == b["acc"] == single["acc"] and a["acc_norm"] == b["acc_norm"] == single["acc_norm"]
        for x, y in zip(a["loglikelihoods"], single["loglikelihoods"]):
            assert x == pytest.approx(y, rel=1e-5, abs=1e-5)
    assert res[0]["mc_lockstep"]["forwards"] == res[1]["mc_lockstep"]["forwards"]
    assert res[0]["callback_metrics"]["downstream/mc"] == pytest.approx(single["acc_norm"])
    rec = [json.loads(x) for x in open(tmp_path / "run" / "eval" / "downstream.jsonl")]
    assert [x["step"] for x in rec] == [2] and rec[0]["tasks"]["mc"]["value"] == pytest.approx(single["acc_norm"])
    if "harness" in do:
        for x in res:
            assert x["harness"]["eval_z3_mc"]["all"]["acc"] == pytest.approx(single["acc"])
            assert x["harness"]["eval_z3_mc"]["all"]["acc_norm"] == pytest.approx(single["acc_norm"])
            assert x["harness"]["_strategy"] == "lockstep"
        assert res[0]["harness_forwards"] == res[1]["harness_forwards"]
    # TensorBoard on rank 0
    ev = _events(str(tmp_path / "run" / "tb"))
    assert ev["downstream/mc/acc_norm"] == [(2, pytest.approx(single["acc_norm"]))]
    assert ev["final/a/ppl"][0][1] == pytest.approx(final["ppl"]["a"]["ppl"], rel=1e-6)
    assert torch.isfinite(torch.tensor(final["ppl"]["a"]["ce"]))
