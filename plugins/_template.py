"""Template: copy to plugins/my_thing.py (no leading underscore) and it is registered at start-up.

Select it in a config by name: divergence=my_kl, mix=..., alpha_schedule=..., callbacks=[...,my_callback], and give
a callback its options under callback_args (YAML: `callback_args: {my_callback: {every: 100}}`; command line:
`callback_args={my_callback: {every: 100}}`). Hooks and their arguments: plugins/base.py.
"""
from plugins import Callback, register


@register("divergence", "my_kl")   # a divergence: per-token D(teacher || student) on fp32 log-probs [N, V] -> [N]
def my_kl(s_logp, t_logp, **divergence_args):
    """One line shown by `train.py --list-plugins`."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


@register("callback", "my_callback")
class MyCallback(Callback):
    """Counts log steps with a loss above a threshold; reports the count every `every` steps."""
    options = {"threshold": 10.0, "every": 100}   # the only keys callback_args.my_callback may set
    wants_diagnostics = False                     # True: the loss also computes entropy/agreement sums (diag=)

    def __init__(self, **opts):
        super().__init__(**opts)                  # checks the options; self.opts = defaults updated with them
        self.high = 0

    def on_step_end(self, ctx, step, metrics, diag):
        if metrics is not None:                   # a dict on log steps only: read it, add namespaced keys
            self.high += metrics["loss/total"] > self.opts["threshold"]
            metrics["my/high_loss_steps"] = self.high
        if step % self.opts["every"] == 0:
            ctx.log(step, {"my/high_loss_steps_report": self.high})  # to every writer and metrics.jsonl

    def state_dict(self):                         # saved in checkpoints: a resumed run keeps counting
        return {"high": self.high}

    def load_state_dict(self, state):
        self.high = state["high"]
