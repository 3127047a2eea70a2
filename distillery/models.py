"""Model presets (paper_setup.md, 'Models'), construction under ZeRO-3, teacher loading, vocab checks, HF export.

Construction goes through transformers (`AutoModelForCausalLM.from_config` / `from_pretrained`) while a
`HfDeepSpeedConfig` for the engine's ZeRO-3 config is alive: transformers then builds under `deepspeed.zero.Init`
*and* runs its own weight init on the gathered parameters. Building under a bare zero.Init skips that init (the
anchor run's loss 138 at step 0 instead of ln V, peers_and_pitfalls.md). HfDeepSpeedConfig is a process-global weak
reference, so each model is built inside its own short-lived `zero3_context` and the two configs never overlap.
"""
import contextlib
import importlib.util
import json
import os
import shutil

import torch

from distillery import atomic
from distillery.errors import ConfigError, DataError
from distillery.shards import check_tokenizer

LLAMA3 = dict(arch="llama", heads=32, kv_heads=8, head_dim=128, vocab=128256, tie=False, rope_theta=500000.0,
              rms_eps=1e-5)
QWEN3 = dict(arch="qwen3", vocab=151936, tie=True, rope_theta=1e6, rms_eps=1e-6)
TINY = dict(arch="llama", vocab=None, tie=False, rope_theta=500000.0, rms_eps=1e-5)  # vocab: the data's

PRESETS = {
    # the paper's Llama-3 family (0.691B, 1.666B, 3.783B, 8.030B)
    "llama3-0.7b": dict(LLAMA3, hidden=1024, layers=12, ffn=8192),
    "llama3-1.7b": dict(LLAMA3, hidden=2048, layers=16, ffn=8192),
    "llama3-3.8b": dict(LLAMA3, hidden=3072, layers=28, ffn=8192),
    "llama3-8b": dict(LLAMA3, hidden=4096, layers=32, ffn=14336),
    # the Qwen3-style other-architecture experiment (qk-norm, tied embeddings)
    "qwen3-0.14b": dict(QWEN3, hidden=512, layers=20, heads=8, kv_heads=4, head_dim=64, ffn=1536),
    "qwen3-0.28b": dict(QWEN3, hidden=768, layers=24, heads=12, kv_heads=4, head_dim=64, ffn=2304),
    "qwen3-0.6b": dict(QWEN3, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=3072),
    "qwen3-1.0b": dict(QWEN3, hidden=1536, layers=28, heads=12, kv_heads=4, head_dim=128, ffn=4608),
    # CPU-sized Llama-3 layout for the offline study and tests
    # (sized so the whole offline study, teacher + distilled student + baseline, fits 15 minutes on 2 CPU cores)
    "tiny-teacher": dict(TINY, hidden=96, layers=2, heads=4, kv_heads=2, head_dim=24, ffn=256),
    "tiny-student": dict(TINY, hidden=192, layers=4, heads=4, kv_heads=2, head_dim=48, ffn=512),
    "micro": dict(TINY, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128),
    "micro-qwen3": dict(QWEN3, vocab=None, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128),
}


def attn_implementation(requested="auto"):
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"  # PyTorch SDPA: flash / cuDNN / memory-efficient kernels on GPU, math on CPU


def hf_config(preset, data_vocab, seq_len, attn_impl="auto"):
    """transformers config for a preset. Tiny presets take the data's vocab; paper presets keep theirs and must
    hold the data's tokenizer."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; presets: {', '.join(PRESETS)} "
                        f"(or set student_init=<hf dir>)")
    p = PRESETS[preset]
    vocab = p["vocab"] or data_vocab
    if data_vocab > vocab:
        raise DataError(f"preset {preset} has vocab {vocab} but the data's tokenizer has {data_vocab} tokens; "
                        f"prepare the data with the model's tokenizer")
    from transformers import LlamaConfig, Qwen3Config
    common = dict(vocab_size=vocab, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                  num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"],
                  intermediate_size=p["ffn"], rms_norm_eps=p["rms_eps"], tie_word_embeddings=p["tie"],
                  max_position_embeddings=max(seq_len, 8192), use_cache=False,
                  rope_parameters={"rope_type": "default", "rope_theta": p["rope_theta"]})
    families = {"llama": LlamaConfig, "qwen3": Qwen3Config}  # a new family: its config class here + a preset
    if p["arch"] not in families:
        raise ConfigError(f"preset {preset!r} has architecture {p['arch']!r}; supported: {', '.join(families)}")
    cls = families[p["arch"]]
    cfg = cls(**common)
    cfg._attn_implementation = attn_implementation(attn_impl)
    return cfg


@contextlib.contextmanager
def zero3_context(ds_config):
    """Keep a HfDeepSpeedConfig alive while a model is built, so transformers partitions it and initialises the
    gathered weights (only for ZeRO stage 3; a no-op otherwise)."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (weakly referenced by transformers while alive)
    try:
        yield
    finally:
        del keep


def build_student(cfg, data_vocab, seq_len, ds_config):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(cfg.seed)  # same init on every rank and for every world size
    with zero3_context(ds_config):
        if cfg.student_init:
            model = load_pretrained(cfg.student_init, cfg, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(hf_config(cfg.student, data_vocab, seq_len, cfg.attn_impl),
                                                     dtype=torch.float32)
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_pretrained(path, cfg, dtype):
    from transformers import AutoModelForCausalLM
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"model directory {path!r} not found (no config.json); give a Hugging Face-format "
                        f"directory, e.g. runs/<teacher run>/export")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=cfg.trust_remote_code,
                                                attn_implementation=attn_implementation(cfg.attn_impl))


def check_model_dir(path, data_index, who="teacher"):
    """Before any model is built: the directory exists and speaks the data's tokenizer. Returns the shared vocab.

    A padded embedding (e.g. 151936 vs 152064 rows) is fine: KD runs over the shared real vocab. A tokenizer whose
    token -> id map differs is a different tokenizer, and distilling across it would silently compare unrelated
    tokens, so it stops the run here (shards.check_tokenizer)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"{who} {path!r} not found (no config.json); train one with `deepspeed train.py "
                        f"--ds_config ds_configs/cpu.json --config configs/offline/teacher.yaml` or point {who}= "
                        f"at another runs/<name>/export directory")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  (any failure means we cannot verify the tokenizer)
        raise DataError(f"{who} {path!r} has no loadable tokenizer ({type(e).__name__}); copy the tokenizer it "
                        f"was trained with into that directory") from None
    with open(os.path.join(path, "config.json")) as f:
        rows = json.load(f).get("vocab_size", len(tok))
    check_tokenizer(data_index, tok, who=who, model_vocab_size=rows)
    return data_index["vocab_size"]


def export_hf(lm, out_dir, data_dir, dtype, extra_files=None, rank=0):
    """Gather the (possibly ZeRO-3-partitioned) model one parameter at a time and write a Hugging Face directory:
    config.json, model.safetensors, tokenizer files. Written to a temporary name and renamed, on rank 0."""
    import deepspeed
    from safetensors.torch import save_file
    dtype = getattr(torch, dtype)
    sd, seen = {}, {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights: safetensors stores one tensor, transformers re-ties on load
            continue
        seen[id(p)] = name
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                sd[name] = p.detach().to("cpu", dtype).clone()
    if rank != 0:
        return
    with atomic.atomic_path(out_dir) as tmp:
        os.makedirs(tmp)
        lm.config.save_pretrained(tmp)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tok_dir = os.path.join(data_dir, "tokenizer")
        for fn in sorted(os.listdir(tok_dir)) if os.path.isdir(tok_dir) else []:
            shutil.copy(os.path.join(tok_dir, fn), tmp)
        for fn, src in (extra_files or {}).items():
            shutil.copy(src, os.path.join(tmp, fn))
