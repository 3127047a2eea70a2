"""Checkpoint reliability: manifest, verification and fallback, keep_last, failed saves, world-size changes.

A real one-rank ZeRO-3 DeepSpeed engine (a two-layer MLP, built once per module) saves through checkpoint.save;
faults are injected into its files or into its checkpoint engine."""
import errno
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from conftest import REPO, clean_env

from distillery import checkpoint
from distillery.errors import ConfigError, TrainingError


def build_engine(world=1, universal=False, grad_accum=1, groups=False):
    """groups: the trainer's two optimizer groups (engines.param_groups: matrices decayed, vectors not) around a
    LayerNorm; else one group."""
    import deepspeed
    from distillery.engines import param_groups
    from distillery.launch import init_distributed
    init_distributed()
    torch.manual_seed(0)
    if groups:
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2,
          "gradient_accumulation_steps": grad_accum, "train_batch_size": 2 * world * grad_accum,
          "steps_per_print": 10 ** 9}
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine


def train_step(engine, seed):
    g = torch.Generator().manual_seed(seed)
    loss = engine(torch.randn(2, 16, generator=g)).square().mean()
    engine.backward(loss)
    engine.step()


def weights(engine):
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return [p.detach().clone() for p in engine.module.parameters()]


@pytest.fixture(scope="module")
def engine():
    e = build_engine()
    train_step(e, 0)
    return e


def cfg_for(tmp_path, **kw):
    return types.SimpleNamespace(run_dir=str(tmp_path / "run"), resume="auto", save_interval=1, **kw)


def save_steps(engine, cfg, steps, **kw):
    return [checkpoint.save(engine, cfg, s, {"step": s}, **kw) for s in steps]


def ckpts(cfg):
    """What is in checkpoints/ besides DeepSpeed's recovery scripts (zero_to_fp32.py, ...)."""
    return sorted(n for n in os.listdir(checkpoint.ckpt_dir(cfg)) if not n.endswith(".py"))


def latest(cfg):
    return open(os.path.join(checkpoint.ckpt_dir(cfg), "latest")).read()


def biggest_file(path):
    m = json.load(open(os.path.join(path, checkpoint.MANIFEST)))
    return os.path.join(path, max(m["files"], key=lambda e: e["bytes"])["path"])


def one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------- manifest, verification, fallback
def test_manifest_lists_every_file_with_size_sha_step_world(engine, tmp_path):
    cfg = cfg_for(tmp_path)
    path, = save_steps(engine, cfg, [3])
    m = json.load(open(os.path.join(path, checkpoint.MANIFEST)))
    assert m["step"] == 3 and m["world_size"] == 1
    assert {e["path"] for e in m["files"]} == set(checkpoint.list_files(path)) and len(m["files"]) >= 2
    for e in m["files"]:
        p = os.path.join(path, e["path"])
        assert e["bytes"] == os.path.getsize(p) > 0 and e["sha256"] == checkpoint.sha256_file(p)
    assert checkpoint.verify(path) is None
    assert checkpoint.find_resume(cfg) == (checkpoint.ckpt_dir(cfg), "step00000003")
    assert not [n for n in os.listdir(checkpoint.ckpt_dir(cfg)) if n.startswith("tmp-")]


@pytest.mark.parametrize("fault, reason", [
    ("truncate", "truncated"), ("zero", "zero-length"), ("flip", "fails its sha256"),
    ("no_manifest", "no manifest.json"), ("bad_manifest", "manifest.json is unreadable"),
    ("delete_file", "is missing"), ("delete_dir", "does not exist")])
def test_corrupt_newest_falls_back_to_newest_intact(engine, tmp_path, capsys, fault, reason):
    cfg = cfg_for(tmp_path, keep_last=0)
    _, mid, new = save_steps(engine, cfg, [1, 2, 3])
    f = biggest_file(new)
    if fault == "truncate":
        os.truncate(f, os.path.getsize(f) // 2)
    elif fault == "zero":
        os.truncate(f, 0)
    elif fault == "flip":
        b = bytearray(open(f, "rb").read())
        b[len(b) // 2] ^= 0xFF
        open(f, "wb").write(bytes(b))
    elif fault == "no_manifest":
        os.remove(os.path.join(new, checkpoint.MANIFEST))
    elif fault == "bad_manifest":
        open(os.path.join(new, checkpoint.MANIFEST), "w").write('{"format": "distillery.check')
    elif fault == "delete_file":
        os.remove(f)
    elif fault == "delete_dir":
        import shutil
        shutil.rmtree(new)
    capsys.readouterr()
    assert checkpoint.find_resume(cfg) == (checkpoint.ckpt_dir(cfg), "step00000002")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: checkpoint step00000003")
    assert reason in err and "resuming from step00000002" in err
    if fault == "flip":  # a flipped byte keeps the size: only the checksum sees it
        assert checkpoint.verify(new, checksums=False) is None


def test_none_intact_is_one_line_training_error(engine, tmp_path):
    cfg = cfg_for(tmp_path, keep_last=0)
    for p in save_steps(engine, cfg, [1, 2]):
        os.truncate(biggest_file(p), 0)
    with pytest.raises(TrainingError, match="no intact checkpoint to resume from.*step00000002.*zero-length.*"
                                            "step00000001.*zero-length.*start a new run") as e:
        checkpoint.find_resume(cfg)
    one_line(e)


def test_stale_latest_naming_a_removed_checkpoint_falls_back_to_the_newest_intact(engine, tmp_path, capsys):
    """Issue 24 (5): `latest` names step 5, which is gone (a stale `latest`), while 10 and 15 are intact: resume from
    15, not "no intact checkpoint ... resume=''" (which resume.check then refuses: advice in a circle)."""
    cfg = cfg_for(tmp_path, keep_last=0)
    first, _, _ = save_steps(engine, cfg, [5, 10, 15])
    d = checkpoint.ckpt_dir(cfg)
    checkpoint.atomic.write_text(os.path.join(d, "latest"), "step00000005")
    shutil.rmtree(first)
    capsys.readouterr()
    assert checkpoint.find_resume(cfg) == (d, "step00000015")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "step00000005 named by" in err and "does not exist" in err and "resuming from step00000015" in err


def test_no_intact_checkpoint_advice_is_never_circular(engine, tmp_path):
    """`latest` names a damaged checkpoint with nothing intact at or below it: a later intact one (a branch
    `latest` does not name) is offered by path; never resume='' (refused for a run that has trained)."""
    cfg = cfg_for(tmp_path, keep_last=0)
    low, _ = save_steps(engine, cfg, [5, 10])
    d = checkpoint.ckpt_dir(cfg)
    checkpoint.atomic.write_text(os.path.join(d, "latest"), "step00000005")
    os.truncate(biggest_file(low), 0)
    with pytest.raises(TrainingError, match=r"no intact checkpoint at or below step00000005, the one `latest` "
                                            r"names \(.*zero-length.*\); later checkpoint\(s\) not named by `latest`: "
                                            r"step00000010; to continue from one, resume=.*step00000010") as e:
        checkpoint.find_resume(cfg)
    assert "resume=''" not in one_line(e)
    shutil.rmtree(os.path.join(d, "step00000010"))
    with pytest.raises(TrainingError, match=r"start a new run with another name=, or check the filesystem") as e:
        checkpoint.find_resume(cfg)
    assert "resume=''" not in one_line(e)


def test_explicit_resume_path_is_verified_not_substituted(engine, tmp_path):
    cfg = cfg_for(tmp_path, keep_last=0)
    old, new = save_steps(engine, cfg, [1, 2])
    cfg.resume = old
    assert checkpoint.find_resume(cfg) == (checkpoint.ckpt_dir(cfg), "step00000001")
    os.truncate(biggest_file(old), 10)
    with pytest.raises(TrainingError, match=r"checkpoint .*step00000001 is not intact: .*truncated") as e:
        checkpoint.find_resume(cfg)
    one_line(e)
    cfg.resume = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        checkpoint.find_resume(cfg)


def test_fresh_run_and_later_steps_than_latest(engine, tmp_path):
    cfg = cfg_for(tmp_path, keep_last=0)
    assert checkpoint.find_resume(cfg) is None  # no checkpoints directory yet
    cfg.resume = ""
    assert checkpoint.find_resume(cfg) is None
    cfg.resume = "auto"
    save_steps(engine, cfg, [1, 2, 3])
    # an explicit resume from step 1 that then saved step 2 again: step 3 is an abandoned branch, never chosen
    checkpoint.atomic.write_text(os.path.join(checkpoint.ckpt_dir(cfg), "latest"), "step00000002")
    assert checkpoint.find_resume(cfg)[1] == "step00000002"
    # without a readable `latest`, the newest intact checkpoint
    os.remove(os.path.join(checkpoint.ckpt_dir(cfg), "latest"))
    assert checkpoint.find_resume(cfg)[1] == "step00000003"


def test_load_restores_engine_and_checks_manifest(engine, tmp_path):
    cfg = cfg_for(tmp_path)
    train_step(engine, 1)
    path, = save_steps(engine, cfg, [7])
    want = weights(engine)
    fresh = build_engine()
    client = checkpoint.load(fresh, cfg, checkpoint.find_resume(cfg))
    assert client["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(want, weights(fresh)))
    os.truncate(biggest_file(path), 1)
    with pytest.raises(TrainingError, match="not intact: .*truncated"):
        checkpoint.load(fresh, cfg, (checkpoint.ckpt_dir(cfg), "step00000007"))


# ---------------------------------------------------------------------------- keep_last
def test_keep_last_prunes_after_commit_never_latest(engine, tmp_path):
    cfg = cfg_for(tmp_path)  # no keep_last attribute: the default
    save_steps(engine, cfg, [1, 2, 3, 4, 5])
    assert ckpts(cfg) == ["latest", "step00000003", "step00000004", "step00000005"] and checkpoint.KEEP_LAST == 3
    assert latest(cfg) == "step00000005"
    save_steps(engine, cfg, [6], keep_last=1)
    assert ckpts(cfg) == ["latest", "step00000006"]
    cfg.keep_last = 0  # keep all
    save_steps(engine, cfg, [7, 8])
    assert ckpts(cfg) == ["latest", "step00000006", "step00000007", "step00000008"]


def test_prune_keeps_latest_unmanifested_and_later_branches(tmp_path):
    d = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4, 9):
        (d / f"step{s:08d}").mkdir(parents=True)
        (d / f"step{s:08d}" / "f").write_text("x")
        if s != 1:  # step 1: saved before manifests existed
            checkpoint.write_manifest(str(d / f"step{s:08d}"), s, 1)
    checkpoint.atomic.write_text(str(d / "latest"), "step00000004")
    assert checkpoint.prune(str(d), 1) == ["step00000003", "step00000002"]
    assert sorted(os.listdir(d)) == ["latest", "step00000001", "step00000004", "step00000009"]
    os.remove(d / "latest")
    assert checkpoint.prune(str(d), 1) == []  # nothing is pruned without a committed `latest`


# ---------------------------------------------------------------------------- failed saves
@pytest.mark.parametrize("partial", [False, True])
def test_enospc_save_is_one_line_and_keeps_previous(engine, tmp_path, monkeypatch, partial):
    cfg = cfg_for(tmp_path)
    good, = save_steps(engine, cfg, [1])
    real = engine.checkpoint_engine.save

    def full_disk(state_dict, path):
        if partial:  # DeepSpeed's own save path wrote part of a file before the disk filled up
            real(state_dict, path)
            os.truncate(path, os.path.getsize(path) // 3)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    if partial:
        monkeypatch.setattr(engine.checkpoint_engine, "save", full_disk)
    else:
        monkeypatch.setattr(engine, "save_checkpoint",
                            lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(TrainingError, match=r"checkpoint step00000002 not saved: no space left on .*checkpoints; "
                                            r"free space.*step00000001 and `latest` are untouched") as e:
        checkpoint.save(engine, cfg, 2, {"step": 2})
    one_line(e)
    assert ckpts(cfg) == ["latest", "step00000001"] and latest(cfg) == "step00000001"  # no tmp-* left
    assert checkpoint.find_resume(cfg)[1] == "step00000001" and checkpoint.verify(good) is None


def test_real_full_disk_is_one_line_and_leaves_no_partial_checkpoint(engine, small_fs):
    """Issue 24 (1): on a real full filesystem torch's zip writer fails with a RuntimeError ("unexpected pos"), not
    an OSError. The first save (nothing to estimate its size from) fails inside DeepSpeed's save; a later one is
    refused before writing anything (less free space than the last checkpoint took)."""
    from harness import fill
    cfg = types.SimpleNamespace(run_dir=str(small_fs / "run"), resume="auto", save_interval=1)
    os.makedirs(checkpoint.ckpt_dir(cfg))
    filler = fill(small_fs)
    with pytest.raises(TrainingError, match=r"checkpoint step00000001 not saved: no space left on .*checkpoints "
                                            r"\(0 bytes free; the write failed with: .*\); free space or move "
                                            r"out_dir, lower keep_last; no earlier checkpoint exists") as e:
        checkpoint.save(engine, cfg, 1, {"step": 1})
    one_line(e)
    assert ckpts(cfg) == []  # the partial tmp-step00000001 is gone
    os.remove(filler)
    good, = save_steps(engine, cfg, [1])
    fill(small_fs, leave=os.path.getsize(biggest_file(good)))  # room for one file, not for a whole checkpoint
    before = shutil.disk_usage(small_fs).free
    with pytest.raises(TrainingError, match=r"checkpoint step00000002 not saved: not enough space on "
                                            r".*checkpoints \(\d+ bytes free, the last checkpoint step00000001 took "
                                            r"\d+\); free space.*step00000001 and `latest` are untouched") as e:
        checkpoint.save(engine, cfg, 2, {"step": 2})
    one_line(e)
    assert shutil.disk_usage(small_fs).free == before  # refused before writing
    assert ckpts(cfg) == ["latest", "step00000001"] and checkpoint.verify(good) is None


def test_torch_writer_failure_with_space_left_and_other_runtime_errors(engine, tmp_path, monkeypatch):
    """torch's writer failing while there is space (a flaky mount) is a one-line 'cannot write'; any other
    RuntimeError is a bug and keeps its traceback."""
    cfg = cfg_for(tmp_path)
    save_steps(engine, cfg, [1])

    def torch_fails(state_dict, path):
        open(path, "wb").write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(engine.checkpoint_engine, "save", torch_fails)
    with pytest.raises(TrainingError, match=r"not saved: cannot write .*checkpoints: torch's writer failed: "
                                            r"\[enforce fail .*unexpected pos 576 vs 534; fix the directory"):
        checkpoint.save(engine, cfg, 2, {"step": 2})
    assert ckpts(cfg) == ["latest", "step00000001"]
    monkeypatch.setattr(engine.checkpoint_engine, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):
        checkpoint.save(engine, cfg, 2, {"step": 2})


def test_other_oserror_and_failure_while_committing(engine, tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path)
    save_steps(engine, cfg, [1])
    monkeypatch.setattr(engine, "save_checkpoint",
                        lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied",
                                                                              "/x/y")))
    with pytest.raises(TrainingError, match=r"cannot write .*: Permission denied \(/x/y\); fix the directory"):
        checkpoint.save(engine, cfg, 2, {"step": 2})
    monkeypatch.undo()
    # the disk fills up while `latest` is written: the renamed step00000002 is removed again, latest unchanged
    real = checkpoint.atomic.write_text

    def fail_latest(path, text):
        if os.path.basename(path) == "latest":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)
    monkeypatch.setattr(checkpoint.atomic, "write_text", fail_latest)
    with pytest.raises(TrainingError, match="no space left"):
        checkpoint.save(engine, cfg, 2, {"step": 2})
    assert ckpts(cfg) == ["latest", "step00000001"] and latest(cfg) == "step00000001"


def test_leftover_tmp_dirs_never_break_resume(engine, tmp_path):
    cfg = cfg_for(tmp_path)
    d = checkpoint.ckpt_dir(cfg)
    os.makedirs(os.path.join(d, "tmp-step00000001"))  # a first save killed: no checkpoint yet -> fresh start
    open(os.path.join(d, "tmp-step00000001", "zero_pp_rank_0_mp_rank_00_model_states.pt"), "wb").write(b"\0" * 9)
    assert checkpoint.find_resume(cfg) is None
    save_steps(engine, cfg, [1])
    os.makedirs(os.path.join(d, "tmp-step00000002"))  # a later save killed: resume from the last complete one
    os.makedirs(os.path.join(d, "tmp-prune-step00000000"))
    assert checkpoint.find_resume(cfg)[1] == "step00000001"
    save_steps(engine, cfg, [3])  # the next save sweeps the leftovers
    assert ckpts(cfg) == ["latest", "step00000001", "step00000003"]


# ---------------------------------------------------------------------------- world size
def test_world_size_change_is_refused_before_loading(engine, tmp_path):
    cfg = cfg_for(tmp_path)
    path, = save_steps(engine, cfg, [1])
    m = json.load(open(os.path.join(path, checkpoint.MANIFEST)))
    checkpoint.atomic.write_json(os.path.join(path, checkpoint.MANIFEST), dict(m, world_size=8))
    calls = []
    fake = types.SimpleNamespace(dp_world_size=1, load_checkpoint=lambda *a, **k: calls.append(a))
    with pytest.raises(ConfigError, match=r"saved by 8 ranks, this run has 1: .*resume with 8 ranks, or convert "
                                          r"it: python -m distillery.checkpoint --to-universal") as e:
        checkpoint.load(fake, cfg, (checkpoint.ckpt_dir(cfg), "step00000001"))
    one_line(e)
    assert calls == []  # nothing was loaded


def test_universal_resume_is_exact_with_two_optimizer_groups(tmp_path):
    """Issue 24 (6): DeepSpeed's ZeRO-3 universal loader (0.19.8) copies param group 0's hyperparameters into every
    group, so after `--to-universal` the no-decay group (norms, biases) was decayed: the first loss after the resume
    matched, later ones drifted. checkpoint.load puts each group's own back; the continuation is now bitwise the
    uninterrupted run's."""
    cfg = types.SimpleNamespace(run_dir=str(tmp_path / "run"), resume="auto", keep_last=0)
    a = build_engine(groups=True)
    for s in (1, 2):
        train_step(a, s)
    src = checkpoint.save(a, cfg, 2, {"step": 2})
    want_groups = [g["weight_decay"] for g in a.optimizer.param_groups]
    for s in (3, 4, 5):
        train_step(a, s)
    checkpoint.to_universal(src)
    b = build_engine(universal=True, groups=True)
    checkpoint.load(b, cfg, (checkpoint.ckpt_dir(cfg), "step00000002-universal"))
    assert [g["weight_decay"] for g in b.optimizer.param_groups] == want_groups == [0.1, 0.0]
    for s in (3, 4, 5):
        train_step(b, s)
    for x, y in zip(weights(a), weights(b)):
        assert torch.equal(x, y)


def test_verify_cli(engine, tmp_path, capsys):
    cfg = cfg_for(tmp_path, keep_last=0)
    a, b = save_steps(engine, cfg, [1, 2])
    os.truncate(biggest_file(a), 0)
    assert checkpoint.main([checkpoint.ckpt_dir(cfg)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok: step00000002") and out[1].startswith("BAD: step00000001: ")
    os.remove(os.path.join(b, checkpoint.MANIFEST))  # a pre-manifest checkpoint is adopted by hand
    assert checkpoint.verify(b) is not None
    assert checkpoint.main(["--adopt", b]) == 0 and checkpoint.verify(b) is None
    assert json.load(open(os.path.join(b, checkpoint.MANIFEST)))["world_size"] == 1


# ---------------------------------------------------------------------------- two ranks (slow: a launcher)
TWO_RANKS = """
import os, sys, types
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from test_checkpoint import build_engine, train_step, weights
from distillery import checkpoint
engine = build_engine(world=2)
rank = int(os.environ["RANK"])
cfg = types.SimpleNamespace(run_dir={run!r}, resume="auto", keep_last=2)
for s in (1, 2, 3):
    train_step(engine, 10 * s + rank)
    path = checkpoint.save(engine, cfg, s, {{"step": s}})
w3 = weights(engine)
train_step(engine, 100 + rank)  # the step after the checkpoint, rank r on its own data
if rank == 0:
    torch.save({{"w3": w3, "w4": weights(engine)}}, {run!r} + "/weights.pt")
    os.rename(path + "/manifest.json", path + "/hidden")  # step 3 looks broken: both ranks must agree on step 2
sys.stdout.write(f"rank {{rank}} resumes {{checkpoint.find_resume(cfg)[1]}}\\n")  # one write: ranks share the pipe
sys.stdout.flush()
if rank == 0:
    os.rename(path + "/hidden", path + "/manifest.json")
dist.barrier()
sys.stdout.write(f"rank {{rank}} then {{checkpoint.find_resume(cfg)[1]}}\\n")
sys.stdout.flush()
from distillery.launch import shutdown
shutdown()  # leave the gloo group: exiting with it live can abort in C++ teardown after the work is done
"""


@pytest.mark.slow
def test_two_ranks_then_world_size_change_through_universal(tmp_path):
    """2 ranks save (sha256 split over the ranks, keep_last=2) and agree on the fallback; resuming on 1 rank is
    refused before loading, and works after --to-universal, continuing exactly (Adam state included)."""
    from distillery.launch import free_port
    run = str(tmp_path / "run")
    os.makedirs(run)
    script = tmp_path / "two.py"
    script.write_text(TWO_RANKS.format(tests=str(REPO / "tests"), run=run))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script)], cwd=REPO, env=dict(clean_env(), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for r in (0, 1):
        assert f"rank {r} resumes step00000002" in p.stdout and f"rank {r} then step00000003" in p.stdout
    d = os.path.join(run, "checkpoints")
    assert sorted(n for n in os.listdir(d) if n.startswith("step")) == ["step00000002", "step00000003"]
    src = os.path.join(d, "step00000003")
    m = json.load(open(os.path.join(src, checkpoint.MANIFEST)))
    assert m["world_size"] == 2 and len([e for e in m["files"] if "optim_states" in e["path"]]) == 2
    assert checkpoint.verify(src) is None
    cfg = types.SimpleNamespace(run_dir=run, resume="auto")
    with pytest.raises(ConfigError, match="saved by 2 ranks, this run has 1: .* --to-universal"):
        checkpoint.load(build_engine(world=1, grad_accum=2), cfg, (d, "step00000003"))
    assert checkpoint.main(["--to-universal", src]) == 0
    uni = src + checkpoint.UNIVERSAL_SUFFIX
    assert checkpoint.verify(uni) is None and checkpoint.is_universal((d, os.path.basename(uni)))
    assert checkpoint.find_resume(types.SimpleNamespace(run_dir=run, resume="auto"))[1] == "step00000003"
    with pytest.raises(ConfigError, match="built without checkpoint.load_universal"):
        checkpoint.load(build_engine(world=1, grad_accum=2), cfg, (d, os.path.basename(uni)))
    ds = checkpoint.ds_config_for_resume({"zero_optimization": {"stage": 3}}, (d, os.path.basename(uni)))
    assert ds["checkpoint"] == {"load_universal": True}
    one = build_engine(world=1, grad_accum=2, universal=True)
    cfg.resume = uni
    client = checkpoint.load(one, cfg, checkpoint.find_resume(cfg))
    assert client["step"] == 3
    want = torch.load(os.path.join(run, "weights.pt"))
    assert all(torch.equal(a, b) for a, b in zip(want["w3"], weights(one)))
    train_step(one, 100)  # 1 rank x 2 micro-batches == 2 ranks x 1
    train_step(one, 101)
    for a, b in zip(want["w4"], weights(one)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    os.truncate(os.path.join(d, "step00000002", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), 0)
    with pytest.raises(TrainingError, match="cannot convert .*not intact: .*zero-length"):
        checkpoint.to_universal(os.path.join(d, "step00000002"))
    assert not os.path.exists(os.path.join(d, "step00000002" + checkpoint.UNIVERSAL_SUFFIX))
