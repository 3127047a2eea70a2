"""Template: copy to plugins/my_thing.py (no leading underscore) and it is registered at start-up.

Select it in a config by name: divergence=my_kl, mix=..., alpha_schedule=..., callbacks=[...,my_callback].
"""
from plugins import register


@register("divergence", "my_kl")   # a divergence: per-token D(teacher || student) on fp32 log-probs [N, V] -> [N]
def my_kl(s_logp, t_logp, **divergence_args):
    """One line shown by `train.py --list-plugins`."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


@register("callback", "my_callback")
class MyCallback:
    """Hooks are optional; all are called with keyword arguments on every rank, in config order."""
    wants_diagnostics = False  # True makes the loss compute entropy/agreement sums (passed as diag=)

    def on_train_start(self, cfg=None, engine=None, run_dir=None, rank=0, **_):
        pass

    def on_step_end(self, step=0, metrics=None, **_):
        if metrics is not None:          # a dict on log steps only: add namespaced keys, do not .item() elsewhere
            metrics["my/thing"] = 0.0

    def on_eval(self, step=0, results=None, **_):
        pass

    def on_checkpoint(self, step=0, path=None, **_):
        pass

    def on_train_end(self, step=0, export_dir=None, **_):
        pass
