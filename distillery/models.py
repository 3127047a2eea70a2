"""Model presets (paper_setup.md, 'Models'), construction under ZeRO-3, teacher loading, vocab checks, HF export.

Construction goes through transformers (`AutoModelForCausalLM.from_config` / `from_pretrained`) while a
`HfDeepSpeedConfig` for the engine's ZeRO-3 config is alive: transformers then builds under `deepspeed.zero.Init`
*and* runs its own weight init on the gathered parameters. Building under a bare zero.Init skips that init (the
anchor run's loss 138 at step 0 instead of ln V, peers_and_pitfalls.md). HfDeepSpeedConfig is a process-global weak
reference, so each model is built inside its own short-lived `zero3_context` and the two configs never overlap.
"""
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil

import torch

from distillery import atomic
from distillery.errors import ConfigError, DataError
from distillery.shards import check_tokenizer, sha256_file

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


def attn_implementation(requested="auto", doc_mask=False):
    """The attention kernel: an explicit choice, or for auto the fastest one that is here. With document masking
    the mask is block-diagonal: flash-attn 2 runs it as varlen (no mask tensor at all); without flash-attn, flex
    attention compiles the block mask into a sparse kernel on GPU; SDPA would get a dense boolean mask, which rules
    out its flash kernel. On CPU (and without doc_mask) SDPA.

    An explicit choice must be a kernel transformers knows: eager, a built-in one, or one registered with
    transformers.AttentionInterface (e.g. from a plugins/ file, imported before this runs). Whether it keeps packed
    documents apart is checked at the start of every run (distillery/maskprobe.py)."""
    if requested != "auto":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if requested not in known and "/" not in requested:  # "org/repo": a hub kernel transformers fetches itself
            raise ConfigError(f"attn_impl={requested!r} is not an attention kernel transformers knows; use auto or "
                              f"one of {', '.join(known)} (a kernel of your own: register it in a plugins/ "
                              f"file with transformers.AttentionInterface.register(name, fn), and its mask with "
                              f"transformers.masking_utils.AttentionMaskInterface.register(name, mask_fn))")
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if torch.cuda.is_available() and doc_mask and importlib.util.find_spec("torch.nn.attention.flex_attention"):
        return "flex_attention"
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


def save_random_init(preset, data_dir, out, seq_len, seed=0):
    """A Hugging Face directory holding `preset` at its random initialisation (torch seed `seed`) with the data's
    vocab and tokenizer: a fixed starting point (student_init=) or a stand-in teacher, for tests and benches."""
    from transformers import AutoModelForCausalLM
    with open(os.path.join(data_dir, "index.json")) as f:
        index = json.load(f)
    torch.manual_seed(seed)
    cfg = hf_config(preset, index["vocab_size"], seq_len)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok = os.path.join(data_dir, "tokenizer")
    for fn in os.listdir(tok):
        shutil.copy(os.path.join(tok, fn), out)
    return str(out)


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


def load_pretrained(path, cfg, dtype, device=None):
    """A Hugging Face model from safetensors in `dtype`; on `device` when given (each tensor goes there from the
    mapped file: no whole-model copy in host memory), else on CPU (or partitioned, under a zero3_context)."""
    from transformers import AutoModelForCausalLM
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"model directory {path!r} not found (no config.json); give a Hugging Face-format "
                        f"directory, e.g. runs/<teacher run>/export")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=cfg.trust_remote_code,
                                                attn_implementation=attn_implementation(cfg.attn_impl),
                                                **({"device_map": {"": device}} if device is not None else {}))


# Families whose causal-LM logits are exactly lm_head(final hidden state), no bias, scale or cap: the fused KD head
# computes them as h @ W^T from the gathered output weight (distillery/fused_kd.py), so any other family would be
# distilled against logits its model never produces.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# config.json keys that transform the logits after h @ W^T (soft-capping, scaling, muP output multipliers), with the
# values that leave them untouched. Other keys matching LOGIT_KEY_PATTERN are checked the same way.
LOGIT_TRANSFORM_KEYS = {
    "final_logit_softcapping": (None, 0), "logit_softcapping": (None, 0), "output_softcapping": (None, 0),
    "logit_scale": (None, 1), "logits_scaling": (None, 1), "logit_scaling": (None, 1),
    "output_multiplier_scale": (None, 1), "lm_head_multiplier": (None, 1), "logits_multiplier": (None, 1),
    "output_logits_scale": (None, 1), "mup_output_alpha": (None, 1), "output_mult": (None, 1),
}
LOGIT_KEY_PATTERN = re.compile(r"^(final_)?logits?_|^lm_head_|^output_(logits?_)?(mult|multiplier|scale|scaling|"
                               r"softcap|softcapping)")
HEADER_MAX = 100_000_000  # safetensors' own limit on the JSON header


def _trivial(key, value):
    if key in LOGIT_TRANSFORM_KEYS:
        return value in LOGIT_TRANSFORM_KEYS[key] and not isinstance(value, str)
    if value is None or value is False:
        return True
    off = 0 if "cap" in key else 1
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == off


def check_model_config(path, who="teacher"):
    """config.json of a model directory, or a one-line error: the model type must be one whose logits are h @ W^T
    and no key may scale or cap them. Returns the parsed config."""
    fn = os.path.join(path, "config.json")
    try:
        with open(fn) as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{who} {fn} does not parse ({type(e).__name__}); re-export the model or copy it "
                        f"again") from None
    if not isinstance(conf, dict):
        raise DataError(f"{who} {fn} is not a JSON object; re-export the model or copy it again")
    mt = conf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{who} {path!r} has model_type {mt!r}; the KD head computes logits as h @ W^T, which "
                          f"holds for {', '.join(SUPPORTED_MODEL_TYPES)} only: use a model of one of those types")
    for key, value in conf.items():
        if (key in LOGIT_TRANSFORM_KEYS or LOGIT_KEY_PATTERN.match(key)) and not _trivial(key, value):
            raise ConfigError(f"{who} {path!r} sets {key}={value!r} in config.json, so its logits are not "
                              f"h @ W^T and the KD head would distill the wrong distribution; use a model without "
                              f"it (or remove the key if the weights were trained without it)")
    return conf


def weight_files(path, who="teacher"):
    """The safetensors files `from_pretrained(path, use_safetensors=True)` reads: model.safetensors, else the
    shards model.safetensors.index.json names; a one-line DataError for pickles only, no weights or a missing
    shard."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{who} {index} does not parse ({type(e).__name__}); re-export the model or copy it "
                            f"again") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise DataError(f"{who} {path!r} is missing {len(missing)} weight shard(s) its index names "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); copy them again")
        return [os.path.join(path, s) for s in shards]
    names = sorted(os.listdir(path))
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")) or n == "pytorch_model.bin.index.json"]
    if pickles:
        raise DataError(f"{who} {path!r} has weights only as pickles ({pickles[0]}), which are not loaded "
                        f"(use_safetensors=True); convert it to safetensors: AutoModelForCausalLM.from_pretrained"
                        f"(dir).save_pretrained(dir)")
    raise DataError(f"{who} {path!r} has no model weights (no model.safetensors or model.safetensors.index.json); "
                    f"export the model into it, e.g. runs/<name>/export")


def safetensors_names(fn, who="teacher"):
    """Tensor names of one safetensors file, read from its header, after checking the file is complete: 8 bytes of
    little-endian header length n, n bytes of JSON header, then exactly the data its data_offsets span."""
    size = os.path.getsize(fn)
    fix = "re-export it or copy it again"
    if size < 8:
        raise DataError(f"{who} {fn} is truncated ({size} of at least 8 bytes); {fix}")
    with open(fn, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > HEADER_MAX:
            raise DataError(f"{who} {fn} has an unreadable safetensors header (length {n}); {fix}")
        if size < 8 + n:
            raise DataError(f"{who} {fn} is truncated ({size} of at least {8 + n} bytes); {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise DataError(f"{who} {fn} has an unreadable safetensors header ({type(e).__name__}); {fix}") from None
    want = 8 + n + end
    if size < want:
        raise DataError(f"{who} {fn} is truncated ({size} of {want} bytes); {fix}")
    if size > want:
        raise DataError(f"{who} {fn} has {size} bytes but its header describes {want}; {fix}")
    return list(tensors)


# A model's identity is its weights: two models of one architecture (one config.json) trained differently differ only
# here. export_hf stores the hash with the export; elsewhere it is computed (a full read, ~1.3 s/GB on one core).
WEIGHTS_RECORD = "distillery_weights.json"   # {"schema", "sha256", "files": {name: {"bytes", "mtime_ns", "sha256"}}}
WEIGHTS_SCHEMA = "distillery_weights/1"


def _digest(per_file):
    """One sha256 over {relative file name: sha256} (sorted): the weights' content, however they are sharded."""
    return hashlib.sha256(json.dumps(sorted(per_file.items())).encode()).hexdigest()


def write_weights_record(path, who="model"):
    """Hash the safetensors weights of `path` and store the result in <path>/distillery_weights.json (export_hf,
    inside its temporary directory). Returns the digest."""
    files = {os.path.relpath(f, path): os.stat(f) for f in weight_files(path, who)}
    rec = {name: {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(os.path.join(path, name))}
           for name, st in files.items()}
    digest = _digest({k: v["sha256"] for k, v in rec.items()})
    atomic.write_json(os.path.join(path, WEIGHTS_RECORD), {"schema": WEIGHTS_SCHEMA, "sha256": digest, "files": rec})
    return digest


def weights_sha256(path, who="teacher"):
    """Content hash of a model directory's safetensors weights. A file whose size and mtime match its entry in
    distillery_weights.json (written by export_hf) is taken from there; any other is read and hashed. Nothing is
    written: the directory may not be ours (a hub download, a read-only share). A record kept across a copy that
    preserves mtimes (cp -p, rsync -t) still holds; a weights file replaced by hand no longer matches and is re-read."""
    files = weight_files(path, who)
    rec = {}
    try:
        with open(os.path.join(path, WEIGHTS_RECORD)) as f:
            d = json.load(f)
        if isinstance(d, dict) and d.get("schema") == WEIGHTS_SCHEMA and isinstance(d.get("files"), dict):
            rec = d["files"]
    except (OSError, ValueError):
        pass  # no record (or a torn one): hash the files
    per = {}
    for fn in files:
        name, st = os.path.relpath(fn, path), os.stat(fn)
        r = rec.get(name) if isinstance(rec.get(name), dict) else {}
        ok = r.get("bytes") == st.st_size and r.get("mtime_ns") == st.st_mtime_ns and r.get("sha256")
        per[name] = r["sha256"] if ok else sha256_file(fn)
    return _digest(per)


def check_weights(path, who="teacher"):
    """Without loading a tensor: config.json describes a model whose logits are h @ W^T (check_model_config), the
    weights are safetensors, every file is complete, and there is no output-layer bias. Returns the config."""
    conf = check_model_config(path, who)
    for fn in weight_files(path, who):
        bias = [n for n in safetensors_names(fn, who) if n == "lm_head.bias" or n.endswith(".lm_head.bias")]
        if bias:
            raise ConfigError(f"{who} {path!r} has an output-layer bias ({bias[0]} in {os.path.basename(fn)}), so "
                              f"its logits are not h @ W^T and the KD head would ignore it; use a model without an "
                              f"lm_head bias")
    return conf


def check_model_dir(path, data_index, who="teacher"):
    """Before any model is built: the directory exists, holds complete safetensors weights of a model whose logits
    are h @ W^T (check_weights), and speaks the data's tokenizer. Returns the shared vocab.

    A padded embedding (e.g. 151936 vs 152064 rows) is fine: KD runs over the shared real vocab. A tokenizer whose
    token -> id map differs is a different tokenizer, and distilling across it would silently compare unrelated
    tokens, so it stops the run here (shards.check_tokenizer)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"{who} {path!r} not found (no config.json); train one with `deepspeed train.py "
                        f"--ds_config ds_configs/cpu.json --config configs/offline/teacher.yaml` or point {who}= "
                        f"at another runs/<name>/export directory")
    conf = check_weights(path, who)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  (any failure means we cannot verify the tokenizer)
        raise DataError(f"{who} {path!r} has no loadable tokenizer ({type(e).__name__}); copy the tokenizer it "
                        f"was trained with into that directory") from None
    rows = conf.get("vocab_size", len(tok))
    check_tokenizer(data_index, tok, who=who, model_vocab_size=rows)
    return data_index["vocab_size"]


def master_weight(p):
    """The full fp32 master copy of a parameter held by a ZeRO optimizer (stage 3: `_z3_optimizer`; stages 0-2 with
    bf16/fp16: `_hp_mapping`), or None for a parameter no optimizer holds (a teacher, a frozen or a plain module).
    Collective when not None: call it on every rank for the same parameters in the same order."""
    if hasattr(p, "ds_id"):
        if getattr(p, "_z3_optimizer", None) is None or not p.requires_grad:
            return None
    elif not hasattr(p, "_hp_mapping") or not hasattr(p, "get_full_hp_param"):
        return None
    from deepspeed.utils import safe_get_full_fp32_param
    return safe_get_full_fp32_param(p)


def export_hf(lm, out_dir, data_dir, dtype, extra_files=None, rank=0):
    """Gather the (possibly ZeRO-3-partitioned) model one parameter at a time and write a Hugging Face directory:
    config.json, model.safetensors, tokenizer files. Written to a temporary name and renamed, on rank 0.
    Collective: call it on every rank.

    A parameter trained by a ZeRO optimizer is exported from the optimizer's fp32 master copy, not from the bf16
    working copy the forward uses (rounding it to bf16 would lose every update smaller than half a bf16 step),
    then cast to `dtype`. Parameters no optimizer holds (a teacher, a plain module) are exported as they are."""
    import deepspeed
    from safetensors.torch import save_file
    dtype = getattr(torch, dtype)
    sd, seen = {}, {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights: safetensors stores one tensor, transformers re-ties on load
            continue
        seen[id(p)] = name
        master = master_weight(p)  # every rank, same order (collective)
        if master is not None:
            if rank == 0:
                sd[name] = master.detach().to("cpu", dtype).clone()
            del master
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                sd[name] = p.detach().to("cpu", dtype).clone()
    if rank != 0:
        return
    with atomic.atomic_path(out_dir) as tmp:
        os.makedirs(tmp)
        lm.config.save_pretrained(tmp)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_weights_record(tmp)  # the export's identity, hashed once here (a teacher cache records it)
        tok_dir = os.path.join(data_dir, "tokenizer")
        for fn in sorted(os.listdir(tok_dir)) if os.path.isdir(tok_dir) else []:
            shutil.copy(os.path.join(tok_dir, fn), tmp)
        for fn, src in (extra_files or {}).items():
            shutil.copy(src, os.path.join(tmp, fn))
