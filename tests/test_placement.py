"""Teacher placement (distillery/placement.py) and its accounting (distillery/zero_cost.py): the counts against real
models, auto's choice and the line that says why, the replicated teacher (a plain module in the run's dtype), and
replicated vs partitioned: the same teacher outputs and losses, bitwise, a resume across the two, and the bytes
each moves (distillery/commcount.py) against the prediction."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env, read_metrics, run_inprocess, run_launcher
from distillery import zero_cost
from distillery.config import Config
from distillery.errors import ConfigError
from distillery.models import hf_config
from distillery.placement import GiB, build_teacher, decide

BF16_Z3 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
PAPER = Config(micro_batch_size=2, seq_len=8192, grad_ckpt=True)  # the paper configs' per-GPU batch


def llama_dir(tmp, name, vocab=512, hidden=64, layers=2, ffn=128, tie=False):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(len(name))
    c = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=ffn, head_dim=hidden // 4, tie_word_embeddings=tie,
                    max_position_embeddings=64, use_cache=False)
    AutoModelForCausalLM.from_config(c).save_pretrained(tmp / name)
    return str(tmp / name)


@pytest.mark.parametrize("preset", ["micro", "micro-qwen3", "tiny-teacher", "llama3-0.7b"])
def test_tensor_numels_are_the_models_parameters(preset):
    from transformers import AutoModelForCausalLM
    c = hf_config(preset, 512, 64)
    with torch.device("meta"):  # shapes only
        m = AutoModelForCausalLM.from_config(c)
    assert zero_cost.tensor_numels(c) == {n: p.numel() for n, p in m.named_parameters()}


def test_teacher_bytes_and_memory_by_hand():
    # llama3-0.7b: norms (2 per layer + final, 1024 each) are at most the 1e5-element persistence threshold, every
    # matrix is above it; 1024-wide tensors split evenly over 8 ranks (no padding)
    c = hf_config("llama3-0.7b", 0, 8192)
    p = 690_512_896
    persistent = 25 * 1024
    assert zero_cost.teacher_gather_bytes(c, 8, 2) == (p - persistent) * 2 * 7 / 8
    assert zero_cost.teacher_gather_bytes(c, 1, 2) == 0
    assert zero_cost.teacher_resident_bytes("replicated", c, 64, 2) == 2 * p
    assert zero_cost.partition_elems(c, 8) == persistent + (p - persistent) // 8
    # tied (qwen3): the fused head gathers the embedding a second time; odd sizes are padded to a multiple of n
    q = hf_config("qwen3-0.14b", 0, 64)
    n = zero_cost.tensor_numels(q)
    parted = sum(-(-v // 3) * 3 for v in n.values() if v > 100_000)
    emb = -(-n["model.embed_tokens.weight"] // 3) * 3
    assert zero_cost.teacher_gather_bytes(q, 3, 4) == pytest.approx((parted + emb) * 4 * 2 / 3)


def test_auto_picks_by_memory_and_says_why():
    s, t = hf_config("llama3-1.7b", 0, 8192), hf_config("llama3-8b", 0, 8192)
    picks = {m: decide(PAPER, BF16_Z3, 8, t, s, memory=(m * GiB, f"{m} GiB")) for m in (80, 24, 12)}
    assert [picks[m].placement for m in (80, 24, 12)] == ["replicated", "partitioned", "offload"]
    d = picks[80]
    assert d.numbers["teacher_replicated"] == 2 * 8_030_261_248
    assert d.line.startswith("teacher replicated (auto): 15 GiB per rank, saves 14 GB of all-gather per micro-step; ")
    assert "free of 80 GiB (80 GiB) next to the student's" in d.line
    # partition: 65 norms of 4096 whole, the rest / 8; working set: the embedding (128256 x 4096) + a 5e7 bucket
    assert picks[24].line.startswith("teacher partitioned (auto): 1.87 GiB per rank (8.03B parameters over 8) + "
                                     "1.07 GiB gathered while it runs, all-gathers 14 GB per micro-step; replicated "
                                     "needs 15 GiB, ")
    assert picks[12].line.startswith("teacher offload (auto): parameters in CPU memory, 16 GB host-to-device")
    # the example: the 0.7B teacher at 64 GPUs
    d = decide(PAPER, BF16_Z3, 64, hf_config("llama3-0.7b", 0, 8192), s, memory=(80 * GiB, "H100"))
    assert d.line.startswith("teacher replicated (auto): 1.29 GiB per rank, saves 1.4 GB of all-gather per micro-step")
    # a set placement is kept, and said not to fit when the estimate says so
    set_rep = Config(micro_batch_size=2, seq_len=8192, grad_ckpt=True, teacher_placement="replicated")
    d = decide(set_rep, BF16_Z3, 8, t, s, memory=(12 * GiB, "12 GiB"))
    assert d.placement == "replicated" and d.line.startswith("teacher replicated (set): ")
    assert d.line.endswith("(estimate: it does not fit; auto would pick offload)")
    one = decide(PAPER, BF16_Z3, 1, t, s, memory=(80 * GiB, "80 GiB"))
    assert "no ZeRO hooks on its forward (one rank: nothing to gather either way)" in one.line


def test_old_offload_key_is_refused_with_the_new_spelling(tmp_path):
    from distillery.config import load_config
    with pytest.raises(ConfigError, match="teacher_offload was replaced by teacher_placement: write "
                                          "teacher_placement=offload for true"):
        load_config(None, ["teacher_offload=true"])
    (tmp_path / "c.yaml").write_text("teacher_offload: false\n")
    with pytest.raises(ConfigError, match=f"in {tmp_path / 'c.yaml'}: teacher_offload was replaced"):
        load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="teacher_placement='zero3': use auto | replicated | partitioned | offload"):
        load_config(None, ["teacher_placement=zero3"])


@pytest.mark.parametrize("ds,dtype", [(BF16_Z3, torch.bfloat16), ({"zero_optimization": {"stage": 3}}, torch.float32)])
def test_replicated_teacher_is_a_plain_module_in_the_run_dtype(teacher_dir, ds, dtype):
    t = build_teacher(Config(teacher=teacher_dir, teacher_placement="replicated"), ds)
    mods = list(t.module.modules())
    assert all(p.dtype == dtype and not hasattr(p, "ds_id") for p in t.module.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mods)  # no ZeRO hooks on its forward
    assert t.module.head_weight.dtype == dtype and t.device == torch.device("cpu")


def test_replicated_and_partitioned_runs_match_bitwise_and_resume_across(data_dir, teacher_dir, tmp_path):
    """One rank, in process: 4 steps with a partitioned teacher == 2 steps replicated + resume=auto 2 steps
    partitioned, bitwise (losses and the teacher's entropy); config.yaml says which placement and why."""
    common = [f"teacher={teacher_dir}", "alpha=0.4", "seed=46", "save_interval=2", "callbacks=[entropy]"]
    run_inprocess(data_dir, tmp_path, "name=p", "teacher_placement=partitioned", "max_steps=4", *common)
    run_inprocess(data_dir, tmp_path, "name=r", "max_steps=2", *common)  # auto: replicated on one rank
    head = (tmp_path / "r" / "config.yaml").read_text().splitlines()
    assert head[0].startswith("# teacher replicated (auto): ") and "teacher_placement: replicated" in head
    run_inprocess(data_dir, tmp_path, "name=r", "teacher_placement=partitioned", "resume=auto", "max_steps=2",
                  *common)
    head = (tmp_path / "r" / "config.yaml").read_text().splitlines()
    assert head[0].startswith("# teacher partitioned (set): ") and "teacher_placement: partitioned" in head
    history = [json.loads(x) for x in (tmp_path / "r" / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["teacher_placement"] == {"old": "replicated", "new": "partitioned"}
    p, r = read_metrics(tmp_path / "p")[0], read_metrics(tmp_path / "r")[0]
    assert sorted(p) == sorted(r) == [1, 2, 3, 4]
    for s in p:
        for k in ("loss/total", "loss/ce", "loss/kd", "entropy/teacher", "entropy/kl_t_s"):
            assert r[s][k] == p[s][k], (s, k)


def test_two_ranks_same_teacher_outputs_and_bytes_as_predicted(tmp_path):
    """2 CPU ranks (gloo): the partitioned and the replicated teacher give bitwise-equal hidden states and head
    weights; in the trainer's micro-step the replicated one moves nothing, the partitioned one exactly
    zero_cost.teacher_gather_bytes (a teacher with tensors on both sides of the persistence threshold)."""
    teacher = llama_dir(tmp_path, "teacher", hidden=256, ffn=512)  # embedding / head / MLP partitioned, q/k/v not
    student = llama_dir(tmp_path, "student")
    job = {"worker": "placement", "teacher": teacher, "student": student, "vocab": 512, "out": str(tmp_path / "out")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    p = subprocess.run([sys.executable, "tests/harness.py", str(tmp_path / "job.json")], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=clean_env())
    assert p.returncode == 0, p.stderr[-3000:]
    want = zero_cost.teacher_gather_bytes(teacher, 2, 4)
    assert want > 0
    for r in range(2):
        res = json.loads((tmp_path / "out" / f"rank{r}.json").read_text())
        assert res["hidden_equal"] and res["head_equal"]
        assert res["partitioned_hooked"] and not res["replicated_hooked"]
        assert res["replicated_bytes"] == {}                       # no collective at all in the teacher's share
        assert res["partitioned_bytes"] == {"all_gather": want}


@pytest.mark.slow
def test_two_rank_trainer_replicated_equals_partitioned_and_resumes_across(data_dir, teacher_dir, tmp_path):
    """The launcher with 2 CPU ranks (~4 min here): 4 steps partitioned == 2 steps replicated + 2 resumed
    partitioned, bitwise, document boundaries included (seed 46)."""
    common = [f"teacher={teacher_dir}", "alpha=0.4", "seed=46", "save_interval=2", "callbacks=[entropy]"]
    run_launcher(data_dir, tmp_path, "name=p", "teacher_placement=partitioned", "max_steps=4", *common)
    run_launcher(data_dir, tmp_path, "name=r", "teacher_placement=replicated", "max_steps=2", *common)
    run_launcher(data_dir, tmp_path, "name=r", "teacher_placement=partitioned", "resume=auto", "max_steps=2",
                 *common)
    p, r = read_metrics(tmp_path / "p")[0], read_metrics(tmp_path / "r")[0]
    assert sorted(p) == sorted(r) == [1, 2, 3, 4]
    for s in p:
        for k in ("loss/total", "loss/ce", "loss/kd", "entropy/teacher", "entropy/kl_t_s"):
            assert r[s][k] == p[s][k], (s, k)
    assert os.path.isdir(tmp_path / "r" / "checkpoints")
