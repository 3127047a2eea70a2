"""Windowed perplexity (eval/ppl.py) against hand computations in float64."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distillery import shards
from eval import common, ppl
import harness as T


def test_make_windows_edges():
    toks = np.arange(10 * 4 + 3)
    w = ppl.make_windows(toks, 10, 256)
    assert w.shape == (4, 10)  # the 3-token tail is dropped
    assert w[-1, -1] == 39 and w[0, 0] == 0
    assert ppl.make_windows(toks, 10, 2).shape == (2, 10)  # at most max_windows, from the start
    assert ppl.make_windows(np.arange(10), 10, 256).shape == (1, 10)  # exactly one window
    with pytest.raises(ValueError, match="fewer than one window"):
        ppl.make_windows(np.arange(9), 10, 256)


@pytest.fixture(scope="module")
def tiny():
    tok = T.tiny_tokenizer()
    model = T.tiny_llama(seed=1, vocab_size=len(tok))
    return tok, model


def hand_ppl(model, tokens, window, max_windows):
    """Independent reference: a float64 copy of the model, each full window scored on its own, every token after the
    first a target, NLL from an explicit log-softmax; partial tail dropped; PPL = exp(total NLL / total targets)."""
    m64 = T.tiny_llama(seed=0, vocab_size=model.config.vocab_size).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    n_win = min(len(tokens) // window, max_windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_win):
            w = torch.tensor(np.asarray(tokens[i * window:(i + 1) * window], dtype=np.int64))[None]
            logits = m64(input_ids=w).logits[0]
            logp = logits - torch.logsumexp(logits, -1, keepdim=True)
            for t in range(1, window):
                nll -= logp[t - 1, w[0, t]].item()
                count += 1
    return math.exp(nll / count), count


def test_matches_hand_computation(tiny):
    tok, model = tiny
    rng = np.random.default_rng(0)
    W = 32
    toks = rng.integers(0, len(tok), 3 * W + 7)  # 3 full windows and a partial one
    for max_windows, bs in ((256, 1), (256, 2), (2, 1)):
        want, n = hand_ppl(model, toks, W, max_windows)
        got = ppl.windowed_eval(ppl.hf_loss_fn(model), toks, W, max_windows, batch_size=bs)
        assert got["targets"] == n == min(3, max_windows) * (W - 1)
        assert got["windows"] == min(3, max_windows)
        assert got["ppl"] == pytest.approx(want, rel=1e-5)
        assert ppl.windowed_ce(ppl.hf_loss_fn(model), toks, W, max_windows, bs) == pytest.approx(math.log(want),
                                                                                                 rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        ppl.windowed_eval(ppl.hf_loss_fn(model), toks[:W - 1], W, 256)


def test_entropy_matches_float64(tiny):
    """--entropy: the mean of H(p) = -sum p log p over the same targets as the PPL, against a float64 copy scored
    window by window; asking for it leaves ce/ppl unchanged; without it there is no 'entropy' key."""
    tok, model = tiny
    W = 32
    toks = np.random.default_rng(3).integers(0, len(tok), 3 * W + 5)
    m64 = T.tiny_llama(seed=0, vocab_size=model.config.vocab_size).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    h, count = 0.0, 0
    with torch.no_grad():
        for i in range(3):
            logp = torch.log_softmax(m64(input_ids=torch.tensor(toks[i * W:(i + 1) * W])[None]).logits[0], -1)
            h -= (logp.exp() * logp).sum(-1)[:W - 1].sum().item()     # positions 0..W-2 predict tokens 1..W-1
            count += W - 1
    plain = ppl.windowed_eval(ppl.hf_loss_fn(model), toks, W, 256, batch_size=2)
    got = ppl.windowed_eval(ppl.hf_loss_fn(model, entropy=True), toks, W, 256, batch_size=2)
    assert "entropy" not in plain and got["targets"] == count
    assert got["entropy"] == pytest.approx(h / count, rel=1e-5)
    assert got["ce"] == plain["ce"] and got["ppl"] == plain["ppl"]


def test_engine_loss_fn_same_targets(tiny):
    """The trainer's engine interface (input = window[:-1], targets = window[1:]) gives the same numbers as feeding
    whole windows to the Hugging Face model."""
    tok, model = tiny
    toks = np.random.default_rng(1).integers(0, len(tok), 4 * 24)
    a = ppl.windowed_eval(ppl.hf_loss_fn(model), toks, 24, 256, 2)
    b = ppl.windowed_eval(ppl.engine_loss_fn(T.make_wrapper(model)), toks, 24, 256, 2)
    assert a["targets"] == b["targets"] == 4 * 23
    assert b["ce"] == pytest.approx(a["ce"], rel=1e-6)


def _bigram_loss_fn(table, calls):
    """A pure-torch 'model' (log-prob table [V, V]) whose every forward is also a collective, like a ZeRO-3 forward:
    ranks running different numbers of forwards would hang or mismatch."""
    def fn(x):
        calls.append(x.shape[0])
        if dist.is_initialized():
            t = torch.ones(1)
            dist.all_reduce(t)
        logp = table[x[:, :-1]]
        return -logp.gather(-1, x[:, 1:, None]).sum(), x[:, 1:].numel()
    return fn


def _two_rank_worker(rank, world, init, toks, table, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []
    r = ppl.windowed_eval(_bigram_loss_fn(table, calls), toks, 8, 256, batch_size=2, rank=rank, world=world)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"res": r, "calls": len(calls)}, f)
    dist.destroy_process_group()


def test_two_ranks_uneven_windows_equal_one_rank(tmp_path):
    V, W = 11, 8
    g = torch.Generator().manual_seed(0)
    table = torch.log_softmax(torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    toks = np.random.default_rng(2).integers(0, V, 7 * W + 3)  # 7 windows: rank 0 gets 4 (2 batches), rank 1 gets 3
    # independent reference in float64
    wins = toks[: 7 * W].reshape(7, W)
    nll = -sum(table[wins[i, t - 1], wins[i, t]].item() for i in range(7) for t in range(1, W))
    want = nll / (7 * (W - 1))
    one = ppl.windowed_eval(_bigram_loss_fn(table, []), toks, W, 256, batch_size=2)
    assert one["ce"] == pytest.approx(want, rel=1e-12)
    ctx = torch.multiprocessing.get_context("spawn")
    init = f"file://{tmp_path}/pg"
    procs = [ctx.Process(target=_two_rank_worker, args=(r, 2, init, toks, table, str(tmp_path / "res")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("2-rank windowed_eval hung")
        assert p.exitcode == 0
    res = [json.load(open(tmp_path / f"res.{r}")) for r in range(2)]
    assert res[0]["calls"] == res[1]["calls"] == 2  # rank 1 ran one dummy forward
    for r in res:
        assert r["res"]["ce"] == pytest.approx(want, rel=1e-12)
        assert r["res"]["targets"] == 7 * (W - 1) and r["res"]["windows"] == 7


def test_small_set_errors_on_every_rank_alike():
    with pytest.raises(ValueError, match="fewer than one window"):
        ppl.windowed_ce(lambda x: (torch.zeros(()), 0), np.arange(5), window=8, rank=1, world=2)


@pytest.fixture(scope="module")
def model_and_data(tiny, tmp_path_factory):
    tok, model = tiny
    d = tmp_path_factory.mktemp("ppl")
    rng = np.random.default_rng(3)
    data = T.write_stream_data(str(d / "data"), {"heldout": rng.integers(0, len(tok), 2 * 40 + 5),
                                                  "ood": rng.integers(0, len(tok), 3 * 40),
                                                  "tiny": rng.integers(0, len(tok), 10)}, tok)
    mdir = T.save_model(model, str(d / "model"), tok)
    run = d / "runs" / "r1"
    T.save_model(model, str(run / "export"), tok)
    (run / "config.yaml").write_text(f"data: {data}\n")
    return tok, model, data, mdir, str(run)


def test_cli_model_dir_and_run_dir(model_and_data, tmp_path):
    tok, model, data, mdir, run = model_and_data
    out = ppl.main(["--model", mdir, "--data", data, "--sets", "heldout", "ood", "--window", "40",
                    "--out", str(tmp_path / "p.json")])
    for name, n_win in (("heldout", 2), ("ood", 3)):
        want, n = hand_ppl(model, shards.load_stream(data, name), 40, 256)
        assert out["sets"][name]["ppl"] == pytest.approx(want, rel=1e-5)
        assert out["sets"][name]["windows"] == n_win
    assert json.load(open(tmp_path / "p.json"))["sets"]["ood"]["targets"] == 3 * 39
    # a run directory: the model comes from export/, the data dir from config.yaml
    out2 = ppl.main(["--model", run, "--sets", "heldout", "ood", "--window", "40"])
    assert out2["sets"] == out["sets"]
    with pytest.raises(ValueError, match="fewer than one window"):
        ppl.main(["--model", mdir, "--data", data, "--sets", "tiny", "--window", "40"])


def test_cli_refuses_other_tokenizer(model_and_data, tmp_path):
    tok, model, data, mdir, run = model_and_data
    other = T.tiny_tokenizer(texts=["completely different words here " * 50], vocab_size=300)
    T.save_model(model, str(tmp_path / "m"), other)
    with pytest.raises(common.EvalError, match="tokenizer differs"):
        ppl.main(["--model", str(tmp_path / "m"), "--data", data, "--sets", "ood", "--window", "40"])
    with pytest.raises(common.EvalError, match="no exported model"):
        os.makedirs(tmp_path / "run_no_export")
        (tmp_path / "run_no_export" / "config.yaml").write_text("data: {}\n")
        common.resolve_model_dir(str(tmp_path / "run_no_export"))


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flex_attention", "eager"])
def test_windows_score_the_same_on_every_kernel(kernel, monkeypatch):
    """Evaluation windows pass no positions (one causal sequence each, docs/evaluation.md), so transformers' flash and
    flex paths (CPU stand-in kernels, tests/attn_standins.py) and eager score them as sdpa does, 4 windows a batch,
    EOS tokens inside the windows included; the logit analysis calls the model the same way."""
    from attn_standins import use_standins
    use_standins(monkeypatch)
    model = T.tiny_llama(seed=1, vocab_size=64)
    g = np.random.default_rng(0)
    tokens = g.integers(1, 64, 8 * 32)
    tokens[g.integers(0, len(tokens), 20)] = 0                       # EOS (id 0) inside windows
    ref = ppl.windowed_eval(ppl.hf_loss_fn(model, entropy=True), tokens, window=32, max_windows=8, batch_size=4)
    model.config._attn_implementation = kernel                       # read at every forward
    got = ppl.windowed_eval(ppl.hf_loss_fn(model, entropy=True), tokens, window=32, max_windows=8, batch_size=4)
    assert got["ce"] == pytest.approx(ref["ce"], rel=1e-6) and got["entropy"] == pytest.approx(ref["entropy"], rel=1e-6)
