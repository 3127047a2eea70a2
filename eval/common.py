"""Shared helpers for standalone evaluation: find a model in a run directory, load it and its tokenizer, load token
sets, and check that the model, its tokenizer and the data agree (peers_and_pitfalls.md trap 2: a different tokenizer
is an error, not a silent number)."""
import glob
import os

import torch

from distillery.atomic import write_json  # noqa: F401  (eval tools write their results with it)
from distillery.errors import EvalError  # noqa: F401

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}




def resolve_model_dir(path):
    """A Hugging Face model directory (has config.json), or one of our run directories (runs/<name>/): its export/
    (or the newest export/<sub>/ holding config.json). Anything else is an error that names the fix."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    exp = os.path.join(path, "export")
    if os.path.isfile(os.path.join(exp, "config.json")):
        return exp
    subs = sorted((p for p in glob.glob(os.path.join(exp, "*")) if os.path.isfile(os.path.join(p, "config.json"))),
                  key=os.path.getmtime)
    if subs:
        return subs[-1]
    if os.path.isfile(os.path.join(path, "config.yaml")):
        raise EvalError(f"run directory {path!r} has no exported model (export/config.json); export it with the "
                        f"trainer first (it writes export/ at the end of a run)")
    raise EvalError(f"{path!r} is neither a Hugging Face model directory (config.json) nor a run directory")


def load_model(path, device="cpu", dtype="fp32"):
    from transformers import AutoModelForCausalLM
    d = resolve_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=DTYPES[dtype])
    return model.to(device).eval()


def load_tokenizer(path):
    """The tokenizer saved with a model (or a data set's tokenizer/ dir); None when there is none."""
    from transformers import AutoTokenizer
    for d in (path, os.path.join(path, "tokenizer")):
        if os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(d)
    try:
        d = resolve_model_dir(path)
    except EvalError:
        return None
    return load_tokenizer(d) if d != path else None


def run_config(path):
    """The resolved config.yaml of a run directory (dict), or {} when path is not a run directory."""
    p = os.path.join(path, "config.yaml")
    if not os.path.isfile(p):
        return {}
    import yaml
    with open(p) as f:
        return yaml.safe_load(f) or {}


def data_dir_from_run(path):
    """The data directory a run trained on (its config.yaml's `data`), or None when that is not a data set."""
    data = run_config(path).get("data")
    if isinstance(data, str) and os.path.isfile(os.path.join(data, "index.json")):
        return data
    return None


def stream_sets(data_dir):
    from distillery import shards
    index = shards.read_index(data_dir)
    return [k for k, v in index["splits"].items() if v.get("kind") == "stream"]


def load_sets(data_dir, names):
    """{name: 1-D token array} for the named stream splits ('all' = every stream split)."""
    from distillery import shards
    if names in (None, "all") or list(names) == ["all"]:
        names = stream_sets(data_dir)
    return {n: shards.load_stream(data_dir, n) for n in names}


def check_compatible(model, data_dir=None, tokenizer=None, name="model"):
    """The data's tokens must index the model's vocabulary, and the model's tokenizer (when it ships one) must be the
    data's tokenizer."""
    from distillery import shards
    vocab = model.config.vocab_size
    if data_dir is not None:
        index = shards.read_index(data_dir)
        if index["vocab_size"] > vocab:
            raise EvalError(f"{name} has vocab {vocab} but the data set {data_dir!r} uses {index['vocab_size']} "
                            f"token ids: they were not tokenized for this model")
        want = index.get("tokenizer", {}).get("vocab_hash")
        if tokenizer is not None and want and shards.vocab_hash(tokenizer) != want:
            raise EvalError(f"{name}'s tokenizer differs from the data set's ({data_dir!r}); evaluate on sets "
                            f"tokenized with the model's tokenizer")


def auto_device(device=None):
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
