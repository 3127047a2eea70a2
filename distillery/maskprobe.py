"""Start-of-run probe: does the attention kernel this run picked keep packed documents apart, at this run's micro-batch
size, on this run's models? If not, one `error:` line before anything is written.

Why a probe: whether a packed row is document-masked depends on what transformers hands the kernel and on the kernel
itself (distillery/packing.py: flash-attention reads documents from positions only at batch size 1; a kernel
registered without a mask function gets no mask at all), and a kernel that attends across documents fails silently:
the loss still falls and the log still says document-masked. So train.py (resolve) and the teacher-cache builder
call check_run / check before any file is written, and `python -m distillery.maskprobe` runs it on every kernel
a GPU has (bench/gpu_checks.sh).

What it runs: for each model config of the run (student; the live teacher), a copy with one layer per distinct layer
type (usually one), vocab 64 and MLP width 64, random init (seeded; the global RNG is left as it was), in the run's
dtype on the run's device, built by transformers with the run's kernel as the run builds its models. Attention is the
only part of a decoder that mixes positions; whether it stays inside a document depends on the kernel and the
attention config (family, heads, kv heads, head dim, sliding window), not on the weights, the depth, the vocab or the
MLP. One micro-batch of `micro_batch` rows, row r = A_r|B_r (101 + 75 tokens ending in EOS, other tokens per row, so
the rows span two 128-token blocks of flex attention and a row's first document cannot borrow from the row before),
through packing.hidden_states with doc positions: the path that trains. Each document alone (its own row, no
positions: plain causal attention, which every kernel does) is the reference. Cost, measured on the shared 2-core
CPU box (load ~9): 159 ms for the offline study's pair (tiny-student + tiny-teacher, micro-batch 8), 70 ms for the
test presets; 4 s for the paper's 1.7B + 0.7B pair on CPU (the layer keeps their hidden and head sizes; building it
dominates). Not yet measured on a GPU, where the paper's sizes run.

Pass: max |packed - alone| <= TOL[dtype] * max |alone| (fp32 1e-5; bf16/fp16 2^-5, about 4 bf16 ulps of the largest
value: the packed and the alone call may use other kernels that round and sum in another order; measured on CPU up to
3.0e-7 (fp32) and 6.7e-3 (bf16) relative, for the CPU presets and the paper's). The same rows run as one causal
sequence each show what attending across documents does (`leak`, in the log line: 2 to 5.5, i.e. 17 to 37 times the
bf16 bound); the probe is only meaningful if that exceeds the bound tenfold, and it checks that too.
"""
import copy
import dataclasses
import math
import os

import torch

from distillery.errors import ConfigError
from distillery.packing import doc_positions, hidden_states

EOS, VOCAB, FFN = 0, 64, 64
DOCS = (101, 75)                         # tokens of A_r and B_r, EOS included
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -5, torch.float16: 2 ** -5}
SEEN = 10                                # the leak must exceed the bound this many times over


@dataclasses.dataclass
class Probe:
    """One model's result: the worst |packed - alone|, what attending across documents changes (leak), the scale
    (max |alone|) and the bound err must stay under."""
    who: str
    kind: str
    err: float
    leak: float
    scale: float
    bound: float

    @property
    def ok(self):
        return self.err <= self.bound


def one_layer_copy(config):
    """The config with one layer per distinct layer type, a small vocab and MLP: same attention, milliseconds."""
    c = copy.deepcopy(config)
    types = list(dict.fromkeys(getattr(c, "layer_types", None) or []))
    c.num_hidden_layers = max(1, len(types))
    if types:
        c.layer_types = types
    c.vocab_size, c.intermediate_size = VOCAB, FFN
    c.use_cache = False
    return c


def probe_rows(micro_batch, seed=0):
    """x [mb, S] rows A_r|B_r, and the documents alone: a [mb, |A|], b [mb, |B|]."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.cat([torch.randint(1, VOCAB, (micro_batch, n - 1), generator=g),
                       torch.full((micro_batch, 1), EOS)], 1) for n in DOCS)
    return torch.cat([a, b], 1), a, b


@torch.no_grad()
def probe_model(config, kernel, micro_batch, device="cpu", dtype=torch.float32, who="model"):
    """Probe of one config on one kernel (see the module docstring). An exception inside the kernel becomes a
    ConfigError naming the kernel."""
    from transformers import AutoModel
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        try:
            with dev:
                model = AutoModel.from_config(one_layer_copy(config), attn_implementation=kernel, dtype=dtype).eval()
            x, a, b = (t.to(dev) for t in probe_rows(micro_batch))
            h = hidden_states(model, x, doc_positions(x, EOS)).float()                  # [mb, S, H]: as trained
            ha, hb = (hidden_states(model, t).float() for t in (a, b))                  # each document alone
            hu = hidden_states(model, x).float()                                        # one causal sequence
        except Exception as e:  # noqa: BLE001  (any failure of the kernel here would stop the run later anyway)
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ConfigError(f"attention kernel {kernel} fails on the {who} model ({type(e).__name__}: {msg}); "
                              f"set attn_impl={fallback(kernel)}") from None
    la = DOCS[0]
    err = max((h[:, :la] - ha).abs().max().item(), (h[:, la:] - hb).abs().max().item())
    leak = (hu[:, la:] - hb).abs().max().item()
    scale = max(ha.abs().max().item(), hb.abs().max().item())
    if not all(math.isfinite(v) for v in (err, leak, scale)):
        raise ConfigError(f"attention kernel {kernel} gives non-finite hidden states on the {who} model; set "
                          f"attn_impl={fallback(kernel)}")
    res = Probe(who, getattr(config, "model_type", "?"), err, leak, scale, TOL[dtype] * scale)
    if leak <= SEEN * res.bound:
        raise RuntimeError(f"document-masking probe cannot tell on {kernel} ({who}): attending across documents "
                           f"changes the hidden states by {leak:.3g}, the rounding bound is {res.bound:.3g}")
    return res


def fallback(kernel):
    return "eager" if kernel == "sdpa" else "sdpa"


def check(configs, kernel, micro_batch, device="cpu", dtype=torch.float32):
    """Probe every {who: config}; a ConfigError naming the kernel, the difference and the fix if any fails. Returns
    the log line that says masking was verified."""
    results = [probe_model(c, kernel, micro_batch, device, dtype, who) for who, c in configs.items()]
    for r in results:
        if not r.ok:
            raise ConfigError(
                f"document masking fails on attention kernel {kernel} at micro-batch {micro_batch} ({r.who}, "
                f"{r.kind}, {str(dtype).removeprefix('torch.')}): a packed document's hidden states differ from the "
                f"document alone by {r.err:.3g} (rounding allows {r.bound:.2g}; attending across documents gives "
                f"{r.leak:.3g}); set attn_impl={fallback(kernel)}, or doc_mask=false to train each row as one "
                f"causal sequence")
    models = " and ".join(f"{r.who} ({r.kind})" for r in results)
    return (f"document masking verified on attention kernel {kernel} at micro-batch {micro_batch} "
            f"({str(dtype).removeprefix('torch.')}, {torch.device(device).type}) for {models}: packed vs alone "
            f"{max(r.err for r in results):.2g}, across documents would be {min(r.leak for r in results):.2g}")


def run_device():
    """This process's device before the process group exists: its GPU (LOCAL_RANK) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def engine_dtype(ds_config):
    """The models' dtype under a DeepSpeed config: bf16 when it enables bf16 (the teacher follows the student)."""
    return torch.bfloat16 if (ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled") else (
        torch.float32)


def _announce(line, say):
    from distillery.launch import rank_world
    if rank_world()[0] == 0:
        say(line)
    return line


def check_run(cfg, ds_config, index, live_teacher, say=print):
    """train.py, before anything is written: the run's student config (preset or student_init) and, when a live
    teacher runs, the teacher's config, on cfg.attn_impl at cfg.micro_batch_size. Rank 0 says it was verified."""
    from transformers import AutoConfig
    from distillery.models import hf_config
    configs = {"student": AutoConfig.from_pretrained(cfg.student_init, trust_remote_code=cfg.trust_remote_code)
               if cfg.student_init else hf_config(cfg.student, index["vocab_size"], cfg.seq_len, cfg.attn_impl)}
    if live_teacher:
        configs["teacher"] = AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    return _announce(check(configs, cfg.attn_impl, cfg.micro_batch_size, run_device(), engine_dtype(ds_config)), say)


def check_dir(path, kernel, micro_batch, ds_config, trust_remote_code=False, who="teacher", say=print):
    """The model directory `path` (the teacher-cache builder's teacher) on `kernel` at `micro_batch` rows."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return _announce(check({who: config}, kernel, micro_batch, run_device(), engine_dtype(ds_config)), say)


def installed(kernel):
    """Whether a built-in kernel's package is here (flash-attn 2 / 3, flex attention); others: yes."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_torch_flex_attn_available
    return {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available,
            "flex_attention": is_torch_flex_attn_available}.get(kernel, lambda: True)()


def main(argv=None):
    """Every kernel this machine has, on the given presets: one JSON line (bench/gpu_checks.sh, part right)."""
    import argparse
    import json
    from distillery.models import attn_implementation, hf_config
    ap = argparse.ArgumentParser(description="document-masking probe on every attention kernel here")
    ap.add_argument("--presets", nargs="+", default=["llama3-1.7b", "llama3-0.7b", "qwen3-0.6b"])
    ap.add_argument("--kernels", nargs="+", default=None, help="default: auto and every built-in kernel")
    ap.add_argument("--micro_batch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    a = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    kernels = a.kernels or ["auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"]
    configs = {p: hf_config(p, VOCAB, 8192) for p in a.presets}
    out, failed = {}, False
    for k in kernels:
        name = attn_implementation(k, doc_mask=True)
        if not installed(name):
            out[k] = {"ok": None, "skipped": "not installed here"}
            continue
        for mb in a.micro_batch:
            key = f"{k}={name}@mb{mb}" if k == "auto" else f"{k}@mb{mb}"
            try:
                out[key] = {"ok": True, "line": check(configs, name, mb, run_device(), dtype)}
            except ConfigError as e:
                out[key], failed = {"ok": False, "error": str(e)}, True
    print(json.dumps({"bench": "doc_mask_probe", "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                      else "cpu", "dtype": a.dtype, "presets": a.presets, "results": out}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
