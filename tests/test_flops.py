"""distillery/flops.py: exact parameter counts, FLOPs by hand, the compute-matched budget, the ledger and its file."""
import json

import pytest
import torch

from distillery import flops
from distillery.errors import ConfigError
from distillery.models import hf_config

V, S = 512, 64  # the test data's vocab and row length


def numel(cfg, device="cpu"):
    """sum(p.numel()) of the instantiated model (parameters() yields a tied matrix once)."""
    from transformers import AutoModelForCausalLM
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["micro", "micro-qwen3", "tiny-student", "tiny-teacher"])
def test_param_count_equals_instantiated_model(preset):
    cfg = hf_config(preset, V, S)
    assert flops.param_counts(cfg)["total"] == numel(cfg)


@pytest.mark.parametrize("preset", ["llama3-0.7b", "qwen3-0.28b"])
def test_param_count_equals_paper_sized_model_on_meta(preset):
    # meta device: the real module tree without allocating a gigabyte of weights
    cfg = hf_config(preset, V, S)
    assert flops.param_counts(cfg)["total"] == numel(cfg, "meta")


def test_paper_table_sizes():
    # paper_setup.md, 'Models': 0.691B, 1.666B, 3.783B, 8.030B (total parameters, untied 128256-row embeddings)
    for preset, billions in [("llama3-0.7b", 0.691), ("llama3-1.7b", 1.666), ("llama3-3.8b", 3.783),
                             ("llama3-8b", 8.030)]:
        assert round(flops.param_counts(hf_config(preset, V, S))["total"] / 1e9, 3) == billions


def test_other_layouts_with_biases_match_instantiated_models():
    # the bias / qk-norm branches of param_counts against transformers' own modules
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    shape = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48)
    for cfg in (LlamaConfig(**shape, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
                Qwen3Config(**shape, head_dim=8, attention_bias=True, tie_word_embeddings=False),
                Qwen2Config(**shape, tie_word_embeddings=False), MistralConfig(**shape, head_dim=8)):
        assert flops.param_counts(cfg)["total"] == numel(cfg), cfg.model_type


def test_micro_by_hand():
    cfg = hf_config("micro", V, S)  # hidden 64, 2 layers, 4 q heads / 2 kv heads of 16, FFN 128, untied, V = 512
    q, k, v, o = 64 * 64, 64 * 32, 64 * 32, 64 * 64            # 4096 + 2048 + 2048 + 4096 = 12288
    mlp = 3 * 64 * 128                                          # gate, up, down: 24576
    blocks = 2 * (q + k + v + o + mlp)                          # 73728
    head = 512 * 64                                             # lm_head matmul: 32768
    n = blocks + head                                           # N = 106496 (embedding lookup not counted)
    assert n == 106496
    pc = flops.param_counts(cfg)
    assert pc["matmul"] == n
    assert pc["non_embedding"] == blocks + 2 * 2 * 64 + 64      # + 2 RMSNorms per layer + final norm = 74048
    assert pc["total"] == 512 * 64 + 512 * 64 + 74048           # embedding + untied head + the rest = 139584
    attn = 2 * 2 * 64 * 64                                      # 2 * n_layers * S * d_attn (S/2 average ctx): 16384
    assert flops.attention_flops_per_token(cfg, 64) == attn
    assert flops.attention_flops_per_token(cfg, 64, causal=False) == 2 * attn  # full S
    assert flops.forward_flops_per_token(cfg, 64) == 2 * 106496 + 16384 == 229376
    assert flops.train_flops_per_token(cfg, 64) == 6 * 106496 + 3 * 16384 == 688128
    assert flops.student_train_flops(cfg, 1000, 64) == 688_128_000
    assert flops.teacher_forward_flops(cfg, 1000, 64) == 229_376_000


def test_micro_qwen3_tied_head_still_counts_its_matmul():
    cfg = hf_config("micro-qwen3", V, S)  # same shapes as micro, tied embeddings, qk-norm
    pc = flops.param_counts(cfg)
    assert pc["lm_head"] == 0 and pc["matmul"] == 73728 + 512 * 64 == 106496
    assert pc["total"] == 512 * 64 + 73728 + 2 * (2 * 64 + 2 * 16) + 64 == 106880


def test_llama3_1_7b_by_hand():
    cfg = hf_config("llama3-1.7b", V, S)  # d 2048, 16 layers, 32 q / 8 kv heads of 128, FFN 8192, V 128256
    q = o = 2048 * 4096                                         # 8388608 each
    k = v = 2048 * 1024                                         # 2097152 each
    mlp = 3 * 2048 * 8192                                       # 50331648
    n = 16 * (q + k + v + o + mlp) + 128256 * 2048              # 1140850688 + 262668288
    assert flops.matmul_params(cfg) == n == 1_403_518_976
    attn = 2 * 16 * 8192 * 4096                                 # 2 * n_layers * S * d_attn at S = 8192: 1073741824
    assert flops.train_flops_per_token(cfg, 8192) == 6 * n + 3 * attn == 11_642_339_328
    # 50B tokens of student training: 5.82e20 FLOPs
    assert flops.student_train_flops(cfg, 50 * 10**9, 8192) == 50 * 10**9 * 11_642_339_328


@pytest.mark.parametrize("pretrain", [False, True])
def test_compute_matched_tokens_round_trip(pretrain):
    st, te = hf_config("tiny-student", V, S), hf_config("tiny-teacher", V, S)
    d_s, pre, n_st = 1_000_003, 7.3e15, 3
    kw = dict(count_teacher_pretraining=pretrain, teacher_pretrain_flops=pre, n_students=n_st)
    distilled = flops.distillation_flops(st, te, d_s, S, **kw)
    expected = (flops.student_train_flops(st, d_s, S) + flops.teacher_forward_flops(te, d_s, S)
                + (pre / n_st if pretrain else 0))
    assert distilled == pytest.approx(expected, rel=1e-12)
    tokens = flops.compute_matched_tokens(st, te, d_s, S, **kw)
    assert tokens > d_s  # the baseline gets more tokens for the teacher's forward passes
    per_token = flops.train_flops_per_token(st, S)
    assert abs(flops.student_train_flops(st, tokens, S) - distilled) <= per_token
    step = 8 * S
    rounded = flops.compute_matched_tokens(st, te, d_s, S, multiple_of=step, **kw)
    assert rounded % step == 0 and abs(flops.student_train_flops(st, rounded, S) - distilled) <= per_token * step


def test_ledger_metrics_and_resume():
    st, te = hf_config("micro", V, S), hf_config("tiny-teacher", V, S)
    led = flops.ComputeLedger(st, S, te, teacher_pretrain_flops=6e12, n_students=2)
    led.add_step(512)
    led.add_step(512, teacher_tokens=0)  # e.g. a step where the alpha schedule had the teacher off
    m = led.metrics()
    s_f, t_f = 1024 * 688128, 512 * flops.forward_flops_per_token(te, S)
    assert m["compute/student_flops"] == s_f and m["compute/teacher_flops"] == t_f
    assert m["compute/teacher_pretrain_flops"] == 3e12 and m["compute/total_flops"] == s_f + t_f + 3e12
    assert m["compute/teacher_share"] == pytest.approx((t_f + 3e12) / (s_f + t_f + 3e12))
    assert m["compute/step_flops"] == 512 * 688128 and m["compute/tokens"] == 1024
    again = flops.ComputeLedger.from_dict(json.loads(json.dumps(led.to_dict())), st, te)
    assert again.metrics() == m
    base = flops.ComputeLedger(st, S)  # no teacher: share 0, no pretraining term
    base.add_step(512)
    assert base.metrics()["compute/teacher_share"] == 0.0 and base.total_flops == 512 * 688128
    with pytest.raises(ConfigError, match="another student"):
        flops.ComputeLedger(te, S).load_state_dict(base.to_dict())


def test_cached_ledger_charges_the_caches_forward_not_a_live_one():
    """Issue 20, item 2: a cached run's ledger has no live teacher forward; the forward its cache spent on its tokens
    is its own line (teacher_cache) and in run_flops, so run_flops equal the online run's; the state round-trips and a
    checkpoint of an online run does not load into a cached ledger."""
    st, te = hf_config("micro", V, S), hf_config("tiny-teacher", V, S)
    online, cached = flops.ComputeLedger(st, S, te), flops.ComputeLedger(st, S, te, cached=True)
    for led in (online, cached):
        led.add_step(512)
        led.add_step(512)
    m, c = online.metrics(), cached.metrics()
    t_f = 1024 * flops.forward_flops_per_token(te, S)
    assert c["compute/teacher_flops"] == 0 and c["compute/teacher_cache_flops"] == t_f == m["compute/teacher_flops"]
    assert c["compute/run_flops"] == m["compute/run_flops"] == 1024 * 688128 + t_f
    for k in ("compute/teacher_share", "compute/step_flops"):
        assert c[k] == m[k], k
    assert c["compute/teacher_cache_tokens"] == 1024 and c["compute/teacher_tokens"] == 0
    d = cached.to_dict()
    assert d["flops"]["teacher_cache"] == t_f and d["flops"]["run"] == d["flops"]["total"] == c["compute/run_flops"]
    assert flops.ComputeLedger.from_dict(json.loads(json.dumps(d)), st, te).metrics() == c
    with pytest.raises(ConfigError, match="without a teacher cache"):
        flops.ComputeLedger(st, S, te, cached=True).load_state_dict(online.to_dict())


def test_export_compute_file(tmp_path):
    st = hf_config("micro", V, S)
    assert flops.read_export_compute(str(tmp_path)) is None and flops.export_pretrain_flops(str(tmp_path)) is None
    led = flops.ComputeLedger(st, S)
    led.add_step(4096)
    path = flops.write_export_compute(str(tmp_path), led.to_dict())
    got = flops.read_export_compute(str(tmp_path))
    assert path.endswith("distillery_compute.json") and got == json.loads(json.dumps(led.to_dict()))
    assert flops.export_pretrain_flops(str(tmp_path)) == 4096 * 688128
    (tmp_path / "distillery_compute.json").write_text('{"schema": "distillery_compute/1"}')
    with pytest.raises(ConfigError, match="lacks"):
        flops.read_export_compute(str(tmp_path))
    with pytest.raises(ConfigError, match="not a distillery_compute/1 record"):
        flops.write_export_compute(str(tmp_path), {"flops": 1})


def test_config_from_export_dir_and_bad_inputs(tmp_path):
    cfg = hf_config("micro-qwen3", V, S)
    cfg.save_pretrained(tmp_path)  # an export's config.json
    assert flops.param_counts(str(tmp_path)) == flops.param_counts(cfg)
    with pytest.raises(ConfigError, match="model types"):
        flops.param_counts({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="seq_len"):
        flops.train_flops_per_token(cfg, 0)
    with pytest.raises(ConfigError, match="n_students"):
        flops.compute_matched_tokens(cfg, cfg, 10, S, True, 1.0, n_students=0)
