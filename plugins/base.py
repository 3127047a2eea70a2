"""The callback contract: one base class whose every hook is a documented no-op, one typed context, one runner.
Also the alpha controller contract (AlphaController, at the end): alpha decided from what the run measures.

A callback is a class registered with @register("callback", name) that subclasses Callback. The trainer builds one
instance per run, at start-up, with the options found at `callback_args.<name>` in the run config (checked against
the class's `options`: an unknown option stops the run before any work), and calls its hooks on every rank, in the
order of `callbacks=[...]`, always as hook(ctx, **event) with the keywords documented below. Callbacks observe and
report; they never step the engine.

Metrics: on a log step the trainer hands every callback's on_step_end one `metrics` dict to add namespaced keys to;
only after *all* of them ran does it call ctx.log(step, metrics), which hands the finished record to every
callback's on_log (the writers: TensorBoard, console) and appends it to metrics.jsonl. So what a producer adds
reaches every writer whatever the list's order. A callback with a result of its own at any step (an evaluation)
calls ctx.log(step, {...}) itself.

State: state_dict() is saved in every checkpoint (per rank, with DeepSpeed's client state) and handed back to
load_state_dict() on resume, before on_train_start, so a resumed run's callbacks continue where they were.
"""
import dataclasses
import sys
from typing import Any, Callable, ClassVar

from distillery.errors import PluginError


class NullWriter:
    """The writer on ranks other than 0: the SummaryWriter methods callbacks use, doing nothing, so that callbacks
    never branch on the rank to log."""

    def add_scalar(self, tag, value, step=None):
        pass

    def flush(self):
        pass

    def close(self):
        pass


@dataclasses.dataclass
class Context:
    """What every hook gets as its first argument. Built once per run by the trainer."""
    cfg: Any                 # distillery.config.Config, resolved (seq_len and eval_sets filled in)
    engine: Any              # the student's DeepSpeed engine; engine.module.lm is the Hugging Face model
    teacher: Any = None      # the teacher (distillery/placement.py: replicated, or a ZeRO-3 inference engine), or
                             # None (no KD weight at any step)
    run_dir: str = ""
    writer: Any = dataclasses.field(default_factory=NullWriter)  # SummaryWriter on rank 0, NullWriter elsewhere
    rank: int = 0
    world: int = 1
    start_step: int = 0      # 0 for a fresh run, the checkpoint's step after a resume
    end_step: int = 0        # where this process stops (max_steps can end it before total_steps)
    total_steps: int = 0     # the run's schedule length
    step: int = 0            # the last finished optimizer step
    log: Callable = None     # log(step, record): to every callback's on_log and to metrics.jsonl (set by Callbacks)


class Callback:
    """Base class of every callback. Every hook is a no-op here; override the ones you need."""

    name: ClassVar[str] = ""          # set by @register("callback", name)
    options: ClassVar[dict] = {}      # option -> default; what callback_args.<name> may set
    wants_diagnostics: ClassVar[bool] = False  # True: the loss also returns per-token diagnostics (entropy, ...)

    def __init__(self, **opts):
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise PluginError(f"callback {self.name or type(self).__name__}: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(self.options)) or '(none)'}")
        self.opts = {**self.options, **opts}

    def on_train_start(self, ctx):
        """Once, after the engines are built and any checkpoint is loaded, before the first step."""

    def on_step_end(self, ctx, step, metrics, diag):
        """After optimizer step `step` (1-based). On log steps `metrics` is the step's dict (loss/*, alpha, lr,
        perf/*, ...) to add namespaced keys to and `diag` the diagnostics' token means (empty unless a callback
        wants_diagnostics and a teacher is loaded); on other steps both are None. Do not sync the device otherwise."""

    def on_log(self, ctx, step, record):
        """A finished record to write: a log step's metrics, an evaluation's results, end-of-run numbers. Writers
        implement this; it runs after every producer has added its keys."""

    def on_eval(self, ctx, step, results):
        """After the trainer's in-loop evaluation: results = {"eval/<set>/loss": ce, "eval/<set>/ppl": ppl}."""

    def on_checkpoint(self, ctx, step, path):
        """After a checkpoint of step `step` is complete at `path` (every rank)."""

    def on_train_end(self, ctx, step, export_dir, metrics):
        """After the last step (and the export, if any: export_dir, else None). Add end-of-run numbers to
        `metrics`; they are logged once every callback has run."""

    def on_error(self, ctx, step, error):
        """The loop raised `error` during step `step` (or start-up / the end, step = the last finished one). Close
        or flush what you hold; the error is re-raised after every callback has seen it."""

    def state_dict(self):
        """What a resumed run needs to continue (JSON-like values); saved with every checkpoint."""
        return {}

    def load_state_dict(self, state):
        """The state_dict() of the checkpoint a run resumes from."""


class Callbacks:
    """The run's callbacks in config order, and the one place hooks are called."""

    def __init__(self, items):
        self.items = list(items)

    @classmethod
    def build(cls, names, callback_args):
        """Instances for `names` with their options from callback_args; unknown names or options raise here."""
        from plugins import get
        stray = sorted(set(callback_args) - set(names))
        if stray:
            raise PluginError(f"callback_args names {', '.join(stray)}, which is not in callbacks={list(names)}; "
                              f"add it to callbacks or drop its options")
        out = []
        for name in names:
            opts = callback_args.get(name) or {}
            if not isinstance(opts, dict):
                raise PluginError(f"callback_args.{name} must be a mapping of options, got {opts!r}")
            out.append(get("callback", name)(**opts))
        return cls(out)

    @property
    def wants_diagnostics(self):
        return any(cb.wants_diagnostics for cb in self.items)

    def bind(self, ctx, metrics_path=None):
        """Give ctx its log(): every callback's on_log, then one JSON line in metrics_path (rank 0)."""
        from distillery.atomic import append_jsonl

        def log(step, record):
            for cb in self.items:
                cb.on_log(ctx, step, record)
            if metrics_path and ctx.rank == 0:
                append_jsonl(metrics_path, dict(step=step, **record))
        ctx.log = log
        return ctx

    def __call__(self, hook, ctx, **event):
        for cb in self.items:
            getattr(cb, hook)(ctx, **event)

    def error(self, ctx, step, error):
        """on_error on every callback; a callback failing there is reported and does not hide the original error."""
        for cb in self.items:
            try:
                cb.on_error(ctx, step=step, error=error)
            except Exception as e:  # noqa: BLE001
                if ctx.rank == 0:
                    print(f"warning: callback {cb.name}.on_error failed: {type(e).__name__}: {e}", file=sys.stderr)

    def state_dict(self):
        return {cb.name: cb.state_dict() for cb in self.items}

    def load_state_dict(self, state):
        for cb in self.items:
            if cb.name in (state or {}):
                cb.load_state_dict(state[cb.name])


class AlphaController:
    """Base class of an alpha controller: a stateful alternative to the alpha schedules (plugins/schedules.py), which
    see only the step number. Selected with alpha_controller=<name>; its options come from alpha_controller_args
    (checked against `options`, like a callback's) and the run's `alpha` is its ceiling. The trainer calls, on every
    rank and in this order each optimizer step:

      alpha(step)          alpha of optimizer step `step` (0-based), before its micro-batches
      observe(parts)       each micro-batch's loss parts (distillery/loss_parts.py LossParts fields as a dict:
                           ce_sum, kd_sum, n_tokens, diag) as device tensors: accumulate, never sync the host here
      end_step(step)       after optimizer step `step` (1-based count of finished steps). The only hook that may run
                           a collective (all ranks call it on the same steps), so every rank decides the same alpha

    metrics() adds namespaced keys to each log record; state_dict()/load_state_dict() ride in every checkpoint
    (as the callbacks' do), so a resumed run continues with the same alpha and the same partial measurements:
    resume is exact. `wants_diagnostics` makes the loss compute the per-token diagnostics (teacher_ce, ...) on every
    micro-batch; a controller reading diag needs a live teacher (a teacher cache holds no teacher CE)."""

    name: ClassVar[str] = ""          # set by @register("alpha_controller", name)
    options: ClassVar[dict] = {}      # option -> default; what alpha_controller_args may set
    wants_diagnostics: ClassVar[bool] = False

    def __init__(self, ceiling, total_steps, **opts):
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise PluginError(f"alpha_controller {self.name or type(self).__name__}: unknown option(s) "
                              f"{', '.join(unknown)}; known: {', '.join(sorted(self.options)) or '(none)'}")
        self.opts = {**self.options, **opts}
        self.ceiling, self.total_steps = float(ceiling), int(total_steps)

    def alpha(self, step):
        """alpha of optimizer step `step`; the base class holds the ceiling."""
        return self.ceiling

    def max_alpha(self):
        """The largest alpha it may choose: a teacher is loaded iff the mix gives KD a weight at this alpha."""
        return self.ceiling

    def observe(self, parts):
        """One micro-batch's loss parts (device tensors)."""

    def end_step(self, step):
        """After optimizer step `step` (1-based); may all_reduce (collective)."""

    def metrics(self):
        """Namespaced keys for the log record (e.g. {"alpha/gap": 0.3})."""
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        """The state_dict() of the checkpoint a run resumes from."""
