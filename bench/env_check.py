"""The environment every other GPU check is read against (issue 18, check `env`): device, driver, the versions of
everything the trainer imports, the attention kernel it picks, and the measured matmul peak (the MFU denominator).

    python bench/env_check.py --gpu     # CUDA: bf16 8192^3 matmuls (~2 s)
    python bench/env_check.py           # CPU: fp32 1024^3 matmuls

Versions are read after importing train.py (and with it DeepSpeed and the plugins), transformers, tokenizers,
safetensors, tensorboard, triton, and liger_kernel, flash_attn, datasets, accelerate when present: every
top-level package then in sys.modules that has a __version__, outside the standard library; "not_importable" lists
those of the named ones that failed to import, with the error. Ends with one JSON line.
"""
import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nvidia_smi():
    """name, memory.total, driver_version of each GPU, as nvidia-smi reports them (None without nvidia-smi)."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [dict(zip(("name", "memory", "driver"), (x.strip() for x in line.split(","))))
            for line in p.stdout.splitlines() if line.strip()] or None


def versions():
    """{package: version} of every imported top-level package that declares one (the standard library's aside)."""
    out = {}
    for name, mod in sorted(sys.modules.items()):
        if "." in name or name.startswith("_") or name in sys.stdlib_module_names:
            continue
        with warnings.catch_warnings():  # some packages deprecate __version__ (MarkupSafe): still the version
            warnings.simplefilter("ignore")
            v = getattr(mod, "__version__", None)
        if isinstance(v, str):
            out[name] = v
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args(argv)
    t = time.time()
    import torch
    if a.gpu and not torch.cuda.is_available():
        raise SystemExit("error: --gpu but CUDA is not available (torch " + torch.__version__ + "); drop --gpu")
    import train  # noqa: F401  (DeepSpeed, transformers, the plugins: what a run imports)
    missing = {}
    # imported lazily by the trainer (transformers, tokenizers, ...) or optional (the rest)
    for opt in ("transformers", "tokenizers", "safetensors", "tensorboard", "triton", "liger_kernel", "flash_attn",
                "datasets", "accelerate"):
        try:
            importlib.import_module(opt)
        except Exception as e:  # absent, or present and broken: both worth a line
            missing[opt] = f"{type(e).__name__}: {e}"[:200]
    from distillery.models import attn_implementation
    from train_step import matmul_peak
    peak = matmul_peak(a.gpu)
    rec = {"bench": "env", "device": torch.cuda.get_device_name() if a.gpu else "cpu",
           "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if a.gpu else None,
           "nvidia_smi": nvidia_smi() if a.gpu else None,
           "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 2) if a.gpu else None,
           "capability": ".".join(map(str, torch.cuda.get_device_capability())) if a.gpu else None,
           "attn_doc_mask": attn_implementation("auto", True), "attn_plain": attn_implementation("auto", False),
           "matmul": "bf16 8192^3" if a.gpu else "fp32 1024^3", "matmul_peak_tflops": round(peak / 1e12, 2),
           "versions": versions(), "not_importable": missing, "seconds": round(time.time() - t, 1)}
    print(json.dumps(rec))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
