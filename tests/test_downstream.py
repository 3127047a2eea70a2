"""eval/downstream.py: the built-in scorer against float64 hand computations, and the lm-eval adapter on local harness
tasks (both request types), agreeing with the built-in scorer and with the harness's own rolling windows."""
import json
import math

import numpy as np
import pytest
import torch

from eval import downstream as D
import harness as T

DOCS = [
    {"query": "Question: What is ice?\nAnswer:", "choices": ["frozen water", "a cat", "Paris"], "gold": 0},
    {"query": "Question: Where does the sun rise?\nAnswer:", "choices": ["in the west", "in the east"], "gold": 1},
    {"query": "The capital of France is", "choices": ["Paris", "seven days", "light", "dogs"], "gold": 0},
    {"query": "Two plus two equals", "choices": ["four", "nine"], "gold": 0},
    {"query": "A week has", "choices": ["seven days", "one hundred degrees"], "gold": 0},
]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog. Cats and dogs are common pets."},
         {"text": "Plants need light, water and air to grow. Ice is frozen water. " * 3}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("down")
    tok = T.tiny_tokenizer()
    model = T.tiny_llama(seed=5, vocab_size=len(tok), max_pos=64)
    mdir = T.save_model(model, str(d / "model"), tok)
    mc = d / "eval_mc.jsonl"
    mc.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    txt = d / "eval_text.jsonl"
    txt.write_text("".join(json.dumps(x) + "\n" for x in TEXTS))
    m64 = T.tiny_llama(seed=0, vocab_size=len(tok), max_pos=64).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return {"tok": tok, "model": model, "m64": m64, "dir": mdir, "mc": str(mc), "txt": str(txt), "tmp": d}


def hand_ll(m64, ids_ctx, ids_cont, max_length=None):
    """log p(cont | ctx) in float64 from one forward over ctx + cont (truncated on the left to max_length + 1)."""
    whole = (ids_ctx + ids_cont)
    if max_length:
        whole = whole[-(max_length + 1):]
    x = torch.tensor([whole])
    with torch.no_grad():
        logits = m64(input_ids=x).logits[0]
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    n = len(whole)
    k = min(len(ids_cont), n - 1)
    lp = sum(logp[j - 1, whole[j]].item() for j in range(n - k, n))
    greedy = all(logp[j - 1].argmax().item() == whole[j] for j in range(n - k, n))
    return lp, greedy


def test_scorer_matches_hand(setup):
    tok, m64 = setup["tok"], setup["m64"]
    sc = D.scorer_from_model(setup["model"], tok, batch_size=3)
    pairs = [("Two plus two equals", " four"), ("Two plus two equals ", "four"), ("", "Ice is frozen water."),
             ("The sun", " rises in the east and sets in the west.")]
    got = sc.loglikelihood(pairs)
    for (c, x), (lp, greedy) in zip(pairs, got):
        # trailing context spaces move to the continuation; empty context -> EOS
        if c == "":
            ctx_ids, cont_ids = [tok.eos_token_id], tok.encode(x, add_special_tokens=False)
        else:
            cs = c.rstrip()
            whole = tok.encode(cs + c[len(cs):] + x, add_special_tokens=False)
            ctx_ids = tok.encode(cs, add_special_tokens=False)
            cont_ids = whole[len(ctx_ids):]
        want, wg = hand_ll(m64, ctx_ids, cont_ids)
        assert lp == pytest.approx(want, rel=1e-5)
        assert greedy == wg
    assert got[0][0] == pytest.approx(got[1][0], rel=1e-6)  # "x " + "y" == "x" + " y"
    # is_greedy is True for the model's own greedy continuation
    ctx = tok.encode("The capital of", add_special_tokens=False)
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(3):
            seq.append(int(m64(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    lp, greedy = sc.score_tokens([(ctx, seq[len(ctx):])])[0]
    assert greedy and lp == pytest.approx(hand_ll(m64, ctx, seq[len(ctx):])[0], rel=1e-5)


def test_scorer_truncates_left(setup):
    tok, m64 = setup["tok"], setup["m64"]
    sc = D.scorer_from_model(setup["model"], tok, max_length=12, batch_size=2)
    ctx = tok.encode("Plants need light, water and air to grow. Ice is frozen water.", add_special_tokens=False)
    cont = tok.encode(" A week has seven days.", add_special_tokens=False)
    assert len(ctx) + len(cont) > 13
    lp, _ = sc.score_tokens([(ctx, cont)])[0]
    assert lp == pytest.approx(hand_ll(m64, ctx, cont, max_length=12)[0], rel=1e-5)


def test_rolling_matches_hand(setup):
    tok, m64 = setup["tok"], setup["m64"]
    L = 16
    sc = D.scorer_from_model(setup["model"], tok, max_length=L, batch_size=4)
    for text in (TEXTS[0]["text"][:20], TEXTS[1]["text"]):
        toks = tok.encode(text, add_special_tokens=False)
        # hand: token j is predicted from up to L preceding tokens of [EOS] + text, restarted per chunk of L predictions
        # (first chunk from EOS; each later chunk from a full L-token context ending right before its first token)
        want, done, seq = 0.0, 0, [tok.eos_token_id] + toks
        while done < len(toks):
            end = min(done + L, len(toks))
            lo = max(0, end - L)  # index into seq: the input is seq[lo:end] (length <= L), predicting toks[done:end]
            x = torch.tensor([seq[lo:end]])
            with torch.no_grad():
                logits = m64(input_ids=x).logits[0]
            logp = logits - torch.logsumexp(logits, -1, keepdim=True)
            for j in range(done, end):  # toks[j] = seq[j + 1], predicted at input position j - lo
                want += logp[j - lo, toks[j]].item()
            done = end
        got = sc.loglikelihood_rolling([text])[0]
        assert got == pytest.approx(want, rel=1e-5)


def test_rolling_windows_are_the_harness_windows(setup):
    utils = pytest.importorskip("lm_eval.utils")
    tok = setup["tok"]
    sc = D.scorer_from_model(setup["model"], tok, max_length=7)
    for text in ("", "Ice", TEXTS[0]["text"], TEXTS[1]["text"]):
        toks = tok.encode(text, add_special_tokens=False)
        want = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            token_list=toks, prefix_token=tok.eos_token_id, max_seq_len=7, context_len=1)))
        assert sc.rolling_windows(text) == [(list(a), list(b)) for a, b in want]


def test_local_mc_matches_hand(setup):
    tok, m64 = setup["tok"], setup["m64"]
    sc = D.scorer_from_model(setup["model"], tok, batch_size=4)
    r = D.evaluate_local(sc, setup["mc"])
    accs, norms = [], []
    for d, lls in zip(DOCS, r["loglikelihoods"]):
        want = []
        for c in d["choices"]:
            whole = tok.encode(d["query"] + " " + c, add_special_tokens=False)
            ctx = tok.encode(d["query"], add_special_tokens=False)
            want.append(hand_ll(m64, ctx, whole[len(ctx):])[0])
        assert lls == pytest.approx(want, rel=1e-5)
        accs.append(float(np.argmax(want) == d["gold"]))
        norms.append(float(np.argmax(np.array(want) / np.array([len(c) for c in d["choices"]])) == d["gold"]))
    assert r["n"] == len(DOCS)
    assert r["acc"] == pytest.approx(np.mean(accs)) and r["acc_norm"] == pytest.approx(np.mean(norms))
    # few-shot prompt layout: shots "query gold" separated by blank lines, then the query
    reqs = D.mc_requests(DOCS[0], [DOCS[1], DOCS[2]])
    assert reqs[0] == (DOCS[1]["query"] + " in the east\n\n" + DOCS[2]["query"] + " Paris\n\n" + DOCS[0]["query"],
                       " frozen water")
    r2 = D.evaluate_local(sc, setup["mc"], num_fewshot=2)
    assert r2["num_fewshot"] == 2 and r2["n"] == len(DOCS)
    assert D.evaluate_local(sc, setup["mc"], num_fewshot=2)["loglikelihoods"] == r2["loglikelihoods"]  # seeded


def test_task_specs():
    assert D.task_specs(["paper"])[0] == ("hellaswag", 0, "acc_norm") and len(D.task_specs(["paper"])) == 8
    assert ("mmlu", 5, "acc") in D.task_specs(["paper"])
    assert D.task_specs(["openbookqa", "mmlu:0", "foo:3:acc_norm"]) == [("openbookqa", 5, "acc_norm"),
                                                                        ("mmlu", 0, "acc"), ("foo", 3, "acc_norm")]
    assert len(D.task_specs(["all"])) == 16


def test_harness_request_types_agree_with_builtin(setup):
    pytest.importorskip("lm_eval")
    tok = setup["tok"]
    inc = str(setup["tmp"] / "tasks")
    D.write_harness_task("eval_local_mc", setup["mc"], inc)
    D.write_harness_task("eval_local_text", setup["txt"], inc, output_type="loglikelihood_rolling")
    sc = D.scorer_from_model(setup["model"], tok, max_length=16, batch_size=4)
    res = D.run_harness(sc, [("eval_local_mc", 0, "acc_norm"), ("eval_local_text", 0, "bits_per_byte")], inc)
    mine = D.evaluate_local(D.scorer_from_model(setup["model"], tok, max_length=16), setup["mc"])
    assert res["eval_local_mc"]["all"]["acc"] == pytest.approx(mine["acc"])
    assert res["eval_local_mc"]["value"] == pytest.approx(mine["acc_norm"])
    lls = sc.loglikelihood_rolling([t["text"] for t in TEXTS])
    n_bytes = sum(len(t["text"].encode()) for t in TEXTS)
    assert res["eval_local_text"]["value"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-6)
    assert res["eval_local_text"]["all"]["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / n_bytes), rel=1e-6)
    assert res["_strategy"] == "single"


def test_harness_run_from_model_dir_and_hf_backend(setup, tmp_path):
    """`python -m eval.downstream` on a model directory through lm-eval's API; lm-eval's own 'hf' backend on the same
    directory gives the same accuracies (an independent implementation of the same scoring)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    inc = str(tmp_path / "tasks")
    D.write_harness_task("eval_local_mc2", setup["mc"], inc)
    out = D.main(["--model", setup["dir"], "--tasks", "eval_local_mc2:0:acc_norm", "--include_path", inc,
                  "--local", f"mine={setup['mc']}", "--out", str(tmp_path / "r.json")])
    got = json.load(open(tmp_path / "r.json"))["tasks"]
    assert got["eval_local_mc2"]["all"]["acc"] == pytest.approx(got["mine"]["acc"])
    assert got["eval_local_mc2"]["value"] == pytest.approx(got["mine"]["acc_norm"]) == out["tasks"]["mine"]["acc_norm"]
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup['dir']},dtype=float32",
                                  tasks=["eval_local_mc2"], num_fewshot=0, bootstrap_iters=0, device="cpu",
                                  task_manager=TaskManager(include_path=inc, include_defaults=False))
    r = ref["results"]["eval_local_mc2"]
    assert r["acc,none"] == pytest.approx(got["mine"]["acc"]) and r["acc_norm,none"] == pytest.approx(
        got["mine"]["acc_norm"])
