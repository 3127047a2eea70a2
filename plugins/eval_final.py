"""End-of-run evaluation written to <run_dir>/eval/final.json: windowed PPL (paper protocol) on the evaluation sets
with the live engine, optional downstream tasks, and the trainer's last in-loop eval.

Options (constructor keywords, else a dict at cfg.callback_args["eval_final"] or cfg.eval_final, else the trainer's
own eval settings):
  sets         stream split names or 'all' (default: cfg.eval_sets, else every stream split of the data dir)
  window, max_windows, batch_size   default cfg.eval_window / eval_max_windows / eval_batch_size (else 4096 / 256 / 1)
  data         data dir (default cfg.data, or data.dir / data.path / data_dir)
  tasks, local, strategy, limit, tokenizer, include_path, lm_attr: downstream at the end, as in eval_downstream
  path         output file relative to the run dir (default eval/final.json)
  reuse        True (default): when the trainer's own eval ran at this very step with the same sets and window,
               its numbers are used instead of a second pass (recorded as "source": "in_loop_eval")
Hooks read: on_eval(step, results) (the trainer's flat {"eval/<set>/loss", "eval/<set>/ppl"}); on_train_end(engine,
cfg, run_dir, step, writer, metrics, export_dir): runs the evaluation on every rank (collective), rank 0 writes the
JSON and TensorBoard scalars final/<set>/ppl and final/<set>/ce.
The same numbers come out of `python -m eval.ppl --model <run_dir> --window W` on the exported model.
"""
import math
import os
import time

from plugins import register

OPTIONS = dict(sets=None, window=None, max_windows=None, batch_size=None, data=None, tasks=(), local=None,
               strategy="lockstep", limit=None, tokenizer=None, include_path=None, lm_attr="lm",
               path="eval/final.json", reuse=True)
DOWN_KEYS = ("tasks", "local", "strategy", "limit", "tokenizer", "include_path", "lm_attr")


@register("callback", "eval_final")
class EvalFinal:
    """End-of-run PPL (+ optional downstream) as JSON in the run dir."""

    def __init__(self, **opts):
        unknown = set(opts) - set(OPTIONS)
        if unknown:
            raise ValueError(f"eval_final: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
        self.given = opts
        self.last_eval = None
        self.result = None

    def options(self, cfg):
        from eval import live
        o = dict(OPTIONS)
        o.update(live.callback_args(cfg, "eval_final"))
        o.update(self.given)
        o["sets"] = o["sets"] or live.cfg_get(cfg, "eval_sets") or "all"
        o["window"] = int(o["window"] or live.first(cfg, ("eval_window", "eval.window"), 4096))
        o["max_windows"] = int(o["max_windows"] or live.first(cfg, ("eval_max_windows", "eval.max_windows"), 256))
        o["batch_size"] = int(o["batch_size"] or live.first(cfg, ("eval_batch_size", "eval.batch_size"), 1))
        return o

    def on_eval(self, step=None, results=None, **_):
        self.last_eval = {"step": step, "results": dict(results or {})}

    def _reuse(self, o, cfg, step, sets):
        """PPL from the trainer's in-loop eval at this step, when it measured exactly this."""
        from eval import live, ppl
        le = self.last_eval
        if not (o["reuse"] and le and le["step"] == step and o["window"] == live.cfg_get(cfg, "eval_window")
                and o["max_windows"] == live.cfg_get(cfg, "eval_max_windows")):
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

    def on_train_end(self, engine=None, cfg=None, run_dir=None, step=None, writer=None, metrics=None,
                     export_dir=None, **_):
        from eval import common, live, ppl
        if engine is None:
            return None
        t0 = time.time()
        o = self.options(cfg)
        data = live.data_dir(cfg, o["data"])
        if data is None:
            raise common.EvalError("eval_final: no data dir (set data= in its options or data in the run config)")
        names = o["sets"] if isinstance(o["sets"], (list, tuple)) else [o["sets"]]
        sets = common.load_sets(data, names)
        res, source = self._reuse(o, cfg, step, sets), "in_loop_eval"
        if res is None:
            res, source = ppl.evaluate_engine(engine, sets, o["window"], o["max_windows"], o["batch_size"],
                                              **ppl.engine_call_kw(cfg)), "computed"
        out = {"step": step, "data": data, "window": o["window"], "max_windows": o["max_windows"], "ppl": res,
               "source": source, "export_dir": export_dir, "last_in_loop_eval": self.last_eval}
        if o["tasks"] or o["local"]:
            from plugins.eval_downstream import EvalDownstream
            down = EvalDownstream(**{k: o[k] for k in DOWN_KEYS if o[k] is not None})
            d = down.evaluate(engine, cfg, run_dir)
            out["downstream_strategy"] = d.pop("_strategy")
            out["downstream"] = d
        out["seconds"] = round(time.time() - t0, 2)
        rank, _ = live.rank_world()
        flat = ppl.log_results(writer if rank == 0 else None, step or 0, res, prefix="final")
        if metrics is not None:
            metrics.update(flat)
        if rank == 0 and run_dir:
            common.write_json(os.path.join(run_dir, o["path"]), out)
        self.result = out
        return out
