"""The start-of-run document-masking probe (distillery/maskprobe.py): it passes every kernel that keeps packed
documents apart (sdpa, eager, and transformers' flash_attention_2 / flex_attention code on CPU stand-in kernels,
tests/attn_standins.py), and refuses, in one line naming the kernel, the difference and the fix, one that does not:
a flash kernel broken on purpose, the pre-fix flash path (micro-batch 2 without flattening), a kernel registered
without a mask function. train.py and the teacher-cache builder refuse before anything is written; attn_impl=
accepts registered kernels and names the known ones otherwise."""
import os

import pytest
import torch

from distillery import maskprobe
from distillery.errors import ConfigError
from distillery.models import attn_implementation, hf_config
from attn_standins import flash_attn_varlen_func, use_standins

CONFIGS = {"student": hf_config("micro", 96, 64), "teacher": hf_config("micro-qwen3", 96, 64)}


def one_sequence_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
    """A flash varlen kernel broken on purpose: it ignores cu_seqlens and attends over all packed tokens."""
    total = torch.tensor([0, q.shape[0]], dtype=cu_seqlens_q.dtype)
    return flash_attn_varlen_func(q, k, v, total, total, q.shape[0], q.shape[0], **kw)


def sdpa_without_mask(module, query, key, value, attention_mask, **kw):
    """transformers' sdpa kernel, handed no mask: what a kernel registered without a mask function gets."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, None, **kw)


def register(monkeypatch, name, fn, mask=None):
    """Register a kernel (and its mask function) for this test only."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    monkeypatch.setitem(AttentionInterface._global_mapping, name, fn)
    if mask is not None:
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, mask)


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "flash_attention_2", "flex_attention"])
@pytest.mark.parametrize("mb", [1, 2, 4])
def test_probe_passes_kernels_that_mask(kernel, mb, monkeypatch):
    use_standins(monkeypatch)
    line = maskprobe.check(CONFIGS, kernel, mb)
    assert line.startswith(f"document masking verified on attention kernel {kernel} at micro-batch {mb} (float32")
    assert "student (llama) and teacher (qwen3)" in line


def test_probe_in_bf16_passes_and_sees_the_leak(monkeypatch):
    """bf16 (the GPU runs' dtype): rounding stays under the bound, attending across documents is far above it."""
    use_standins(monkeypatch)
    for kernel in ("sdpa", "flash_attention_2"):
        for who, c in CONFIGS.items():
            r = maskprobe.probe_model(c, kernel, 2, dtype=torch.bfloat16, who=who)
            assert r.ok and r.leak > maskprobe.SEEN * r.bound, r


def test_probe_refuses_kernels_that_attend_across_documents(monkeypatch):
    """A flash kernel broken on purpose (varlen ignores cu_seqlens), and today's code before the fix (flash at
    micro-batch 2 without flattening): refused, naming the kernel, the difference and the fix."""
    use_standins(monkeypatch, varlen=one_sequence_varlen)
    with pytest.raises(ConfigError) as e:
        maskprobe.check(CONFIGS, "flash_attention_2", 1)
    msg = str(e.value)
    print(msg)
    assert msg.startswith("document masking fails on attention kernel flash_attention_2 at micro-batch 1 (student")
    assert "differ from the document alone by" in msg and "attn_impl=sdpa" in msg and "doc_mask=false" in msg
    use_standins(monkeypatch)  # a correct kernel again, but without flattening (the code before issue 19)
    monkeypatch.setattr("distillery.packing.flattens", lambda kernel: False)
    maskprobe.check(CONFIGS, "flash_attention_2", 1)             # batch size 1: transformers finds the documents
    with pytest.raises(ConfigError, match="fails on attention kernel flash_attention_2 at micro-batch 2"):
        maskprobe.check(CONFIGS, "flash_attention_2", 2)


def test_registered_kernel_needs_a_mask_function(monkeypatch):
    """attn_impl= accepts a kernel registered with transformers' AttentionInterface; registered without a mask
    function it gets no mask (plain causal attention), which the probe refuses; with sdpa's mask function it passes."""
    from transformers.masking_utils import sdpa_mask
    register(monkeypatch, "my_kernel", sdpa_without_mask)
    assert attn_implementation("my_kernel") == "my_kernel"
    with pytest.raises(ConfigError, match="fails on attention kernel my_kernel at micro-batch 2"):
        maskprobe.check(CONFIGS, "my_kernel", 2)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    register(monkeypatch, "my_masked_kernel", sdpa_attention_forward, mask=sdpa_mask)
    assert "verified on attention kernel my_masked_kernel" in maskprobe.check(CONFIGS, "my_masked_kernel", 2)


def test_unknown_kernel_is_one_line_listing_the_known_ones():
    with pytest.raises(ConfigError) as e:
        attn_implementation("flash2")
    assert "attn_impl='flash2' is not an attention kernel transformers knows" in str(e.value)
    assert "sdpa" in str(e.value) and "flash_attention_2" in str(e.value) and "AttentionInterface" in str(e.value)


def test_a_kernel_that_cannot_run_is_one_line(monkeypatch):
    """flash_attention_2 without flash-attn (this CPU): a ConfigError naming the kernel, not a traceback."""
    import transformers.modeling_flash_attention_utils as fa_utils
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    with pytest.raises(ConfigError, match="attention kernel flash_attention_2 fails on the student model"):
        maskprobe.check(CONFIGS, "flash_attention_2", 2)


def test_probe_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    maskprobe.check(CONFIGS, "sdpa", 2)
    assert torch.equal(torch.rand(3), want)


def test_train_refuses_a_broken_kernel_before_writing(data_dir, teacher_dir, tmp_path, monkeypatch, capsys):
    """The run's kernel broken on purpose (sdpa handed no mask): one `error:` line naming kernel, difference and fix,
    exit code 2, no run directory. (The verified line of a good kernel: tests/test_train.py.)"""
    from conftest import run_inprocess
    from distillery.errors import cli
    register(monkeypatch, "sdpa", sdpa_without_mask)
    with pytest.raises(SystemExit) as e:
        cli(lambda argv: run_inprocess(data_dir, tmp_path, "name=r", f"teacher={teacher_dir}", "max_steps=1"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: document masking fails on attention kernel sdpa at "
                                               "micro-batch 4 (student"), err
    assert "attn_impl=eager" in err[0] and "doc_mask=false" in err[0]
    assert not os.path.exists(tmp_path / "r")


def test_run_says_masking_was_verified_and_takes_a_registered_kernel(data_dir, teacher_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """resolve() probes the run's student and live teacher on the run's kernel and micro-batch and says so first;
    attn_impl= takes a registered kernel, and refuses it when it has no mask function; nothing is written."""
    import train
    from conftest import BASE, REPO
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask
    argv = ["--ds_config", str(REPO / "ds_configs/cpu.json"), f"data={data_dir}", f"out_dir={tmp_path}", *BASE,
            f"teacher={teacher_dir}"]
    train.resolve(train.parse_args(argv))
    start = capsys.readouterr().out.splitlines()[:2]  # resolve()'s start-up lines: teacher placement, then this
    assert start[0].startswith("teacher "), start
    first = start[1]
    assert first.startswith("document masking verified on attention kernel sdpa at micro-batch 4 (float32, cpu) for "
                            "student (llama) and teacher (llama): packed vs alone "), first
    register(monkeypatch, "my_kernel", sdpa_attention_forward, mask=sdpa_mask)
    assert train.resolve(train.parse_args([*argv, "attn_impl=my_kernel"])).cfg.attn_impl == "my_kernel"
    register(monkeypatch, "my_unmasked_kernel", sdpa_attention_forward)
    with pytest.raises(ConfigError, match="fails on attention kernel my_unmasked_kernel at micro-batch 4"):
        train.resolve(train.parse_args([*argv, "attn_impl=my_unmasked_kernel"]))
    assert train.resolve(train.parse_args([*argv, "attn_impl=my_unmasked_kernel", "doc_mask=false"]))
    assert not os.listdir(tmp_path)


def test_cli_one_json_line_per_machine(monkeypatch, capsys):
    """`python -m distillery.maskprobe` (bench/gpu_checks.sh, part right): every kernel asked for at every
    micro-batch, kernels not installed skipped, exit code 1 when one attends across documents."""
    import json
    monkeypatch.setattr("distillery.maskprobe.installed", lambda k: k != "flash_attention_3")
    assert maskprobe.main(["--presets", "micro", "micro-qwen3", "--kernels", "auto", "eager", "flash_attention_3",
                           "--micro_batch", "1", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "doc_mask_probe" and out["device"] == "cpu" and out["dtype"] == "fp32"
    assert [k for k, v in out["results"].items() if v["ok"]] == ["auto=sdpa@mb1", "auto=sdpa@mb2", "eager@mb1",
                                                                 "eager@mb2"]
    assert out["results"]["flash_attention_3"] == {"ok": None, "skipped": "not installed here"}
    register(monkeypatch, "sdpa", sdpa_without_mask)
    assert maskprobe.main(["--presets", "micro", "--kernels", "sdpa", "--micro_batch", "2"]) == 1
    assert json.loads(capsys.readouterr().out)["results"]["sdpa@mb2"]["ok"] is False
