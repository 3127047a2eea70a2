"""Offline teacher cache (issue 13): data_prep/teacher_cache.py (generator) and distillery/teacher_cache.py (format,
reader). A tiny offline data set (512-token BPE, 64-token rows, ~300 rows) and a random micro teacher.

* the cache holds what the live teacher says: top-k log-probs at T of the document-masked teacher, position t =
  the distribution of token t + 1, the rest = log of the remaining mass; a top-k cache cut to a smaller k is the
  cache of that k;
* a build killed after its first shards and rerun is byte-identical to an uninterrupted one (in-process, fast);
  1 rank == 2 ranks under the deepspeed launcher, byte for byte (subprocesses, -m slow);
* CacheReader.check refuses another data set, tokenizer, temperature, doc_mask, method or too large a k, in one line;
  a rerun into a cache with other arguments is refused.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import REPO, clean_env, make_teacher  # noqa: E402

# The small data set's held-out split is empty (too few documents): runs here evaluate nothing, or resolve() refuses.
NO_EVAL = ["eval_interval=-1", "callbacks=[]"]
from data_prep import teacher_cache as gen  # noqa: E402
from distillery.errors import ConfigError, DataError, DistilleryError  # noqa: E402
from distillery.teacher_cache import CacheReader, record_dtype  # noqa: E402

K, RPS = 6, 64   # entries per position; rows per cache shard (~5 shards)
TOPK_T2 = ("--temperature", "2", "--vals", "fp32")   # the top-k fixture: fp32 values (exact; fp16 is tested below)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    from data_prep import offline
    offline.build(str(root / "data"), vocab_size=512, seq_len=64, max_train_bytes=int(0.04 * 2 ** 20),
                  rows_per_shard=64, workers=0, progress=False)
    make_teacher(str(root / "data"), root / "teacher")
    return root


def args(small, out, *extra, method="topk", k=K):
    return ["--teacher", str(small / "teacher"), "--data", str(small / "data"), "--out", str(out), "--k", str(k),
            "--method", method, "--rows_per_shard", str(RPS), "--batch_size", "8", "--quiet",
            "--ds_config", str(REPO / "ds_configs/cpu.json"), *extra]


def shard_bytes(out):
    ix = json.load(open(os.path.join(out, "index.json")))
    return [open(os.path.join(out, e["path"]), "rb").read() for e in ix["files"]], ix


@pytest.fixture(scope="module")
def topk_cache(small):
    out = small / "c-topk"
    gen.main(args(small, out, *TOPK_T2))
    return out


def test_cache_holds_the_live_teachers_distribution(small, topk_cache):
    from transformers import AutoModelForCausalLM
    from distillery.packing import doc_positions
    from distillery.shards import TokenRows
    reader = CacheReader(str(topk_cache), verify=True).check(str(small / "data"), 2.0, True, k_needed=K,
                                                              method="topk", teacher=str(small / "teacher"))
    assert (reader.method, reader.k, reader.temperature, reader.doc_mask) == ("topk", K, 2.0, True)
    # compact layout (the default) at --vals fp32: per row rest + vals float32 [64 (K + 1)], ids at 9 bits (vocab 512)
    # [64 K]; then the offset table uint64 [RPS + 1] (the rows end on a multiple of 8 here)
    assert os.path.getsize(os.path.join(topk_cache, "shards/00000.bin")) == RPS * (64 * (K + 1) * 4 + 64 * K * 9 // 8) \
        + 8 * (RPS + 1)
    rows = TokenRows(str(small / "data"))
    assert len(reader) == len(rows)
    eos = json.load(open(small / "data" / "index.json"))["eos_id"]
    all_rows = rows.take(np.arange(len(rows)))
    with_eos = np.nonzero((all_rows[:, :-8] == eos).any(1))[0]            # a document starts inside the row
    idx = np.array([0, 3, len(rows) - 1, RPS, RPS + 1, with_eos[0], with_eos[-1]])   # across shard boundaries too
    x = torch.from_numpy(rows.take(idx))
    lm = AutoModelForCausalLM.from_pretrained(str(small / "teacher"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = lm(input_ids=x, position_ids=doc_positions(x, eos)).logits.float()
    logp = torch.log_softmax(logits / 2.0, -1)                           # position t: the distribution of t + 1
    vals, ids = logp.topk(K, -1)
    c_ids, c_vals, c_rest = reader.take(idx)
    assert c_ids.dtype == torch.int64 and c_vals.dtype == torch.float32 and c_rest.shape == x.shape
    assert (c_ids == ids).float().mean() > 0.999                        # (a near-tie may swap two entries)
    assert torch.allclose(c_vals, vals, atol=1e-5)
    rest = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-7))
    assert torch.allclose(c_rest, rest, atol=1e-4)
    # a top-k cache cut to k = 2 is the top-2 cache: rest gains the dropped entries
    i2, v2, r2 = reader.take(idx, k=2)
    assert torch.equal(i2, c_ids[..., :2]) and torch.allclose(r2, torch.log1p(-vals[..., :2].exp().sum(-1)),
                                                              atol=1e-5)


def test_kill_and_rerun_is_byte_identical(small, topk_cache):
    out = small / "c-killed"
    with pytest.raises(KeyboardInterrupt):
        gen.main(args(small, out, *TOPK_T2, "--stop_after_shards", "2"))
    assert not os.path.exists(out / "index.json")
    assert sorted(os.listdir(out / "shards")) == ["00000.bin", "00001.bin"]
    with pytest.raises(DataError, match="no teacher cache .* build is in progress"):
        CacheReader(str(out))
    with open(out / "shards" / "00002.bin.tmp-1", "wb") as f:              # a killed writer's leftover
        f.write(b"junk")
    with pytest.raises(DataError, match="partial teacher cache with other arguments"):
        gen.main(args(small, out, "--temperature", "1"))
    gen.main(args(small, out, *TOPK_T2))
    a, ia = shard_bytes(out)
    b, ib = shard_bytes(topk_cache)
    assert a == b and ia["files"] == ib["files"] and len(a) == -(-ia["rows"] // RPS)
    assert not os.path.exists(out / "progress")
    gen.main(args(small, out, *TOPK_T2))                                 # already built: nothing to do
    with pytest.raises(DataError, match="already holds a teacher cache built with other arguments"):
        gen.main(args(small, out, *TOPK_T2, k=4))


def test_old_offload_flag_is_refused_with_the_new_spelling(small, tmp_path):
    with pytest.raises(ConfigError, match="^--teacher_offload was replaced by --teacher_placement offload$"):
        gen.main(args(small, tmp_path / "new", "--teacher_offload"))
    assert not (tmp_path / "new").exists()                                # refused before anything is written


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_mismatched_cache_is_refused(small, topk_cache, tmp_path):
    data = small / "data"
    reader = CacheReader(str(topk_cache))
    for kw, kind, what in [(dict(temperature=1.0), ConfigError, "temperature 2"),
                           (dict(doc_mask=False), ConfigError, "doc_mask=true"),
                           (dict(k_needed=K + 1), ConfigError, f"k={K}"),
                           (dict(method="sampled"), ConfigError, "holds topk targets")]:
        call = {**dict(data_dir=str(data), temperature=2.0, doc_mask=True), **kw}
        with pytest.raises(kind) as e:
            reader.check(**call)
        assert what in _one_line(e)
    # other data: the same rows rebuilt differently (a shard checksum changes), or another tokenizer
    other = tmp_path / "other"
    shutil.copytree(data, other)
    ix = json.load(open(other / "index.json"))
    ix["splits"]["train"]["files"][0]["sha256"] = "0" * 64
    json.dump(ix, open(other / "index.json", "w"))
    with pytest.raises(DataError) as e:
        reader.check(str(other), 2.0, True)
    assert "other training shards" in _one_line(e)
    ix["tokenizer"]["vocab_hash"] = "f" * 64
    json.dump(ix, open(other / "index.json", "w"))
    with pytest.raises(DataError) as e:
        reader.check(str(other), 2.0, True)
    assert "tokenizer" in _one_line(e)
    # a corrupt shard is found by verify; a truncated one at open
    bad = tmp_path / "bad"
    shutil.copytree(topk_cache, bad)
    with open(bad / "shards" / "00001.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(DataError, match="fails its checksum"):
        CacheReader(str(bad), verify=True)
    with open(bad / "shards" / "00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DistilleryError, match="truncated"):
        CacheReader(str(bad))


def test_sampled_cache_weights_and_entropy(small):
    out = small / "c-sampled"
    gen.main(args(small, out, "--seed", "3", method="sampled"))
    reader = CacheReader(str(out)).check(str(small / "data"), 1.0, True, method="sampled")
    ids, w, ent = reader.take([0, 1])
    assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.all((w * K - (w * K).round()).abs() < 1e-4)             # counts / K
    assert torch.all(ent > 0) and torch.all(ids < reader.kd_vocab)
    with pytest.raises(ConfigError, match="cannot be cut"):
        reader.check(str(small / "data"), 1.0, True, k_needed=K - 1)


def _subprocess_build(small, out, nproc, placement="auto"):
    from distillery.launch import free_port
    a = args(small, out, "--seed", "5", "--teacher_placement", placement, method="sampled")
    if nproc == 1:
        cmd = [sys.executable, "-m", "data_prep.teacher_cache", *a]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--module", "data_prep.teacher_cache", *a]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(clean_env(), OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.mark.slow
def test_one_rank_equals_two_ranks(small):
    """The deepspeed launcher with 2 CPU ranks (gloo, ZeRO-3 teacher partitioned over both) writes the same bytes
    as one process with a replicated teacher (auto on one rank) (~1 min)."""
    _subprocess_build(small, small / "c-1rank", 1)
    _subprocess_build(small, small / "c-2rank", 2, placement="partitioned")
    a, ia = shard_bytes(small / "c-1rank")
    b, ib = shard_bytes(small / "c-2rank")
    assert a == b and ia["files"] == ib["files"]


def test_training_from_a_full_cache_matches_online_step_for_step(small, tmp_path, capsys):
    """teacher_cache= in the trainer: with K = the vocabulary, a top-k cache carries the teacher's whole distribution,
    so 3 optimizer steps distilled from it give the losses of 3 steps with the live teacher (fp32 rounding), and the
    run loads no teacher and counts no teacher FLOPs. A sampled cache trains too (its KD is an unbiased estimate)."""
    from conftest import read_metrics, run_inprocess
    vocab = json.load(open(small / "data" / "index.json"))["vocab_size"]
    full = tmp_path / "c-full"
    gen.main(args(small, full, "--vals", "fp32", k=vocab))               # fp32 values: exact to fp32 rounding
    common = [f"data={small / 'data'}", "alpha=0.5", "max_steps=3", "callbacks=[]", "eval_interval=-1",
              "export=false"]
    run_inprocess(str(small / "data"), tmp_path, "name=online", f"teacher={small / 'teacher'}", *common)
    run_inprocess(str(small / "data"), tmp_path, "name=cached", f"teacher_cache={full}", "teacher=/no/such/dir",
                  *common)
    online, _ = read_metrics(tmp_path / "online")
    cached, _ = read_metrics(tmp_path / "cached")
    assert sorted(cached) == [1, 2, 3]
    for s in (1, 2, 3):
        for k in ("loss/total", "loss/ce", "loss/kd"):
            assert cached[s][k] == pytest.approx(online[s][k], rel=1e-5), (s, k)
    assert cached[3]["compute/teacher_flops"] == 0 and online[3]["compute/teacher_flops"] > 0
    sampled = tmp_path / "c-sampled"
    gen.main(args(small, sampled, method="sampled", k=8))
    capsys.readouterr()
    run_inprocess(str(small / "data"), tmp_path, "name=sampled", f"teacher_cache={sampled}", *common,
                  "callbacks=[progress]")
    assert f"teacher cache {sampled} (8 samples, unbiased)" in capsys.readouterr().out
    m, _ = read_metrics(tmp_path / "sampled")
    assert all(np.isfinite(m[s]["loss/kd"]) and m[s]["loss/kd"] > 0 for s in (1, 2, 3))


def test_trainer_refuses_a_mismatched_cache(small, topk_cache, tmp_path, monkeypatch):
    """The cache was made at T = 2: a run at T = 1 stops at start with one line, before anything is written."""
    import train
    from conftest import BASE
    with pytest.raises(DistilleryError, match="temperature") as e:
        train.resolve(train.parse_args(["--ds_config", str(REPO / "ds_configs/cpu.json"), f"data={small / 'data'}",
                                        f"out_dir={tmp_path}", *BASE, *NO_EVAL, "alpha=0.5",
                                        f"teacher_cache={topk_cache}"]))
    assert "\n" not in str(e.value) and not os.listdir(tmp_path)
    # teacher= names a model that exists here but did not make the cache: refused, naming both
    other = tmp_path.parent / (tmp_path.name + "-other-teacher")
    other.mkdir()
    conf = json.load(open(small / "teacher" / "config.json"))
    json.dump({**conf, "num_hidden_layers": conf["num_hidden_layers"] + 1}, open(other / "config.json", "w"))
    argv = ["--ds_config", str(REPO / "ds_configs/cpu.json"), f"data={small / 'data'}", f"out_dir={tmp_path}", *BASE,
            *NO_EVAL, "alpha=0.5", "temperature=2", f"teacher_cache={topk_cache}"]
    with pytest.raises(DistilleryError, match="whose config differs") as e:
        train.resolve(train.parse_args([*argv, f"teacher={other}"]))
    assert "\n" not in str(e.value) and not os.listdir(tmp_path)
    assert train.resolve(train.parse_args([*argv, f"teacher={small / 'teacher'}"])).cache is not None
    # the default teacher path is no claim, even where it exists (any machine that ran the offline study)
    home = tmp_path.parent / (tmp_path.name + "-cwd")
    (home / os.path.dirname(train.Config.teacher)).mkdir(parents=True)
    shutil.copytree(other, home / train.Config.teacher)
    monkeypatch.chdir(home)
    assert train.resolve(train.parse_args(argv)).cache is not None


def test_builder_refuses_a_kernel_that_attends_across_documents(small, tmp_path, monkeypatch):
    """The teacher's kernel broken on purpose (sdpa handed no mask, tests/test_maskprobe.py): the builder stops at
    start with one line naming the kernel, before it writes anything; --no_doc_mask needs no probe."""
    from test_maskprobe import register, sdpa_without_mask
    register(monkeypatch, "sdpa", sdpa_without_mask)
    out = tmp_path / "c"
    with pytest.raises(ConfigError, match="document masking fails on attention kernel sdpa at micro-batch 8 "
                                          r"\(teacher") as e:
        gen.main(args(small, out))
    assert "\n" not in str(e.value) and not out.exists()


def test_cache_knows_its_teacher_by_its_weights(small, topk_cache, tmp_path):
    """Issue 20, item 1: the cache records its teacher's weights hash; teacher= naming a model of the same
    architecture with other weights (the 0.7B/30B vs 0.7B/300B case) is refused before anything is written; with
    the default teacher= (no claim) the run records the cache's own teacher, so config.yaml, the report and
    compute_match name the model that made the targets."""
    import train
    from conftest import BASE
    from distillery.models import weights_sha256
    ix = json.load(open(topk_cache / "index.json"))
    assert ix["teacher"]["weights_sha256"] == weights_sha256(str(small / "teacher"))
    other = tmp_path / "other-teacher"
    make_teacher(str(small / "data"), other, seed=1)     # same preset, same config.json, other weights
    assert (other / "config.json").read_text() == (small / "teacher" / "config.json").read_text()
    out = tmp_path / "runs"
    argv = ["--ds_config", str(REPO / "ds_configs/cpu.json"), f"data={small / 'data'}", f"out_dir={out}", *BASE,
            *NO_EVAL, "alpha=0.5", "temperature=2", f"teacher_cache={topk_cache}"]
    with pytest.raises(DistilleryError, match="other weights") as e:
        train.resolve(train.parse_args([*argv, f"teacher={other}"]))
    assert "\n" not in str(e.value) and not out.exists()
    assert train.resolve(train.parse_args([*argv, f"teacher={small / 'teacher'}"])).cfg.teacher == \
        str(small / "teacher")
    plan = train.resolve(train.parse_args(argv))  # the default teacher=
    assert plan.cfg.teacher == ix["teacher"]["path"] == os.path.abspath(small / "teacher")


def test_compute_match_against_a_cached_run_agrees_with_its_ledger(small, topk_cache, tmp_path):
    """Issue 20, item 2: a cached run runs no teacher (compute/teacher_flops = 0) but is charged the forward its
    cache spent on the rows it read (compute/teacher_cache_flops), so its run_flops equal an online run's on the same
    tokens; a baseline with compute_match= that run gets the FLOPs its ledger logged (within half a step)."""
    import train
    from conftest import BASE, read_metrics, run_inprocess
    from distillery import flops
    steps, tokens_per_step = 3, 8 * 64
    run_inprocess(str(small / "data"), tmp_path, "name=cached", f"teacher_cache={topk_cache}", "temperature=2",
                  "alpha=0.5", f"train_tokens={steps * tokens_per_step}", "callbacks=[]", "eval_interval=-1",
                  "export=false")
    m, _ = read_metrics(tmp_path / "cached")
    last = m[steps]
    plan = train.resolve(train.parse_args(["--ds_config", str(REPO / "ds_configs/cpu.json"), f"data={small / 'data'}",
                                           f"out_dir={tmp_path}", *BASE, *NO_EVAL, "name=base", "alpha=0",
                                           f"compute_match={tmp_path / 'cached'}"]))
    per_token = last["compute/student_flops"] / (steps * tokens_per_step)
    assert plan.cfg.train_tokens > steps * tokens_per_step
    assert abs(plan.cfg.train_tokens * per_token - last["compute/run_flops"]) <= 0.5 * per_token * tokens_per_step, \
        (plan.cfg.train_tokens * per_token, last["compute/run_flops"])
    teacher = flops.teacher_forward_flops(str(small / "teacher"), steps * tokens_per_step, 64)
    assert last["compute/teacher_flops"] == 0 and last["compute/teacher_cache_flops"] == pytest.approx(teacher)
    assert last["compute/run_flops"] == pytest.approx(last["compute/student_flops"] + teacher)


def test_cache_mode_is_checked_before_anything_is_written(small, tmp_path):
    """Issue 20, item 3: teacher_cache_mode=bogus stops the run when the config is read (it used to fail at the first
    micro-step, after config.yaml was written, and the corrected rerun was then refused as a change of a
    run-defining key), also with a sampled cache (where it used to be accepted and recorded); a top-k mode with a
    sampled cache is refused in resolve()."""
    import train
    from conftest import BASE
    sampled = tmp_path / "c-sampled"
    gen.main(args(small, sampled, method="sampled", k=4))
    out = tmp_path / "runs"
    argv = ["--ds_config", str(REPO / "ds_configs/cpu.json"), f"data={small / 'data'}", f"out_dir={out}", *BASE,
            "alpha=0.5", f"teacher_cache={sampled}", "callbacks=[]", "eval_interval=-1", "export=false"]
    with pytest.raises(ConfigError, match="teacher_cache_mode='bogus': use renorm, tail or support") as e:
        train.main([*argv, "teacher_cache_mode=bogus"])
    assert "\n" not in str(e.value) and not out.exists()
    with pytest.raises(ConfigError, match="teacher_cache_mode=tail is for top-k caches") as e:
        train.resolve(train.parse_args([*argv, "teacher_cache_mode=tail"]))
    assert "\n" not in str(e.value) and not out.exists()
    assert train.main([*argv, "max_steps=1"]) == str(out / "default")  # the default mode trains from it


# ---------------------------------------------------------------------------- compact layout (issue 23)
def _take_all(out):
    r = CacheReader(str(out))
    return r, r.take(np.arange(len(r)))


def _loss(take, y, hs, ws, method, T, mode="renorm"):
    """sparse_loss on the taken targets: (ce_sum, kd_sum, grad of the hidden states, grad of the weight)."""
    from distillery.sparse_kd import sparse_loss
    ids, vals, rest = take
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = sparse_loss(student_hidden=h, student_weight=w, targets=y, cache_ids=ids, cache_vals=vals, cache_rest=rest,
                      method=method, temperature=T, w_ce=0.3, w_kd=1.0, sparse_mode=mode, kd_vocab=512)
    out.loss.backward()
    return out.ce_sum, out.kd_sum, h.grad, w.grad


def _targets(small, n):
    from distillery.loss_parts import shift_targets
    from distillery.shards import TokenRows
    return shift_targets(torch.from_numpy(TokenRows(str(small / "data")).take(np.arange(n))))


@pytest.fixture(scope="module")
def sampled_layouts(small):
    """The same sampled cache (seed 3) in the fixed layout (v1, int32 + float32), the default compact one (fixed16
    entropy) and compact with an fp32 entropy."""
    outs = {"fixed": ("--layout", "fixed"), "compact": (), "compact-fp32": ("--entropy", "fp32")}
    for name, extra in outs.items():
        gen.main(args(small, small / f"s-{name}", "--seed", "3", *extra, method="sampled"))
    return {name: small / f"s-{name}" for name in outs}


def test_compact_sampled_cache_gives_the_fixed_layouts_targets_and_gradients(small, sampled_layouts):
    """Compact sampled targets are today's bit for bit (ids, weights), so the loss's gradients are bit-identical;
    the loss value equals too with an fp32 entropy, and within T^2 ln(V) / 131070 per token with fixed16."""
    (rf, (i0, v0, e0)), (rc, (i1, v1, e1)), (r32, (i2, v2, e2)) = (_take_all(sampled_layouts[n]) for n in
                                                                   ("fixed", "compact", "compact-fp32"))
    assert (rf.index["version"], rc.index["version"], r32.index["version"]) == (1, 2, 2)
    assert rf.index["bytes_per_token"] == 8 * K + 4 and rc.index["bytes_per_token"] < 8 * K + 4 - 20
    assert torch.equal(i0, i1) and torch.equal(v0, v1) and torch.equal(i0, i2) and torch.equal(v0, v2)
    assert torch.equal(e0, e2)
    bound = math.log(rc.kd_vocab) / 131070 + float(e0.max()) * 2.0 ** -24
    assert (e1 - e0).abs().max() <= bound
    n = 16
    y = _targets(small, n)
    g = torch.Generator().manual_seed(1)
    hs, ws = torch.randn(n, 64, 32, generator=g), torch.randn(512, 32, generator=g) * 0.3
    for T in (1.0, 2.0):
        ref = _loss((i0[:n], v0[:n], e0[:n]), y, hs, ws, "sampled", T)
        for take in ((i1[:n], v1[:n], e1[:n]), (i2[:n], v2[:n], e2[:n])):
            got = _loss(take, y, hs, ws, "sampled", T)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
        assert torch.equal(_loss((i2[:n], v2[:n], e2[:n]), y, hs, ws, "sampled", T)[1], ref[1])       # fp32: exact
        fixed16 = _loss((i1[:n], v1[:n], e1[:n]), y, hs, ws, "sampled", T)[1]
        n_tok = int((y != -100).sum())
        assert abs(float(fixed16 - ref[1])) <= T * T * n_tok * bound * (1 + 1e-3) + 1e-9 * abs(float(ref[1]))


def test_convert_equals_build(small, sampled_layouts, tmp_path):
    """--convert rewrites a cache into another layout with the bytes a build of that layout writes: fixed ->
    compact and compact -> fixed, shard for shard, with the same index entries; the source is verified first."""
    conv = tmp_path / "conv"
    gen.main(["--convert", str(sampled_layouts["fixed"]), "--out", str(conv), "--quiet"])
    a, ia = shard_bytes(conv)
    b, ib = shard_bytes(sampled_layouts["compact"])
    assert a == b and ia["files"] == ib["files"] and ia["build"] == ib["build"] and ia["layout"] == ib["layout"]
    assert ia["converted_from"]["version"] == 1 and ia["bytes"] < ia["converted_from"]["bytes"] / 2
    back = tmp_path / "back"
    gen.main(["--convert", str(sampled_layouts["compact-fp32"]), "--out", str(back), "--layout", "fixed", "--quiet"])
    a, ia = shard_bytes(back)
    b, ib = shard_bytes(sampled_layouts["fixed"])
    assert a == b and ia["files"] == ib["files"] and ia["build"] == ib["build"] and ia["version"] == 1
    with pytest.raises(DataError, match="exists; delete it or pick another --out"):
        gen.main(["--convert", str(sampled_layouts["fixed"]), "--out", str(conv), "--quiet"])
    bad = tmp_path / "bad"
    shutil.copytree(sampled_layouts["fixed"], bad)
    with open(bad / "shards" / "00001.bin", "r+b") as f:
        f.seek(7)
        f.write(b"\x01")
    with pytest.raises(DataError, match="fails its checksum"):
        gen.main(["--convert", str(bad), "--out", str(tmp_path / "bad-conv"), "--quiet"])
    assert not (tmp_path / "bad-conv").exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_compact_topk_cache_within_its_stated_bound(small, topk_cache, tmp_path):
    """The default top-k precision, fp16 log-probs and rest, against the same cache at fp32 (the fixture): a build
    equals the converted fixture byte for byte, ids are exact, and with an identity head (the hidden-state gradient
    is the gradient w.r.t. the logits) every position's logit gradient moves by at most T sum_i q_i (e^eta_i - 1)
    in L1 and kd_sum by at most the sum of T^2 sum_i q_i ((e^eta_i - 1)(|log q_i| + |log p_i|) + eta_i e^eta_i), eta
    the log-prob errors fp16 made at that position (renorm: q renormalised, eta_i = |eps_i| + log sum_j q_j e^|eps_j|;
    tail: q over the ids and the rest, twice the gradient bound). Derivation: docs/teacher_cache.md."""
    built = tmp_path / "fp16"
    gen.main(args(small, built, "--temperature", "2"))
    conv = tmp_path / "fp16-conv"
    gen.main(["--convert", str(topk_cache), "--out", str(conv), "--vals", "fp16", "--quiet"])
    a, ia = shard_bytes(built)
    b, ib = shard_bytes(conv)
    assert a == b and ia["files"] == ib["files"] and ia["build"] == ib["build"]
    assert ia["layout"]["vals"] == "fp16" and ia["bytes_per_token"] == pytest.approx(K * (9 + 16) / 8 + 2, abs=0.2)
    fixed = tmp_path / "fixed"
    gen.main(["--convert", str(topk_cache), "--out", str(fixed), "--layout", "fixed", "--quiet"])
    n, T = 12, 2.0
    (_, ref), (_, got), (_, v1) = _take_all(topk_cache), _take_all(built), _take_all(fixed)
    assert all(torch.equal(x, y) for x, y in zip(ref, v1))                       # compact fp32 == v1, exactly
    assert torch.equal(ref[0], got[0])
    ref, got = tuple(x[:n] for x in ref), tuple(x[:n] for x in got)
    y = _targets(small, n)
    hs = torch.randn(n, 64, 512, generator=torch.Generator().manual_seed(2)) * 3
    eye = torch.eye(512)
    m = (y != -100)
    lp = torch.log_softmax(hs.double() / T, -1)                                  # student log-probs at T
    for mode in ("renorm", "tail"):
        _, kd32, dz32, _ = _loss(ref, y, hs, eye, "topk", T, mode)
        _, kd16, dz16, _ = _loss(got, y, hs, eye, "topk", T, mode)
        lps = lp.gather(-1, ref[0])
        if mode == "renorm":
            v = ref[1].double() - ref[1].double().logsumexp(-1, keepdim=True)
            eps = (got[1].double() - ref[1].double()).abs()
            eta = eps + (v.exp() * eps.exp()).sum(-1, keepdim=True).log()
        else:
            v = torch.cat([ref[1].double(), ref[2].double()[..., None]], -1)
            eps = torch.cat([got[1].double() - ref[1].double(), (got[2].double() - ref[2].double())[..., None]],
                            -1).abs()
            eta = eps
            lps = torch.cat([lps, (1 - lps.exp().sum(-1)).log()[..., None]], -1)
        q = v.exp()
        g_bound = T * (q * eta.expm1()).sum(-1) * (1 if mode == "renorm" else 2)          # [n, S]
        g_diff = (dz16.double() - dz32.double()).abs().sum(-1)
        assert (g_diff[m] <= g_bound[m] + 1e-4).all(), (mode, (g_diff - g_bound)[m].max())
        kd_bound = (T * T * (q * (eta.expm1() * (v.abs() + lps.abs()) + eta * eta.exp())).sum(-1))[m].sum()
        kd_diff = abs(float(kd16) - float(kd32))
        assert kd_diff <= float(kd_bound) + 1e-5 * abs(float(kd32)) + 1e-4, (mode, kd_diff, float(kd_bound))
        print(f"\nfp16 top-k, {mode}, T={T}: logit-grad L1 change max {g_diff[m].max():.2e} (bound "
              f"{g_bound[m].max():.2e}), relative {g_diff[m].sum() / dz32.double().abs().sum():.2e}; kd change "
              f"{kd_diff:.2e} (bound {float(kd_bound):.2e}), relative {kd_diff / abs(float(kd32)):.2e}")


def test_reading_rows_touches_only_their_bytes(small, sampled_layouts, tmp_path):
    """Every byte of a compact shard outside the rows asked for and their offset-table entries overwritten: the
    rows still read the same (only the checksum notices)."""
    bad = tmp_path / "bad"
    shutil.copytree(sampled_layouts["compact"], bad)
    reader = CacheReader(str(sampled_layouts["compact"]))
    for f, rows in {0: [3], 1: [5, 6]}.items():                                   # shard -> its local rows
        path = bad / reader.index["files"][f]["path"]
        data = np.fromfile(path, dtype=np.uint8)
        offs = reader.offsets[f]
        t0 = data.size - 8 * len(offs)                                            # the offset table
        keep = np.zeros(data.size, bool)
        for i in rows:
            keep[int(offs[i]):int(offs[i + 1])] = True                            # the row's bytes
            keep[t0 + 8 * i:t0 + 8 * (i + 2)] = True                              # its two table entries
        keep[t0:t0 + 8] = keep[-8:] = True                                        # the table's ends, checked at open
        data[~keep] = 0xFF
        data.tofile(path)
    idx = [RPS + 5, 3, RPS + 6]
    got, ref = CacheReader(str(bad)).take(idx), reader.take(idx)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    with pytest.raises(DataError, match="fails its checksum"):
        CacheReader(str(bad), verify=True)


def test_layout_arguments_and_old_caches(small, sampled_layouts, tmp_path):
    """One-line refusals for layout flags that do not apply, a build into a cache of the other layout (naming
    --convert), --convert with build flags, a build without --teacher, and an index of an unknown version; a v1
    (fixed) cache is confirmed by a rerun with --layout fixed, and its build record has no layout entry (so a v1
    build interrupted before issue 23 resumes with --layout fixed)."""
    for extra, method, what in [(("--vals", "fp16"), "sampled", "--vals sets the precision of a compact topk"),
                                (("--entropy", "fp32"), "topk", "--entropy sets the precision of a compact sampled"),
                                (("--layout", "fixed", "--vals", "fp32"), "topk", "drop it for a fixed topk")]:
        with pytest.raises(ConfigError, match=what) as e:
            gen.main(args(small, tmp_path / "x", *extra, method=method))
        _one_line(e)
    fixed = sampled_layouts["fixed"]
    with pytest.raises(DataError, match=r"fixed layout \(v1\); convert it with .*--convert") as e:
        gen.main(args(small, fixed, "--seed", "3", method="sampled"))
    _one_line(e)
    gen.main(args(small, fixed, "--seed", "3", "--layout", "fixed", method="sampled"))   # already built
    assert "layout" not in json.load(open(fixed / "index.json"))["build"]
    with pytest.raises(ConfigError, match="--convert takes the cache's own settings; drop --k"):
        gen.main(["--convert", str(fixed), "--out", str(tmp_path / "c"), "--k", "3"])
    with pytest.raises(ConfigError, match="--teacher is required"):
        gen.main(["--out", str(tmp_path / "c"), "--data", str(small / "data"), "--k", "3", "--method", "topk"])
    future = tmp_path / "future"
    shutil.copytree(fixed, future)
    ix = json.load(open(future / "index.json"))
    json.dump({**ix, "version": 3}, open(future / "index.json", "w"))
    with pytest.raises(DataError, match="is not a distillery.teacher_cache v1/v2 index"):
        CacheReader(str(future))
