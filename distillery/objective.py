"""The training objective of a run: divergence + mix + alpha schedule, resolved from the config once.

Lu & Liu 2026, eq. 1 (paper_setup.md): L = w_ce(alpha) * CE + w_kd(alpha) * T^2 * D(p_t^T || p_s^T), with
(w_ce, w_kd) = mix(alpha) and alpha = alpha_schedule(step), or alpha decided by an alpha controller from what the run
measures (alpha_controller=; plugins/base.py AlphaController, with `alpha` as its ceiling). The plugins are found by
name here, so an unknown name fails at start with the known ones listed.
"""
import dataclasses
from typing import Callable, Optional

import plugins
from distillery.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Objective:
    divergence: Callable
    mix: Callable
    schedule: Callable
    total_steps: int
    alpha: float
    schedule_args: dict          # start, end, warmup_frac, decay_frac of the alpha schedule
    temperature: float
    divergence_args: dict
    impl: str                    # loss_impl: fused | plain
    chunk_size: int              # rows per fused-head chunk; 0 = automatic
    closed_form: bool = True     # fused head: formulas where the divergence declares one (distillery/fused_kd.py)
    compile: bool = False        # fused head: torch.compile the autograd route
    kd_vocab: Optional[int] = None  # the vocab shared with the teacher; None = no teacher is loaded
    controller: object = None    # an AlphaController instance (stateful), or None: alpha from the schedule

    @classmethod
    def from_config(cls, cfg, total_steps):
        obj = cls._build(cfg, total_steps)
        obj.check_divergence_args(cfg.divergence)
        return obj

    def check_divergence_args(self, name):
        """Call the divergence once on a toy pair of distributions (4 tokens x 16) with the run's divergence_args,
        so a misspelt or out-of-range option stops the run at start, not at the first micro-step after config.yaml
        is written. Divergences raise TypeError (unknown option) or ValueError (bad value), as
        plugins/divergences.py does; anything else is a bug in the plugin and propagates."""
        import torch
        g = torch.Generator().manual_seed(0)
        s, t = (torch.randn(4, 16, generator=g).log_softmax(-1) for _ in range(2))
        try:
            self.divergence(s_logp=s, t_logp=t, **self.divergence_args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"divergence {name} rejects divergence_args {self.divergence_args}: {e}; fix "
                              f"divergence_args (each divergence documents its options in plugins/)") from None

    @classmethod
    def _build(cls, cfg, total_steps):
        controller = None
        if cfg.alpha_controller:
            if cfg.alpha_schedule != "constant":
                raise ConfigError(f"alpha_controller={cfg.alpha_controller} decides alpha itself, so alpha_schedule="
                                  f"{cfg.alpha_schedule} would be ignored; drop one of the two")
            controller = plugins.get("alpha_controller", cfg.alpha_controller)(
                cfg.alpha, total_steps, **dict(cfg.alpha_controller_args))
        elif cfg.alpha_controller_args:
            raise ConfigError("alpha_controller_args is set but alpha_controller is not; set alpha_controller=<name> "
                              f"(known: {', '.join(plugins.names('alpha_controller'))}) or drop the args")
        return cls(controller=controller, divergence=plugins.get("divergence", cfg.divergence),
                   mix=plugins.get("mix", cfg.mix),
                   schedule=plugins.get("alpha_schedule", cfg.alpha_schedule), total_steps=total_steps,
                   alpha=cfg.alpha, schedule_args=dict(start=cfg.alpha_start, end=cfg.alpha_end,
                                                       warmup_frac=cfg.alpha_warmup_frac,
                                                       decay_frac=cfg.alpha_decay_frac),
                   temperature=cfg.temperature, divergence_args=dict(cfg.divergence_args), impl=cfg.loss_impl,
                   chunk_size=cfg.loss_chunk_size, closed_form=cfg.loss_closed_form, compile=cfg.loss_compile)

    def alpha_at(self, step):
        """alpha at optimizer step `step` (0-based)."""
        if self.controller is not None:
            return self.controller.alpha(step)
        return self.schedule(step=step, total_steps=self.total_steps, alpha=self.alpha, **self.schedule_args)

    def weights(self, step):
        """(alpha, w_ce, w_kd) at optimizer step `step`."""
        alpha = self.alpha_at(step)
        w_ce, w_kd = self.mix(alpha=alpha)
        return alpha, w_ce, w_kd

    def needs_teacher(self):
        """Whether some step gives KD a non-zero weight; alpha = 0 runs never load (or even open) a teacher."""
        if self.controller is not None:
            return self.mix(alpha=self.controller.max_alpha())[1] > 0
        return any(self.weights(s)[2] > 0 for s in range(self.total_steps))

    def loss_kw(self, with_teacher=True):
        """The keyword arguments of distillery.loss.compute_loss that come from the objective (not the batch)."""
        kw = dict(impl=self.impl, chunk_size=self.chunk_size, closed_form=self.closed_form, compile=self.compile)
        if with_teacher:
            kw.update(kd_vocab=self.kd_vocab, divergence=self.divergence, divergence_args=self.divergence_args,
                      temperature=self.temperature)
        return kw

    # ---- the controller's hooks (no-ops without one); train.py calls them on every rank, in this order
    @property
    def wants_diagnostics(self):
        return self.controller is not None and self.controller.wants_diagnostics

    def observe(self, parts):
        """One micro-batch's loss parts (device tensors, no host sync)."""
        if self.controller is not None:
            self.controller.observe(parts)

    def end_step(self, step):
        """After optimizer step `step` (1-based); the controller may all_reduce here (collective)."""
        if self.controller is not None:
            self.controller.end_step(step)

    def metrics(self):
        return self.controller.metrics() if self.controller is not None else {}

    def state_dict(self):
        """Saved in every checkpoint (collective: the controller reduces its partial sums)."""
        return {"controller": self.controller.state_dict()} if self.controller is not None else {}

    def load_state_dict(self, state):
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
