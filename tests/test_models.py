"""Model presets match the paper's shapes; ZeRO-3 construction initialises like plain construction."""
import pytest
import torch

from distillery.models import PRESETS, hf_config, zero3_context


def n_params(cfg):
    """Parameter count from the shapes alone (no model built): embeddings, attention, SwiGLU MLP, norms, head."""
    h, L, f, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    hd, q, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    attn = h * q * hd * 2 + h * kv * hd * 2
    qk_norm = 2 * hd if cfg.model_type == "qwen3" else 0
    per_layer = attn + 3 * h * f + 2 * h + qk_norm
    return v * h * (1 if cfg.tie_word_embeddings else 2) + L * per_layer + h


@pytest.mark.parametrize("preset, billions", [("llama3-0.7b", 0.691), ("llama3-1.7b", 1.666),
                                              ("llama3-3.8b", 3.783), ("llama3-8b", 8.030)])
def test_llama3_sizes_match_paper(preset, billions):
    cfg = hf_config(preset, 128256, 8192)
    assert cfg.vocab_size == 128256 and cfg.rope_parameters["rope_theta"] == 500000.0
    assert cfg.num_attention_heads == 32 and cfg.num_key_value_heads == 8 and not cfg.tie_word_embeddings
    assert n_params(cfg) / 1e9 == pytest.approx(billions, abs=0.0015)


@pytest.mark.parametrize("preset", ["qwen3-0.14b", "qwen3-0.28b", "qwen3-0.6b", "qwen3-1.0b"])
def test_qwen3_presets(preset):
    cfg = hf_config(preset, 151936, 8192)
    assert cfg.model_type == "qwen3" and cfg.tie_word_embeddings and cfg.vocab_size == 151936
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_parameters["rope_theta"] == 1e6


def test_preset_count_matches_the_real_model():
    from transformers import AutoModelForCausalLM
    for preset in ("micro", "micro-qwen3"):
        cfg = hf_config(preset, 512, 64)
        m = AutoModelForCausalLM.from_config(cfg)
        assert sum(p.numel() for p in m.parameters()) == n_params(cfg)


def test_paper_preset_rejects_bigger_tokenizer():
    from distillery.shards import DataError
    with pytest.raises(DataError, match="prepare the data with the model's tokenizer"):
        hf_config("llama3-1.7b", 200000, 8192)


def test_zero3_init_matches_plain_init_distribution(tmp_path):
    """Built under HfDeepSpeedConfig (ZeRO-3), the gathered weights have the std transformers intends (0.02),
    not the std of a bare zero.Init construction."""
    import deepspeed
    import torch.distributed as dist
    from distillery.launch import init_distributed
    if not dist.is_initialized():
        init_distributed()
    from transformers import AutoModelForCausalLM
    cfg = hf_config("tiny-student", 2048, 128)
    torch.manual_seed(0)
    with zero3_context({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
        m = AutoModelForCausalLM.from_config(cfg)
    w = m.model.layers[0].mlp.up_proj.weight
    assert hasattr(w, "ds_id") and w.numel() == 0  # really partitioned
    with deepspeed.zero.GatheredParameters([w, m.lm_head.weight]):
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
        assert m.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
