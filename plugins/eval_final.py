"""End-of-run evaluation written to <run_dir>/eval/final.json: windowed PPL (paper protocol) on the evaluation sets
with the live engine, optional downstream tasks, and the trainer's last in-loop eval.

Options (callback_args.eval_final; None = the trainer's own setting):
  sets         stream split names or 'all' (default: the run's eval_sets)
  window, max_windows, batch_size   default: the run's eval_window / eval_max_windows / eval_batch_size
  data         data dir of the sets (default: the run's eval_data, else data)
  tasks, local, strategy, limit, tokenizer, include_path, lm_attr: downstream at the end, as in eval_downstream
  path         output file relative to the run dir (default eval/final.json)
  reuse        True (default): when the trainer's own eval ran at this very step on the same evaluation (eval
               data: its directory and the checksums of its streams; window; window cap), its numbers are used
               instead of a second pass (recorded as "source": "in_loop_eval"). In-loop numbers of other eval data
               (a resume=auto rerun with another eval_data) are never reused.
Only a run whose schedule is complete gets a final evaluation: a run stopped earlier by max_steps writes no
final.json (its model is not the run's final one) and says so in a `note:` line; the rerun with resume=auto that
completes it writes the file. Logs final/<set>/ppl and final/<set>/ce (to every writer, through the trainer's
end-of-run metrics). Collective: the evaluation runs on every rank; rank 0 writes the JSON. The same numbers come
out of `python -m eval.ppl --model <run_dir> --window W` on the exported model.
"""
import hashlib
import json
import math
import os
import time

from plugins import Callback, register

DOWN_KEYS = ("tasks", "local", "strategy", "limit", "tokenizer", "include_path", "lm_attr")


@register("callback", "eval_final")
class EvalFinal(Callback):
    """End-of-run PPL (+ optional downstream) as JSON in the run dir."""
    options = dict(sets=None, window=None, max_windows=None, batch_size=None, data=None, tasks=(), local=None,
                   strategy="lockstep", limit=None, tokenizer=None, include_path=None, lm_attr="lm",
                   path="eval/final.json", reuse=True)

    def __init__(self, **opts):
        super().__init__(**opts)
        self.last_eval = None
        self.result = None

    def resolved(self, cfg):
        """The options with the run's eval settings filled in where not given."""
        o = dict(self.opts)
        o["sets"] = o["sets"] or list(cfg.eval_sets) or "all"
        o["window"] = int(o["window"] or cfg.eval_window)
        o["max_windows"] = int(o["max_windows"] or cfg.eval_max_windows)
        o["batch_size"] = int(o["batch_size"] or cfg.eval_batch_size)
        o["data"] = o["data"] or cfg.eval_data or cfg.data
        return o

    def _check_data(self, o):
        from eval import common
        if not os.path.isfile(os.path.join(o["data"], "index.json")):
            raise common.EvalError(f"eval_final: no data dir at {o['data']!r}; set callback_args.eval_final.data "
                                   f"to a data_prep output directory")
        from distillery import shards
        index = shards.read_index(o["data"])
        names = o["sets"] if isinstance(o["sets"], (list, tuple)) and list(o["sets"]) != ["all"] else [
            n for n, sp in index["splits"].items() if sp.get("kind") == "stream"]
        # the trainer checks its own eval_window in resolve(); this is eval_final's window option
        shards.check_eval_windows(o["data"], index, names, o["window"], "callback_args.eval_final.window")

    def on_train_start(self, ctx):
        self._check_data(self.resolved(ctx.cfg))  # before the first step, not after the last

    def on_eval(self, ctx, step, results):
        cfg = ctx.cfg
        self.last_eval = {"step": step, "results": dict(results or {}),
                          "eval": eval_identity(cfg.eval_data or cfg.data, cfg.eval_window, cfg.eval_max_windows)}

    def state_dict(self):
        return {"last_eval": self.last_eval}

    def load_state_dict(self, state):
        self.last_eval = state.get("last_eval")

    def _reuse(self, o, cfg, step, sets):
        """PPL from the trainer's in-loop eval at this step, when it measured exactly this."""
        from eval import ppl
        le = self.last_eval
        if not (o["reuse"] and le and le["step"] == step
                and le.get("eval") == eval_identity(o["data"], o["window"], o["max_windows"])):
            return None
        out = {}
        for name, toks in sets.items():
            ce = le["results"].get(f"eval/{name}/loss")
            if ce is None:
                return None
            n_win = ppl.make_windows(toks, o["window"], o["max_windows"]).shape[0]
            out[name] = {"ce": ce, "ppl": math.exp(ce), "windows": n_win, "targets": n_win * (o["window"] - 1),
                         "window": o["window"]}
        return out

    def on_train_end(self, ctx, step, export_dir, metrics):
        from eval import common, ppl
        t0 = time.time()
        o = self.resolved(ctx.cfg)
        if step < ctx.total_steps:  # every rank alike (collective evaluation): skip on all or none
            if ctx.rank == 0:
                print(f"note: eval_final: skipped: the run stopped at step {step} of {ctx.total_steps} (max_steps), "
                      f"so its model is not the final one; {o['path']} is written when the schedule completes "
                      f"(rerun with resume=auto)", flush=True)
            self.result = None
            return None
        self._check_data(o)
        names = o["sets"] if isinstance(o["sets"], (list, tuple)) else [o["sets"]]
        sets = common.load_sets(o["data"], names)
        res, source = self._reuse(o, ctx.cfg, step, sets), "in_loop_eval"
        if res is None:
            res, source = ppl.evaluate_engine(ctx.engine, sets, o["window"], o["max_windows"], o["batch_size"],
                                              **ppl.engine_call_kw(ctx.cfg)), "computed"
        out = {"step": step, "data": o["data"], "window": o["window"], "max_windows": o["max_windows"], "ppl": res,
               "source": source, "export_dir": export_dir, "last_in_loop_eval": self.last_eval}
        if o["tasks"] or o["local"]:
            from plugins.eval_downstream import EvalDownstream
            down = EvalDownstream(**{k: o[k] for k in DOWN_KEYS if o[k] is not None})
            d = down.evaluate(ctx)
            out["downstream_strategy"] = d.pop("_strategy")
            out["downstream"] = d
        out["seconds"] = round(time.time() - t0, 2)
        metrics.update(ppl.flat_results(res, prefix="final"))
        if ctx.rank == 0 and ctx.run_dir:
            common.write_json(os.path.join(ctx.run_dir, o["path"]), out)
        self.result = out
        return out


def eval_identity(data_dir, window, max_windows):
    """What an evaluation's numbers depend on besides the model: the eval data (its directory, and a digest of the
    checksums its index.json gives every stream file, so a rebuilt set differs too), the window and the window cap."""
    from distillery import shards
    splits = shards.read_index(data_dir)["splits"]
    files = sorted((n, [f["sha256"] for f in sp["files"]]) for n, sp in splits.items() if sp.get("kind") == "stream")
    return {"data": os.path.realpath(data_dir), "streams": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
            "window": int(window), "max_windows": int(max_windows)}
