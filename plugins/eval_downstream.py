"""Downstream accuracy during training, at chosen steps, into TensorBoard (eval/downstream.py does the scoring).

Options (constructor keywords, else from the run config: a dict at cfg.callback_args["eval_downstream"] or
cfg.eval_downstream, else flat keys downstream_<option>, e.g. downstream_steps=[1000,2000]):
  steps      optimizer steps to evaluate at (after that step's update); every: also every N steps (0 = off)
  tasks      lm-eval task specs ('paper', 'hellaswag:0', ...); needs lm-eval installed (optional dependency)
  local      {name: {"path": file.jsonl, "shots": 0, "metric": "acc"}}: offline multiple-choice sets, built-in scorer
  strategy   'lockstep' (default: ranks shard documents and run equal forward counts on the live ZeRO-3 engine) or
             'gathered' (a full 16-bit copy of the weights on every rank)
  limit, batch_size, max_length, tokenizer (dir; default: the data dir's tokenizer/), include_path (task YAMLs),
  lm_attr ('lm': where the engine's module keeps the Hugging Face model), at_end (also evaluate at on_train_end)
Hooks read: on_train_start(cfg) resolves the options (an error there if no task is configured);
on_step_end(step, engine, cfg, run_dir, writer, metrics). Called on every rank; every rank runs the evaluation (it is
collective). Writes TensorBoard scalars downstream/<task>/<metric> (rank 0's writer), adds 'downstream/<task>' to
`metrics` when the trainer passes a dict, appends {step, strategy, seconds, tasks} to <run_dir>/eval/downstream.jsonl.
"""
import os
import time

from plugins import register

OPTIONS = dict(steps=(), every=0, tasks=(), local=None, strategy="lockstep", limit=None, batch_size=8,
               max_length=None, tokenizer=None, include_path=None, lm_attr="lm", at_end=False)


@register("callback", "eval_downstream")
class EvalDownstream:
    """lm-eval / local multiple-choice accuracy at chosen steps (live ZeRO-3 safe)."""

    def __init__(self, **opts):
        unknown = set(opts) - set(OPTIONS)
        if unknown:
            raise ValueError(f"eval_downstream: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
        self.given = opts
        self.opts = None
        self._tok = None
        self.history = []
        if opts:
            self.configure(None)

    def configure(self, cfg):
        from eval import live
        o = dict(OPTIONS)
        o.update(live.callback_args(cfg, "eval_downstream", prefix="downstream"))
        o.update(self.given)
        o["steps"] = {int(s) for s in (o["steps"] or ())}
        o["every"] = int(o["every"] or 0)
        o["tasks"] = [o["tasks"]] if isinstance(o["tasks"], str) else list(o["tasks"] or ())
        o["local"] = dict(o["local"] or {})
        if not o["tasks"] and not o["local"]:
            raise ValueError("eval_downstream needs tasks (lm-eval) and/or local (JSONL) sets: set downstream_tasks "
                             "/ downstream_local (or callback_args.eval_downstream) in the run config")
        if o["tasks"]:
            try:
                import lm_eval  # noqa: F401
            except ImportError:
                raise ValueError("eval_downstream: tasks need lm-eval (pip install lm-eval); offline, use local "
                                 "JSONL sets") from None
        self.opts = o
        return o

    def due(self, step):
        o = self.opts
        return step in o["steps"] or (o["every"] > 0 and step > 0 and step % o["every"] == 0)

    def evaluate(self, engine, cfg=None, run_dir=None):
        """Run every configured task on the live engine; {task: {...}, '_strategy': ...} on every rank."""
        from eval import downstream, live
        o = self.opts or self.configure(cfg)
        if self._tok is None:
            self._tok = live.tokenizer_for(cfg, run_dir, o["tokenizer"])
        module = getattr(engine, "module", engine)
        was_training = module.training
        module.eval()
        try:
            scorer = downstream.scorer_from_engine(engine, self._tok, o["strategy"], o["lm_attr"], o["max_length"],
                                                   o["batch_size"])
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

    def run(self, step, engine, cfg=None, run_dir=None, writer=None, metrics=None):
        from eval import live
        t0 = time.time()
        res = self.evaluate(engine, cfg, run_dir)
        strategy = res.pop("_strategy")
        for task, r in res.items():
            if metrics is not None:
                metrics[f"downstream/{task}"] = r["value"]
            for m, v in r.get("all", {}).items():
                if writer is not None and v is not None:
                    writer.add_scalar(f"downstream/{task}/{m}", v, step)
        rec = {"step": step, "strategy": strategy, "seconds": round(time.time() - t0, 2), "tasks": res}
        self.history.append(rec)
        rank, _ = live.rank_world()
        if rank == 0 and run_dir:
            live.append_jsonl(os.path.join(run_dir, "eval", "downstream.jsonl"), rec)
        return rec

    def on_train_start(self, cfg=None, **_):
        self.configure(cfg)

    def on_step_end(self, step=None, engine=None, cfg=None, run_dir=None, writer=None, metrics=None, **_):
        if self.opts is None:
            self.configure(cfg)
        if step is not None and engine is not None and self.due(int(step)):
            self.run(int(step), engine, cfg, run_dir, writer, metrics)

    def on_train_end(self, step=None, engine=None, cfg=None, run_dir=None, writer=None, **_):
        if self.opts is None:
            self.configure(cfg)
        if self.opts["at_end"] and engine is not None and not any(h["step"] == step for h in self.history):
            self.run(int(step or 0), engine, cfg, run_dir, writer)
