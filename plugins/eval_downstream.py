"""Downstream accuracy during training, at chosen steps, into every writer (eval/downstream.py does the scoring).

Options (callback_args.eval_downstream; at least one of tasks / local):
  steps      optimizer steps to evaluate at (after that step's update); every: also every N steps (0 = off)
  tasks      lm-eval task specs ('paper', 'hellaswag:0', ...); needs lm-eval installed (optional dependency)
  local      {name: {"path": file.jsonl, "shots": 0, "metric": "acc"}}: offline multiple-choice sets, built-in scorer
  strategy   'lockstep' (default: ranks shard documents and run equal forward counts on the live ZeRO-3 engine) or
             'gathered' (a full 16-bit copy of the weights on every rank)
  limit, batch_size, max_length, tokenizer (dir; default: the data dir's tokenizer/), include_path (task YAMLs),
  lm_attr ('lm': where the engine's module keeps the Hugging Face model), at_end (also evaluate at the end)
Collective: every rank runs the evaluation. Logs downstream/<task>/<metric> (ctx.log: TensorBoard, metrics.jsonl),
adds downstream/<task> to a log step's metrics, appends {step, strategy, seconds, tasks} to
<run_dir>/eval/downstream.jsonl. The history of evaluations is part of the checkpoint (state_dict).
"""
import os
import time

from distillery.atomic import append_jsonl
from distillery.errors import PluginError
from plugins import Callback, register


@register("callback", "eval_downstream")
class EvalDownstream(Callback):
    """lm-eval / local multiple-choice accuracy at chosen steps (live ZeRO-3 safe)."""
    options = dict(steps=(), every=0, tasks=(), local=None, strategy="lockstep", limit=None, batch_size=8,
                   max_length=None, tokenizer=None, include_path=None, lm_attr="lm", at_end=False)

    def __init__(self, **opts):
        super().__init__(**opts)
        o = self.opts
        o["steps"] = {int(s) for s in (o["steps"] or ())}
        o["every"] = int(o["every"] or 0)
        o["tasks"] = [o["tasks"]] if isinstance(o["tasks"], str) else list(o["tasks"] or ())
        o["local"] = dict(o["local"] or {})
        if not o["tasks"] and not o["local"]:
            raise PluginError("eval_downstream needs tasks (lm-eval) and/or local (JSONL) sets: set "
                              "callback_args.eval_downstream.tasks or .local in the run config")
        if o["tasks"]:
            try:
                import lm_eval  # noqa: F401
            except ImportError:
                raise PluginError("eval_downstream: tasks need lm-eval (pip install lm-eval); offline, use local "
                                  "JSONL sets") from None
        self._tok = None
        self.history = []

    def due(self, step):
        o = self.opts
        return step in o["steps"] or (o["every"] > 0 and step > 0 and step % o["every"] == 0)

    def tokenizer(self, ctx):
        """The run's tokenizer: the tokenizer option, the data dir's tokenizer/, or the run's export/."""
        from eval import common
        cands = [self.opts["tokenizer"]] if self.opts["tokenizer"] else []
        cands += [os.path.join(ctx.cfg.eval_data or ctx.cfg.data, "tokenizer"), os.path.join(ctx.run_dir, "export")]
        for c in cands:
            if c and os.path.isdir(c):
                tok = common.load_tokenizer(c)
                if tok is not None:
                    return tok
        raise common.EvalError(f"no tokenizer found for this run (tried {cands}); set "
                               f"callback_args.eval_downstream.tokenizer=<dir>")

    def evaluate(self, ctx):
        """Run every configured task on the live engine; {task: {...}, '_strategy': ...} on every rank."""
        from eval import downstream
        o = self.opts
        if self._tok is None:
            self._tok = self.tokenizer(ctx)
        module = getattr(ctx.engine, "module", ctx.engine)
        was_training = module.training
        module.eval()
        try:
            scorer = downstream.scorer_from_engine(ctx.engine, self._tok, o["strategy"], o["lm_attr"],
                                                   o["max_length"], o["batch_size"])
            out = {}
            for name in sorted(o["local"]):
                spec = o["local"][name]
                spec = spec if isinstance(spec, dict) else {"path": spec}
                metric = spec.get("metric", "acc")
                r = downstream.evaluate_local(scorer, spec["path"], int(spec.get("shots", 0)), o["limit"])
                out[name] = {"metric": metric, "value": r[metric], "shots": r["num_fewshot"], "n": r["n"],
                             "all": {"acc": r["acc"], "acc_norm": r["acc_norm"]}}
            if o["tasks"]:
                res = downstream.run_harness(scorer, downstream.task_specs(o["tasks"]), o["include_path"], o["limit"])
                res.pop("_strategy", None)
                out.update(res)
            out["_strategy"] = scorer.strategy
            return out
        finally:
            module.train(was_training)

    def run(self, ctx, step, metrics=None):
        t0 = time.time()
        res = self.evaluate(ctx)
        strategy = res.pop("_strategy")
        scalars = {}
        for task, r in res.items():
            if metrics is not None:
                metrics[f"downstream/{task}"] = r["value"]
            scalars.update({f"downstream/{task}/{m}": v for m, v in r.get("all", {}).items() if v is not None})
        ctx.log(step, scalars)
        rec = {"step": step, "strategy": strategy, "seconds": round(time.time() - t0, 2), "tasks": res}
        self.history.append(rec)
        if ctx.rank == 0 and ctx.run_dir:
            append_jsonl(os.path.join(ctx.run_dir, "eval", "downstream.jsonl"), rec)
        return rec

    def on_step_end(self, ctx, step, metrics, diag):
        if self.due(step):
            self.run(ctx, step, metrics)

    def on_train_end(self, ctx, step, export_dir, metrics):
        if self.opts["at_end"] and not any(h["step"] == step for h in self.history):
            self.run(ctx, step, metrics)

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = list(state.get("history", []))
