"""Windowed perplexity (paper protocol): non-overlapping windows of `window` tokens over a token stream, at most
`max_windows` of them, PPL = exp(mean token CE). The last partial window is dropped; a set shorter than one window is
an error. Inside a window every token but the first is a target (W - 1 targets per window), predicted from the tokens
before it in the same window; windows do not see each other.

The core is model-agnostic: `loss_fn(input_ids [b, W]) -> (ce_sum, n_targets)` tensors, or `(ce_sum, n_targets,
entropy_sum)` to also report the model's mean predictive entropy over the same targets (nats; the paper's entropy
analysis measures it on fixed text, so students and their alpha = 0 baselines compare on equal tokens). On a live ZeRO-3 engine every
rank must run the same number of forwards (peers_and_pitfalls.md trap 5), so windows are dealt round-robin and ranks
with fewer windows run a dummy forward whose result is discarded. Sums are reduced in float64.

Standalone, on a Hugging Face model directory or one of our run directories (its export/):
    python -m eval.ppl --model runs/<name> --data data/offline --sets heldout ood_english [--window 4096]
    python -m eval.ppl --model <hf_dir> --data <data_dir> --sets all --out ppl.json
    python -m eval.ppl --model runs/<name> --sets all --window 256 --max_windows 32 --entropy \
        --out runs/<name>/eval/ppl.json        # eval.report reads the entropies from here
"""
import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_WINDOW, DEFAULT_MAX_WINDOWS = 4096, 256


def make_windows(tokens, window, max_windows):
    n = min(len(tokens) // window, max_windows)
    if n == 0:
        raise ValueError(f"token set has {len(tokens)} tokens, fewer than one window of {window}; "
                         f"use a smaller eval window or a larger set")
    return np.asarray(tokens[: n * window], dtype=np.int64).reshape(n, window)


@torch.no_grad()
def _windowed_sums(loss_fn, tokens, window, max_windows, batch_size, rank, world, device):
    wins = make_windows(tokens, window, max_windows)
    mine = wins[rank::world]
    per_rank = math.ceil(len(wins) / world)
    n_batches = math.ceil(per_rank / batch_size)
    total = torch.zeros(3, dtype=torch.float64, device=device)  # ce_sum, n_targets, entropy_sum
    has_entropy = None
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        real = len(chunk) > 0
        x = torch.from_numpy(chunk if real else wins[:1]).to(device)  # dummy forward keeps ranks in lockstep
        out = loss_fn(x)
        has_entropy = len(out) == 3
        if real:
            total += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                                  for v in (*out, *(() if has_entropy else (0.0,)))])
    if world > 1:
        dist.all_reduce(total)
    return total[0].item(), total[1].item(), len(wins), total[2].item() if has_entropy else None


@torch.no_grad()
def windowed_ce(loss_fn, tokens, window=DEFAULT_WINDOW, max_windows=DEFAULT_MAX_WINDOWS, batch_size=1, rank=0, world=1,
                device="cpu"):
    """Mean token CE over the windows (a float, identical on all ranks)."""
    ce, n, _, _ = _windowed_sums(loss_fn, tokens, window, max_windows, batch_size, rank, world, device)
    return ce / n


def windowed_eval(loss_fn, tokens, window=DEFAULT_WINDOW, max_windows=DEFAULT_MAX_WINDOWS, batch_size=1, rank=0,
                  world=1, device="cpu"):
    """{'ce', 'ppl', 'windows', 'targets', 'window'} for one token set (identical on all ranks), plus 'entropy' (mean
    nats per target) when loss_fn returns an entropy sum."""
    ce, n, n_win, ent = _windowed_sums(loss_fn, tokens, window, max_windows, batch_size, rank, world, device)
    out = {"ce": ce / n, "ppl": math.exp(ce / n), "windows": n_win, "targets": int(n), "window": window}
    if ent is not None:
        out["entropy"] = ent / n
    return out


def evaluate_sets(loss_fn, sets, window=DEFAULT_WINDOW, max_windows=DEFAULT_MAX_WINDOWS, batch_size=1, rank=0,
                  world=1, device="cpu"):
    """{set name: windowed_eval(...)} for a dict of token sets; sets are visited in sorted order on every rank."""
    return {name: windowed_eval(loss_fn, sets[name], window, max_windows, batch_size, rank, world, device)
            for name in sorted(sets)}


def hf_loss_fn(model, entropy=False):
    """loss_fn for a Hugging Face causal LM (plain or ZeRO-3 partitioned): CE of tokens 1..W-1 of each window, summed
    in fp32 from the model's logits; with entropy=True also the sum of H(p) = -sum_v p_v log p_v over the same
    positions (the full softmax, padded vocab rows included: they are part of what the model predicts)."""
    from distillery.loss_parts import IGNORE_INDEX, shift_targets

    def fn(x):
        logits = model(input_ids=x).logits.float()                          # [b, W, V]
        y = shift_targets(x)                                                 # [b, W], last position ignored
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="sum")
        keep = y != IGNORE_INDEX
        if not entropy:
            return ce, int(keep.sum())
        logp = F.log_softmax(logits[keep], dim=-1)                           # [n, V]
        return ce, int(keep.sum()), -(logp.exp() * logp).sum()
    return fn


def _field(parts, name):
    return parts[name] if isinstance(parts, dict) else getattr(parts, name)


def engine_loss_fn(engine, **call_kw):
    """loss_fn for the trainer's live engine, called as the trainer's own eval does:
    engine(input_ids=window, targets=window shifted left with -100 last, w_ce=1.0, w_kd=0.0, **call_kw) -> a dict
    (or LossParts) with ce_sum and n_tokens. Same targets as hf_loss_fn: W - 1 per window. call_kw: e.g.
    impl=cfg.loss_impl, chunk_size=cfg.loss_chunk_size."""
    from distillery.loss_parts import shift_targets
    kw = {"w_ce": 1.0, "w_kd": 0.0, **call_kw}

    def fn(x):
        parts = engine(input_ids=x, targets=shift_targets(x), **kw)
        return _field(parts, "ce_sum"), _field(parts, "n_tokens")
    return fn


def engine_call_kw(cfg):
    """The loss keywords the trainer passes to its engine for evaluation, from its Config."""
    return {"impl": cfg.loss_impl, "chunk_size": cfg.loss_chunk_size}


def evaluate_engine(engine, sets, window=DEFAULT_WINDOW, max_windows=DEFAULT_MAX_WINDOWS, batch_size=1, **call_kw):
    """evaluate_sets on the trainer's live engine (ZeRO-3 or not). Collective: call on every rank, same sets. The
    module is put in eval mode for the duration and restored."""
    from distillery.launch import rank_world
    rank, world = rank_world()
    device = getattr(engine, "device", None) or "cpu"
    module = getattr(engine, "module", engine)
    was_training = module.training
    module.eval()
    try:
        return evaluate_sets(engine_loss_fn(engine, **call_kw), sets, window, max_windows, batch_size, rank, world,
                             device)
    finally:
        module.train(was_training)


def flat_results(results, prefix="eval"):
    """{set: windowed_eval(...)} -> flat scalars {"<prefix>/<set>/ppl": ..., "<prefix>/<set>/ce": ...}."""
    flat = {}
    for name, r in results.items():
        flat[f"{prefix}/{name}/ppl"] = r["ppl"]
        flat[f"{prefix}/{name}/ce"] = r["ce"]
    return flat


def main(argv=None):
    from eval import common
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model dir or run dir (runs/<name>, uses export/)")
    ap.add_argument("--data", default=None, help="data dir (data_prep output); default: the run's data dir")
    ap.add_argument("--sets", nargs="+", default=["all"], help="stream split names, or 'all'")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    ap.add_argument("--max_windows", type=int, default=DEFAULT_MAX_WINDOWS)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES))
    ap.add_argument("--entropy", action="store_true", help="also the mean predictive entropy per set (nats)")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    a = ap.parse_args(argv)
    data = a.data or common.data_dir_from_run(a.model)
    if data is None:
        ap.error("--data is required (no data dir found in the run's config.yaml)")
    device = common.auto_device(a.device)
    model = common.load_model(a.model, device, a.dtype)
    common.check_compatible(model, data, common.load_tokenizer(common.resolve_model_dir(a.model)), a.model)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and a.window > max_pos:
        print(f"warning: window {a.window} > the model's max_position_embeddings {max_pos}", file=sys.stderr)
    sets = common.load_sets(data, a.sets)
    t0 = time.time()
    res = evaluate_sets(hf_loss_fn(model, a.entropy), sets, a.window, a.max_windows, a.batch_size, device=device)
    out = {"model": common.resolve_model_dir(a.model), "data": data, "window": a.window,
           "max_windows": a.max_windows, "dtype": a.dtype, "sets": res, "seconds": round(time.time() - t0, 2)}
    for name, r in res.items():
        ent = f"  entropy {r['entropy']:.5f}" if "entropy" in r else ""
        print(f"{name:<20} ppl {r['ppl']:10.4f}  ce {r['ce']:.5f}{ent}  windows {r['windows']}  targets {r['targets']}")
    if a.out:
        common.write_json(a.out, out)
    return out


if __name__ == "__main__":
    from distillery.errors import cli
    cli(main)
