"""Distillery: knowledge distillation during LLM pretraining, one DeepSpeed process per GPU.

    python -m data_prep.offline --out data/offline                         # the offline corpus (no network)
    deepspeed train.py --ds_config ds_configs/cpu.json                      # the offline default: one distillation
    deepspeed train.py --ds_config ds_configs/cpu.json alpha=0 name=base    # its alpha = 0 baseline (no teacher)
    deepspeed --num_gpus 8 train.py --ds_config ds_configs/zero3.json \
        --config configs/paper/student-1.7b-50b.yaml alpha=0.4 teacher=runs/teacher-0.7b-30b/export
    python train.py --list-plugins                                          # registered losses, schedules, callbacks
    tensorboard --logdir runs/

Objective (Lu & Liu 2026, eq. 1; paper_setup.md): L = w_ce(alpha) * CE + w_kd(alpha) * T^2 * D(p_t^T || p_s^T), both
terms token means over every target position of the global batch (all micro-batches, all ranks). The student is
a ZeRO engine; the frozen teacher, in the same process, is replicated or a ZeRO-3 inference engine (teacher_placement,
distillery/placement.py); alpha = 0 loads no teacher.

Reading order: resolve() checks every input and returns a Plan; main() builds the engines, the data reader and the
callbacks' Context into a Run; train() is the loop; finish() exports. docs/architecture.md has the map.
"""
import argparse
import contextlib
import dataclasses
import os
import time

from distillery import preempt

if __name__ == "__main__":  # first: a signal during the slow imports below stops with a message (distillery/preempt.py)
    preempt.catch_early()
import torch

if not torch.cuda.is_available():  # say so up front instead of DeepSpeed's accelerator-probe warning
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch.distributed as dist

import plugins
from distillery import checkpoint, maskprobe, provenance, resume, runlog, shards
from distillery.config import Config, load_config, save_config, to_dict
from distillery.engines import batch_layout, init_student, load_ds_config, student_ds_config
from distillery.errors import ConfigError, DataError, Preempted, TrainingError, cli  # noqa: F401  (TrainingError: tests)
from distillery.flops import ComputeLedger, compute_match_budget, export_pretrain_flops, write_export_compute
from distillery.guard import Guard
from distillery.launch import from_rank0, init_distributed, rank_world, shutdown
from distillery.loss_parts import IGNORE_INDEX, shift_targets
from distillery.models import attn_implementation, build_student, check_model_dir, export_hf, hf_config
from distillery.objective import Objective
from distillery.packing import doc_positions
from distillery.placement import build_teacher, decide
from distillery.preempt import Preemption, save_decision
from distillery.runlock import RunLock
from distillery.sampler import RankReader
from distillery.shards import load_stream, read_index
from distillery.step import StepStats, Timer, micro_step
from distillery.teacher_cache import open_cache
from eval import ppl
from plugins.base import Callbacks, Context, NullWriter


# ---------------------------------------------------------------------------- config
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Distillery trainer", epilog="overrides: key=value (distillery/config.py)")
    ap.add_argument("--ds_config", default="ds_configs/cpu.json", help="DeepSpeed engine settings (JSON)")
    ap.add_argument("--config", default=None, help="a preset from configs/ (YAML)")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("--list-plugins", action="store_true", help="print the registered plugins and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap.parse_args(argv)


@dataclasses.dataclass
class Plan:
    """Everything decided before a process group, a model or a file exists."""
    cfg: Config
    ds_base: dict              # the DeepSpeed JSON (engine settings only)
    index: dict                # the training data's index.json
    world: int
    grad_accum: int            # micro-batches per rank per optimizer step
    total_steps: int
    objective: Objective       # divergence + mix + alpha schedule; kd_vocab set iff KD has a teacher (live or cached)
    callbacks: Callbacks       # built with their options (callback_args), in config order
    cache: object = None       # distillery.teacher_cache.CacheReader when teacher_cache= replaces the live teacher
    placement: str = ""        # where the live teacher lives and why (distillery/placement.py); config.yaml's header


def resolve(args):
    """Everything that can be wrong with the inputs is found here, before a process group, a model or a file exists."""
    cfg = load_config(args.config, args.overrides)
    ds_base = load_ds_config(args.ds_config)
    index = check_data(cfg)
    if cfg.compute_match:  # an alpha = 0 baseline at the FLOPs of a distilled run (student + teacher forward)
        student = cfg.student_init or hf_config(cfg.student, index["vocab_size"], cfg.seq_len)
        cfg.train_tokens, teacher, tokens = compute_match_budget(cfg, student)
        if rank_world()[0] == 0:
            print(f"note: compute_match: {tokens:,} distilled tokens with teacher {teacher} -> train_tokens="
                  f"{cfg.train_tokens:,} for this baseline")
    total_steps = cfg.train_tokens // (cfg.global_batch_size * cfg.seq_len)
    if total_steps < 1:
        raise ConfigError(f"train_tokens={cfg.train_tokens} is less than one global batch "
                          f"({cfg.global_batch_size} x {cfg.seq_len} tokens)")
    if cfg.student_init:
        check_model_dir(cfg.student_init, index, who="student_init")
    cfg.attn_impl = attn_implementation(cfg.attn_impl, cfg.doc_mask)  # the kernel this run uses, in config.yaml
    if cfg.doc_mask and index.get("eos_id") is None:
        raise DataError(f"doc_mask=true needs the data's EOS id, and {cfg.data}/index.json has none; rebuild the "
                        f"data with data_prep, or set doc_mask=false")
    world = int(os.environ.get("WORLD_SIZE", 1))
    _, grad_accum = batch_layout(cfg, world)
    objective = Objective.from_config(cfg, total_steps)
    callbacks = Callbacks.build(cfg.callbacks, cfg.callback_args)
    cache, placement = None, ""
    if objective.needs_teacher() and cfg.teacher_cache:  # sparse targets from disk, no teacher in the process
        if objective.wants_diagnostics:
            raise ConfigError(f"alpha_controller={cfg.alpha_controller} reads the teacher's CE, which a teacher cache "
                              f"does not hold; drop teacher_cache (live teacher) or the controller")
        cache = open_cache(cfg, rank_world()[0] == 0)
        objective = dataclasses.replace(objective, impl="sparse", kd_vocab=cache.kd_vocab)
    elif objective.needs_teacher():
        if not cfg.teacher:
            raise ConfigError(f"alpha={cfg.alpha} (mix {cfg.mix}) needs a teacher: set teacher=<hf dir>, or "
                              f"alpha=0 for the baseline")
        objective = dataclasses.replace(objective, kd_vocab=check_model_dir(cfg.teacher, index, who="teacher"))
        student = cfg.student_init or hf_config(cfg.student, index["vocab_size"], cfg.seq_len)
        placed = decide(cfg, ds_base, world, cfg.teacher, student)  # replicated, partitioned or offload, and why
        cfg.teacher_placement, placement = placed.placement, placed.line
        if rank_world()[0] == 0:
            print(placement, flush=True)
    elif cfg.teacher and cfg.teacher != Config.teacher and rank_world()[0] == 0:
        print(f"note: KD weight is 0 at every step, so teacher={cfg.teacher} is not loaded")
    if cfg.doc_mask:  # the kernel keeps packed documents apart at this micro-batch on these models, or the run stops
        maskprobe.check_run(cfg, ds_base, index, live_teacher=objective.kd_vocab is not None and cache is None)
    return Plan(cfg, ds_base, index, world, grad_accum, total_steps, objective, callbacks, cache, placement)


def check_data(cfg):
    """The training shards and the eval sets exist and share one tokenizer; fills cfg.seq_len and cfg.eval_sets."""
    index = read_index(cfg.data)
    seq_len = index["splits"].get("train", {}).get("seq_len")
    if seq_len is None:
        raise DataError(f"data set {cfg.data!r} has no 'train' split; rebuild it with data_prep")
    if cfg.seq_len and cfg.seq_len != seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} but {cfg.data} holds rows of {seq_len}; re-pack the data with "
                          f"data_prep --seq_len {cfg.seq_len} or drop the override")
    cfg.seq_len = seq_len
    eval_dir = cfg.eval_data or cfg.data
    eval_index = read_index(eval_dir)
    if eval_index["tokenizer"]["vocab_hash"] != index["tokenizer"]["vocab_hash"]:
        raise DataError(f"eval sets in {eval_dir} were tokenised with {eval_index['tokenizer']['name']}, the training "
                        f"data with {index['tokenizer']['name']}; rebuild them with data_prep.evalsets --tokenizer "
                        f"{cfg.data}/tokenizer")
    streams = [k for k, v in eval_index["splits"].items() if v["kind"] == "stream"]
    missing = [s for s in cfg.eval_sets if s not in streams]
    if missing:
        raise DataError(f"eval set(s) {', '.join(missing)} not in {eval_dir} (it has: {', '.join(streams)}); "
                        f"fix eval_sets= or build them with data_prep")
    cfg.eval_sets = list(cfg.eval_sets) or streams
    if cfg.eval_interval >= 0 or "eval_final" in cfg.callbacks:  # an evaluation will read them
        shards.check_eval_windows(eval_dir, eval_index, cfg.eval_sets, cfg.eval_window)
    if cfg.export and not os.path.isdir(os.path.join(cfg.data, "tokenizer")):
        raise DataError(f"data set {cfg.data} has no tokenizer/: the exported student would have none and could not "
                        f"serve as a teacher; copy the tokenizer into {cfg.data}/tokenizer, or set export=false")
    return index


# ---------------------------------------------------------------------------- engines
def build_engines(plan, where):
    """(student engine, teacher or None: distillery/placement.py). Each model is built under its own ZeRO-3 context;
    `where` is the checkpoint the student will load (a universal one needs a flag at construction)."""
    cfg = plan.cfg
    ds_student = checkpoint.ds_config_for_resume(student_ds_config(plan.ds_base, cfg, plan.world), where)
    teacher = None
    if plan.objective.kd_vocab is not None and plan.cache is None:
        teacher = build_teacher(cfg, plan.ds_base)  # in cfg.teacher_placement, decided by resolve()
    lm = build_student(cfg, plan.index["vocab_size"], cfg.seq_len, ds_student)
    student = init_student(lm, cfg, ds_student, plan.total_steps)
    return student, teacher


# ---------------------------------------------------------------------------- run
@dataclasses.dataclass
class Run:
    """A started run: the plan, its engines, this rank's data and the callbacks' context."""
    plan: Plan
    engine: object             # the student's DeepSpeed engine
    teacher: object            # the teacher's inference engine, or None
    reader: RankReader         # this rank's rows of every step, in the run's global order
    streams: dict              # eval set name -> 1-D tokens (windowed PPL, eval/ppl.py)
    ctx: Context               # handed to every callback hook
    preemption: Preemption     # SIGTERM / SIGUSR1 -> stop where safe, resumable, exit 75 (distillery/preempt.py)
    ledger: ComputeLedger      # FLOPs so far: student training, teacher forward (distillery/flops.py)
    guard: Guard               # skipped-update streaks, the last checkpoint verified good (saved in checkpoints)

    def rows(self, step):
        """This rank's rows of optimizer step `step`: ([grad_accum, micro_batch, S] tokens, their row indices per
        micro-batch) (sampler.rank_slice)."""
        cfg = self.plan.cfg
        idx = self.reader.step_indices(step * cfg.global_batch_size, cfg.global_batch_size, cfg.micro_batch_size,
                                       self.plan.grad_accum)
        return torch.stack([torch.from_numpy(self.reader.rows.take(i)) for i in idx]), idx

    def cached_targets(self, idx):
        """The cached teacher targets of rows `idx` as loss keywords (teacher_cache=; distillery/sparse_kd.py)."""
        cfg, dev = self.plan.cfg, self.engine.device
        ids, vals, rest = self.plan.cache.take(idx, k=cfg.teacher_cache_k or None)   # [mb, S, K] x 2, [mb, S]
        return dict(cache_ids=torch.as_tensor(ids).to(dev), cache_vals=torch.as_tensor(vals).to(dev),
                    cache_rest=None if rest is None else torch.as_tensor(rest).to(dev),
                    method=self.plan.cache.method, sparse_mode=cfg.teacher_cache_mode)


def check_data_files(cfg):
    """Every rank, before the first step (collective): shard checksums (verify_data) and token ids in range, for the
    training rows and the eval sets, so corrupt data stops the run here, not mid-run after a checkpoint."""
    if cfg.verify_data:
        shards.verify_split(cfg.data, "train")
    else:
        shards.check_token_ids(cfg.data, "train")
    shards.check_token_ids(cfg.eval_data or cfg.data)


def start(plan, rank, world, preemption):
    """Engines, data, resume, callbacks: the Run of this process."""
    cfg = plan.cfg
    where = checkpoint.find_resume(cfg)  # verified, with fallback to the newest intact checkpoint
    engine, teacher = build_engines(plan, where)
    t_conf = teacher.module.lm.config if teacher else plan.cache.teacher_config if plan.cache else None
    ledger = ComputeLedger(engine.module.lm.config, cfg.seq_len, t_conf, cached=plan.cache is not None,
                           teacher_pretrain_flops=(export_pretrain_flops(cfg.teacher) or 0) if t_conf else 0)
    start_step, client = 0, {}
    if where is not None:
        client = checkpoint.load(engine, cfg, where)
        start_step = client["step"]
        plan.callbacks.load_state_dict(client.get("callbacks", {}))
        plan.objective.load_state_dict(client.get("objective", {}))
        if "compute" in client:
            ledger.load_state_dict(client["compute"])
        resume.apply_lr(engine, cfg, plan.total_steps)  # this config's lr schedule, not the checkpoint's
    writer = NullWriter()
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(cfg.run_dir)
    end_step = min(plan.total_steps, start_step + cfg.max_steps) if cfg.max_steps else plan.total_steps
    ctx = Context(cfg=cfg, engine=engine, teacher=teacher, run_dir=cfg.run_dir, writer=writer, rank=rank,
                  world=world, start_step=start_step, end_step=end_step, total_steps=plan.total_steps,
                  step=start_step)
    plan.callbacks.bind(ctx, metrics_path=runlog.metrics_path(cfg.run_dir))
    reader = RankReader(cfg.data, cfg.seed, rank=rank, world=world)
    streams = {s: load_stream(cfg.eval_data or cfg.data, s) for s in cfg.eval_sets}
    return Run(plan, engine, teacher, reader, streams, ctx, preemption, ledger,
               Guard(cfg, engine, start_step, client.get("guard"), where))


# ---------------------------------------------------------------------------- loop
def evaluate(run):
    """Windowed held-out loss of the live engine on every eval set (eval/ppl.py; collective, all ranks)."""
    cfg = run.plan.cfg
    res = ppl.evaluate_engine(run.engine, run.streams, cfg.eval_window, cfg.eval_max_windows, cfg.eval_batch_size,
                              **ppl.engine_call_kw(cfg))
    out = {}
    for name, r in res.items():
        out[f"eval/{name}/loss"], out[f"eval/{name}/ppl"] = r["ce"], r["ppl"]
    return out


def train(run):
    """Optimizer steps ctx.start_step .. ctx.end_step; returns the last finished step."""
    plan, ctx, cbs = run.plan, run.ctx, run.plan.callbacks
    cfg, obj, engine, dev = plan.cfg, plan.objective, run.engine, run.engine.device
    want_diag = run.teacher is not None and (cbs.wants_diagnostics or obj.wants_diagnostics)
    stats = StepStats(dev, want_diag)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    loss_kw = obj.loss_kw()
    guard = run.guard
    run.preemption.defer()  # from here a signal is honoured at the next step boundary
    t_log = time.perf_counter()  # start of the log interval
    cbs("on_train_start", ctx)
    for step in range(ctx.start_step, ctx.end_step):
        alpha, w_ce, w_kd = obj.weights(step)
        lr = engine.get_lr()[0]
        batch, rows_idx = run.rows(step)                                             # [GA, mb, S]
        targets = torch.stack([shift_targets(b) for b in batch])                     # [GA, mb, S]
        positions = ([doc_positions(b, plan.index["eos_id"]) for b in batch] if cfg.doc_mask  # [mb, S] each
                     else [None] * plan.grad_accum)
        # One all-reduce gives the global target count and whether any rank was asked to stop (preemption).
        counts = torch.tensor([float((targets != IGNORE_INDEX).sum()), run.preemption.requested()],
                              dtype=torch.float64, device=dev)
        dist.all_reduce(counts)
        # (One host sync per step for the count; ZeRO's step syncs for the grad norm anyway.)
        n_global, stop = counts.tolist()
        if stop > 0:
            preempt(run, step)
        # DeepSpeed averages gradients over ranks and micro-batches; the loss handed to it is a sum over this
        # micro-batch's tokens scaled by world * GA / N_global, so the update is the gradient of the global token
        # mean: no double normalisation, no mean-of-means (trap 3).
        inv_n = 1.0 / n_global
        scale = ctx.world * plan.grad_accum * inv_n
        done = step + 1
        is_log = done % cfg.log_interval == 0 or done == ctx.end_step
        is_save = (cfg.save_interval and done % cfg.save_interval == 0) or done == ctx.end_step
        is_eval = cfg.eval_interval >= 0 and (
            (cfg.eval_interval and done % cfg.eval_interval == 0) or done == plan.total_steps)
        # Teacher share of step time is measured on reported steps only: it needs device syncs around the teacher
        # forward, which would cost overlap on every step.
        timed = is_log or is_save
        step_timer, teacher_timer = Timer(dev, timed), Timer(dev, timed)
        with step_timer():
            for m in range(plan.grad_accum):
                x, y = batch[m].to(dev, non_blocking=True), targets[m].to(dev, non_blocking=True)
                pos = positions[m].to(dev, non_blocking=True) if positions[m] is not None else None
                kw = loss_kw if plan.cache is None else dict(loss_kw, **run.cached_targets(rows_idx[m]))
                parts = micro_step(engine, run.teacher, x, y, kw, w_ce * scale, w_kd * scale, want_diag,
                                   teacher_timer, pos)
                stats.add(parts, inv_n, w_ce, w_kd)
                obj.observe(parts)
        stats.end_step(n_global)
        obj.end_step(done)  # an alpha controller's update (collective); alpha of the next step
        run.ledger.add_step(tokens_per_step)
        guard.after_step(done, engine, stats)
        metrics = diag = None
        if timed:  # a checkpoint is never written without checking the loss first
            steps = stats.steps
            s = stats.summary()
            guard.check_interval(s, done - steps + 1, done)
            dt, t_log = time.perf_counter() - t_log, time.perf_counter()
            metrics = {"loss/total": s.total, "loss/ce": s.ce, "loss/kd": s.kd, "alpha": alpha, "lr": lr,
                       "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "tokens/seen": done * tokens_per_step, "perf/tokens_per_s": steps * tokens_per_step / dt,
                       "perf/step_s": dt / steps, **guard.metrics(), **run.ledger.metrics(), **obj.metrics()}
            if run.teacher is not None:
                metrics["perf/teacher_share"] = teacher_timer.seconds / step_timer.seconds
            diag = s.diag
        ctx.step = done
        cbs("on_step_end", ctx, step=done, metrics=metrics, diag=diag)
        if metrics is not None:
            ctx.log(done, metrics)
        if is_eval and run.streams:
            results = evaluate(run)
            cbs("on_eval", ctx, step=done, results=results)
            ctx.log(done, results)
        if done == ctx.end_step:
            guard.at_end()  # a run that mostly skipped its updates fails here, before its last checkpoint
        if is_save and (guard.streak == 0 or done == ctx.end_step):  # no checkpoint in a run of skipped steps
            guard.saved(done, save(run, done))
    return ctx.end_step


def save(run, step):
    """A checkpoint of `step` (every rank): engine state, the run's config, the callbacks' state."""
    path = checkpoint.save(run.engine, run.plan.cfg, step, {"step": step, "config": to_dict(run.plan.cfg),
                                                            "callbacks": run.plan.callbacks.state_dict(),
                                                            "objective": run.plan.objective.state_dict(),
                                                            "compute": run.ledger.to_dict(),
                                                            "guard": run.guard.state_dict()})
    run.plan.callbacks("on_checkpoint", run.ctx, step=step, path=path)
    return path


def preempt(run, step):
    """Every rank at the boundary before step `step`: save the finished steps if rank 0 says so, and stop."""
    d, g = checkpoint.ckpt_dir(run.plan.cfg), run.guard
    latest = checkpoint.read_latest(d) if run.ctx.rank == 0 else None
    need, why = from_rank0(save_decision(step, run.ctx.start_step, latest, g.streak, g.first_bad))
    what = why or f"checkpoint {save(run, step) if need else os.path.join(d, checkpoint.tag_for(step))}"
    raise Preempted(f"stopped by {run.preemption.reason()} after step {step}; {what}; rerun the same command with "
                    f"resume=auto to continue")


# ---------------------------------------------------------------------------- save
def finish(run, last_step):
    """Export the student when the schedule is complete; end-of-run callbacks; their numbers to every writer. The
    checkpoint of last_step is committed, so a stop here (SIGTERM: before or after the export, at once during the
    evaluation; preempt.py) exits 75 and resume=auto finishes the job."""
    cfg, ctx, pre, dev = run.plan.cfg, run.ctx, run.preemption, run.engine.device
    export_dir = None
    rest = (f"; checkpoint {os.path.join(checkpoint.ckpt_dir(cfg), checkpoint.tag_for(last_step))}; rerun the same "
            f"command with resume=auto to finish")
    pre.stop_if_requested(dev, f"after step {last_step}, before the export and evaluation{rest}")  # came late
    if cfg.export and last_step == run.plan.total_steps:
        export_dir = os.path.join(cfg.run_dir, "export")
        export_hf(run.engine.module.lm, export_dir, cfg.data, cfg.export_dtype,
                  extra_files={"distillery_config.yaml": os.path.join(cfg.run_dir, "config.yaml")}, rank=ctx.rank)
        if ctx.rank == 0:  # what it cost to make this model: a later student's ledger amortises it
            write_export_compute(export_dir, run.ledger)
        dist.barrier()
    pre.stop_if_requested(dev, f"after step {last_step} and its export, before the end-of-run evaluation{rest}")
    pre.at_once(f"during the end-of-run evaluation of step {last_step}{' (export written)' if export_dir else ''}"
                f"{rest}")
    final = {}
    run.plan.callbacks("on_train_end", ctx, step=last_step, export_dir=export_dir, metrics=final)
    pre.defer()  # done: a signal from here on changes nothing (exit 0)
    if final:
        ctx.log(last_step, final)
    if ctx.rank == 0 and last_step == run.plan.total_steps:  # last: reports and sweeps read only finished runs
        runlog.mark_finished(cfg.run_dir, last_step, run.plan.total_steps, export_dir)


def main(argv=None):
    args = parse_args(argv)
    if args.list_plugins:
        print(plugins.describe())
        return None
    plan = resolve(args)
    cfg = plan.cfg
    rank, world = init_distributed()
    # a signal stops start-up at once (lock released); the steps at a boundary (distillery/preempt.py)
    with Preemption() as preemption, RunLock(cfg.run_dir) if rank == 0 else contextlib.nullcontext():
        changes = resume.check(cfg)   # a rerun / resume that would mix two experiments stops here, nothing written
        check_data_files(cfg)
        run = start(plan, rank, world, preemption)
        if rank == 0:  # only once the checkpoint (if any) is loaded: a refused resume leaves config.yaml as it was
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"), header=plan.placement)
            resume.record(cfg, changes, run.ctx.start_step)
            provenance.record_start(cfg.run_dir, run.ctx.start_step, world)
        try:
            finish(run, train(run))
        except BaseException as e:  # the callbacks hear of it (flush, close), then it propagates unchanged
            plan.callbacks.error(run.ctx, run.ctx.step, e)
            raise
        finally:
            run.ctx.writer.close()
    return cfg.run_dir


if __name__ == "__main__":
    cli(main)
    shutdown()  # only after success: on an error the other ranks may never reach the barrier
