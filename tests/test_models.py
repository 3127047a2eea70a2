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


# ---------------------------------------------------------------------------- model directories (issue 9)
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

from distillery.errors import ConfigError, DataError  # noqa: E402
from distillery.models import check_weights, export_hf, master_weight  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved with save_pretrained (config.json + model.safetensors), no tokenizer."""
    from transformers import AutoModelForCausalLM
    out = tmp_path_factory.mktemp("models") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config("micro", 128, 64)).save_pretrained(out)
    return out


@pytest.fixture
def copy(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    return d


def edit_config(d, **kv):
    conf = json.loads((d / "config.json").read_text())
    conf.update(kv)
    (d / "config.json").write_text(json.dumps(conf))


def refused(d, exc, *needles, who="teacher"):
    with pytest.raises(exc) as e:
        check_weights(str(d), who)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_plain_model_dir_passes(copy):
    assert check_weights(str(copy))["model_type"] == "llama"
    edit_config(copy, logit_scale=1.0, final_logit_softcapping=None, logits_scaling=1)  # trivial values pass
    check_weights(str(copy))


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "phi", None])
def test_unsupported_model_type_is_refused(copy, model_type):
    edit_config(copy, model_type=model_type)
    refused(copy, ConfigError, f"has model_type {model_type!r}", "llama, mistral, qwen2, qwen3")


@pytest.mark.parametrize("key, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625),
                                        ("logits_scaling", 8.0), ("output_multiplier_scale", 0.5),
                                        ("lm_head_multiplier", 0.1), ("logit_softcap", 15)])
def test_logit_transform_keys_are_refused(copy, key, value):
    edit_config(copy, **{key: value})
    refused(copy, ConfigError, f"sets {key}={value!r}", "not h @ W^T")


def test_lm_head_bias_is_refused(copy):
    from safetensors.torch import load_file, save_file
    sd = load_file(copy / "model.safetensors")
    sd["lm_head.bias"] = torch.zeros(sd["lm_head.weight"].shape[0])
    save_file(sd, copy / "model.safetensors", metadata={"format": "pt"})
    refused(copy, ConfigError, "output-layer bias (lm_head.bias in model.safetensors)", "not h @ W^T")


def test_sharded_dir_is_checked_shard_by_shard(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    d = tmp_path / "sharded"
    AutoModelForCausalLM.from_config(hf_config("micro", 128, 64)).save_pretrained(d, max_shard_size="60KB")
    assert not (d / "model.safetensors").exists() and (d / "model.safetensors.index.json").exists()
    check_weights(str(d))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    sd = load_file(d / last)
    sd["lm_head.bias"] = torch.zeros(128)
    save_file(sd, d / last, metadata={"format": "pt"})
    index["weight_map"]["lm_head.bias"] = last
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(d, ConfigError, f"lm_head.bias in {last}")
    os.remove(d / last)
    refused(d, DataError, "missing 1 weight shard(s)", last, "copy them again")


def test_truncated_and_zero_length_weights_are_refused(copy):
    fn = copy / "model.safetensors"
    size = fn.stat().st_size
    with open(fn, "r+b") as f:
        f.truncate(size - 1000)
    refused(copy, DataError, f"{fn} is truncated ({size - 1000} of {size} bytes)", "re-export it or copy it again",
            who="student_init")
    with open(fn, "r+b") as f:
        f.truncate(20)  # inside the header
    refused(copy, DataError, "is truncated (20 of at least", "re-export it or copy it again")
    fn.write_bytes(b"")
    refused(copy, DataError, "is truncated (0 of at least 8 bytes)")


def test_unreadable_header_and_trailing_bytes_are_refused(copy):
    fn = copy / "model.safetensors"
    data = bytearray(fn.read_bytes())
    fn.write_bytes(bytes(data) + b"\0" * 16)
    refused(copy, DataError, f"has {len(data) + 16} bytes but its header describes {len(data)}")
    data[8:9] = b"#"  # the JSON header no longer parses
    fn.write_bytes(bytes(data))
    refused(copy, DataError, "unreadable safetensors header (JSONDecodeError)", "re-export it or copy it again")
    fn.write_bytes((2 ** 40).to_bytes(8, "little") + b"{}")
    refused(copy, DataError, "unreadable safetensors header (length")


def test_pickle_only_and_no_weights_are_refused(copy):
    from safetensors.torch import load_file
    torch.save(load_file(copy / "model.safetensors"), copy / "pytorch_model.bin")
    os.remove(copy / "model.safetensors")
    refused(copy, DataError, "weights only as pickles (pytorch_model.bin)", "convert it to safetensors")
    os.remove(copy / "pytorch_model.bin")
    refused(copy, DataError, "has no model weights")


def test_bad_teacher_dir_stops_resolve_before_anything_is_written(data_dir, tmp_path):
    """Through the trainer's start checks: a teacher with soft-capped logits is refused by check_model_dir."""
    import train
    from conftest import BASE, REPO, make_teacher
    t = make_teacher(data_dir, tmp_path / "capped")
    edit_config(tmp_path / "capped", final_logit_softcapping=30.0)
    with pytest.raises(ConfigError, match="sets final_logit_softcapping=30.0"):
        train.resolve(train.parse_args(["--ds_config", str(REPO / "ds_configs/cpu.json"), f"data={data_dir}",
                                        f"out_dir={tmp_path / 'runs'}", *BASE, f"teacher={t}", "alpha=0.5"]))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- export (issue 9)
def _dist():
    import torch.distributed as dist
    from distillery.launch import init_distributed
    if not dist.is_initialized():
        init_distributed()


def test_export_of_a_plain_module_is_its_state_dict(tmp_path):
    """No optimizer, no ZeRO: the parameters as they are, cast to export_dtype; tied weights stored once."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    _dist()
    m = AutoModelForCausalLM.from_config(hf_config("micro-qwen3", 128, 64))
    assert master_weight(m.lm_head.weight) is None
    export_hf(m, str(tmp_path / "e"), str(tmp_path), "bfloat16")
    sd = load_file(tmp_path / "e" / "model.safetensors")
    assert "lm_head.weight" not in sd  # tied to the embedding
    for name, p in m.named_parameters():
        assert torch.equal(sd[name], p.detach().bfloat16()), name


def test_export_of_partitioned_params_without_optimizer(tmp_path):
    """ZeRO-3 partitioned, no optimizer (like the teacher engine): gathered, not read from a master copy."""
    import deepspeed
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    _dist()
    torch.manual_seed(0)
    with zero3_context({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
        m = AutoModelForCausalLM.from_config(hf_config("micro", 128, 64))
    w = m.model.layers[0].mlp.up_proj.weight
    assert hasattr(w, "ds_id") and w.numel() == 0 and master_weight(w) is None
    export_hf(m, str(tmp_path / "e"), str(tmp_path), "float32")
    sd = load_file(tmp_path / "e" / "model.safetensors")
    with deepspeed.zero.GatheredParameters([w]):
        assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], w.detach())


@pytest.mark.parametrize("stage", [3, 2])
def test_bf16_export_writes_fp32_master_weights(tmp_path, stage):
    """bf16 ZeRO engine after a few small-lr steps: the export (export_dtype float32) holds the optimizer's fp32
    master weights, which the bf16 working copies only approximate (updates smaller than half a bf16 step)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    _dist()
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 2,
          "gradient_accumulation_steps": 1, "train_batch_size": 2, "steps_per_print": 10 ** 9}
    torch.manual_seed(0)
    with zero3_context(ds):
        lm = AutoModelForCausalLM.from_config(hf_config("micro", 128, 64), dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=lm, optimizer=torch.optim.AdamW(lm.parameters(), lr=1e-4), config=ds)
    x = torch.randint(0, 128, (2, 16))
    for _ in range(3):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    export_hf(lm, str(tmp_path / "e"), str(tmp_path), "float32")
    sd = load_file(tmp_path / "e" / "model.safetensors")
    assert set(sd) == {n for n, _ in lm.named_parameters()}
    n_diff = 0
    for name, p in lm.named_parameters():
        master = safe_get_full_fp32_param(p)
        with deepspeed.zero.GatheredParameters([p]):
            working = p.detach().clone()
        assert p.dtype == torch.bfloat16 and sd[name].dtype == torch.float32
        assert torch.equal(sd[name], master.cpu()), name                  # the master copy, exactly
        assert torch.equal(sd[name].bfloat16(), working), name             # of which the working copy is the rounding
        n_diff += int((sd[name] != working.float()).any())
    assert n_diff == len(sd)  # every tensor holds values a bf16 upcast could not
    engine.destroy()


def test_save_random_init_is_seeded_and_loadable(data_dir, tmp_path):
    """models.save_random_init: a loadable HF directory with the data's vocab and tokenizer; the same seed gives the
    same weights (a fixed starting point for student_init= and the reference loop), another seed other weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from distillery.models import save_random_init
    from distillery.shards import read_index
    a = save_random_init("micro", data_dir, tmp_path / "a", 64, seed=5)
    b = save_random_init("micro", data_dir, tmp_path / "b", 64, seed=5)
    c = save_random_init("micro", data_dir, tmp_path / "c", 64, seed=6)
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b, c))
    assert ma.config.vocab_size == read_index(data_dir)["vocab_size"]
    assert os.path.isfile(os.path.join(a, "tokenizer.json"))
    pa, pb, pc = (dict(m.named_parameters()) for m in (ma, mb, mc))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa if pa[k].ndim == 2)


# --- issue 20: a model's identity is its weights (a content hash), not only its config.json
def test_weights_sha256_tells_same_architecture_apart_and_export_stores_it(model_dir, tmp_path, monkeypatch):
    """Two models of one architecture (same config.json) with different weights hash differently; export_hf stores
    the hash (distillery_weights.json), which is then read instead of re-hashing the weights; a directory without the
    record (save_pretrained) is hashed (a full read); a record whose file size or mtime no longer matches is ignored."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from distillery import models
    _dist()
    torch.manual_seed(1)
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(hf_config("micro", 128, 64)).save_pretrained(other)
    assert (other / "config.json").read_text() == (model_dir / "config.json").read_text()
    a, b = models.weights_sha256(str(model_dir)), models.weights_sha256(str(other))
    assert len(a) == 64 and a != b
    # an export records the hash of what it wrote
    m = AutoModelForCausalLM.from_config(hf_config("micro", 128, 64))
    export_hf(m, str(tmp_path / "e"), str(tmp_path), "float32")
    rec = json.loads((tmp_path / "e" / models.WEIGHTS_RECORD).read_text())
    digest = rec["sha256"]
    reads = []
    monkeypatch.setattr(models, "sha256_file", lambda p: reads.append(p) or "x")
    assert models.weights_sha256(str(tmp_path / "e")) == digest and reads == []  # stored: no read of the weights
    monkeypatch.undo()
    shutil.copytree(tmp_path / "e", tmp_path / "e2")  # copytree keeps mtimes: the record still holds
    assert models.weights_sha256(str(tmp_path / "e2")) == digest
    # the weights replaced by other ones of the same size (by hand): the record no longer matches and is ignored
    shutil.copy(other / "model.safetensors", tmp_path / "e2" / "model.safetensors")
    assert set(load_file(other / "model.safetensors")) == set(load_file(tmp_path / "e" / "model.safetensors"))
    assert models.weights_sha256(str(tmp_path / "e2")) == b
