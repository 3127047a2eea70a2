"""The hook registry: every loss variant, alpha schedule and callback is a plugin found by name.

Kinds and their call signatures (always called with keyword arguments):
  divergence      fn(s_logp [N,V], t_logp [N,V], **divergence_args) -> [N] per-token divergence D(teacher || student)
                  on fp32 log-probabilities at temperature T over the shared vocab. The core (distillery/loss.py)
                  does chunking, masking, temperature, T^2 scaling and normalisation, so a divergence is only maths.
  mix             fn(alpha) -> (w_ce, w_kd): the loss is w_ce * CE + w_kd * KD. Mixes are linear in CE and KD on
                  purpose: the fused KD head folds the weights into the gradients it computes in its single pass.
  alpha_schedule  fn(step, total_steps, alpha, start, end, warmup_frac, decay_frac) -> float
  alpha_controller
                  a subclass of plugins.base.AlphaController: alpha decided from what the run measures (teacher and
                  student CE, ...), with state saved in checkpoints; alpha_controller=<name> replaces the schedule
  callback        a subclass of plugins.base.Callback (every hook a documented no-op there); the trainer makes one
                  instance per run with the options at callback_args.<name> and calls its hooks on every rank in
                  config order: on_train_start, on_step_end (may add namespaced keys to `metrics`), on_log (writers),
                  on_eval, on_checkpoint, on_train_end, on_error; state_dict/load_state_dict ride in checkpoints.
                  Callbacks observe; they never step the engine.

Adding one: drop a file into plugins/ (see plugins/_template.py); every non-underscore module here is imported by
load_all(), so nothing else needs editing. `python train.py --list-plugins` shows what is registered.
"""
import importlib
import pkgutil

from distillery.errors import PluginError
from plugins.base import AlphaController, Callback, Context  # noqa: F401  (what a plugin imports)

KINDS = ("divergence", "mix", "alpha_schedule", "alpha_controller", "callback")
_REGISTRY = {kind: {} for kind in KINDS}




def register(kind, name):
    """Decorator: @register("divergence", "forward_kl"). A duplicate name of the same kind raises."""
    if kind not in _REGISTRY:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")

    def deco(obj):
        base = {"callback": Callback, "alpha_controller": AlphaController}.get(kind)
        if base is not None:
            if not (isinstance(obj, type) and issubclass(obj, base)):
                raise PluginError(f"{kind} {name!r} ({obj.__module__}) must subclass plugins.{base.__name__}; see "
                                  f"plugins/_template.py")
            obj.name = name
        if name in _REGISTRY[kind]:
            prev = _REGISTRY[kind][name]
            raise PluginError(f"{kind} plugin {name!r} is registered twice ({prev.__module__} and {obj.__module__}); "
                              f"rename one of them")
        _REGISTRY[kind][name] = obj
        return obj
    return deco


def get(kind, name):
    load_all()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise PluginError(f"unknown {kind} plugin {name!r}; known: {', '.join(sorted(_REGISTRY[kind])) or '(none)'}. "
                          f"Pick one of those or add a file to plugins/") from None


def names(kind):
    load_all()
    return sorted(_REGISTRY[kind])


_loaded = False


def load_all():
    """Import every non-underscore module of this package once (sorted, so registration order is fixed)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            try:
                importlib.import_module(f"{__name__}.{mod.name}")
            except PluginError:
                raise
            except Exception as e:  # a broken plugin file would otherwise break every run with a traceback
                where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
                raise PluginError(f"plugins/{mod.name}.py failed to import{where}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}; fix or remove that file") from e


def describe():
    """Human-readable listing for `train.py --list-plugins`."""
    load_all()
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}:")
        for name in sorted(_REGISTRY[kind]):
            obj = _REGISTRY[kind][name]
            doc = (obj.__doc__ or "").strip().splitlines()
            lines.append(f"  {name:<18} {doc[0] if doc else ''}")
    return "\n".join(lines)
