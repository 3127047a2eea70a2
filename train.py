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
a ZeRO engine; the frozen teacher is a ZeRO-3 inference engine in the same process; alpha = 0 loads no teacher.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # say so up front instead of DeepSpeed's accelerator-probe warning
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed
import torch.distributed as dist

import plugins
from distillery import checkpoint
from distillery.config import Config, ConfigError, load_config, save_config, to_dict
from distillery.engines import (batch_layout, init_student, init_teacher, load_ds_config, student_ds_config,
                                teacher_ds_config)
from distillery.launch import init_distributed
from distillery.loss import DIAG_KEYS, IGNORE_INDEX
from distillery.models import build_student, check_model_dir, export_hf, load_pretrained, zero3_context
from distillery.sampler import GlobalOrder
from distillery.shards import DataError, TokenRows, load_stream, read_index
from eval.ppl import windowed_ce


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- config
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Distillery trainer", epilog="overrides: key=value (distillery/config.py)")
    ap.add_argument("--ds_config", default="ds_configs/cpu.json", help="DeepSpeed engine settings (JSON)")
    ap.add_argument("--config", default=None, help="a preset from configs/ (YAML)")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("--list-plugins", action="store_true", help="print the registered plugins and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap.parse_args(argv)


def resolve(args):
    """Everything that can be wrong with the inputs is found here, before a process group, a model or a file exists."""
    cfg = load_config(args.config, args.overrides)
    ds_base = load_ds_config(args.ds_config)
    index = check_data(cfg)
    total_steps = cfg.train_tokens // (cfg.global_batch_size * cfg.seq_len)
    if total_steps < 1:
        raise ConfigError(f"train_tokens={cfg.train_tokens} is less than one global batch "
                          f"({cfg.global_batch_size} x {cfg.seq_len} tokens)")
    if cfg.student_init:
        check_model_dir(cfg.student_init, index, who="student_init")
    world = int(os.environ.get("WORLD_SIZE", 1))
    batch_layout(cfg, world)
    loss = dict(divergence=plugins.get("divergence", cfg.divergence), mix=plugins.get("mix", cfg.mix),
                schedule=plugins.get("alpha_schedule", cfg.alpha_schedule),
                callbacks=[plugins.get("callback", name) for name in cfg.callbacks])
    kd_vocab = None
    if needs_teacher(cfg, loss, total_steps):
        if not cfg.teacher:
            raise ConfigError(f"alpha={cfg.alpha} (mix {cfg.mix}) needs a teacher: set teacher=<hf dir>, or "
                              f"alpha=0 for the baseline")
        kd_vocab = check_model_dir(cfg.teacher, index, who="teacher")
    elif cfg.teacher and cfg.teacher != Config.teacher and os.environ.get("RANK", "0") == "0":
        print(f"note: KD weight is 0 at every step, so teacher={cfg.teacher} is not loaded")
    return cfg, ds_base, index, total_steps, loss, kd_vocab


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
    return index


def alpha_at(cfg, schedule, step, total_steps):
    return schedule(step=step, total_steps=total_steps, alpha=cfg.alpha, start=cfg.alpha_start, end=cfg.alpha_end,
                    warmup_frac=cfg.alpha_warmup_frac, decay_frac=cfg.alpha_decay_frac)


def needs_teacher(cfg, loss, total_steps):
    """The teacher is loaded only if some step gives KD a non-zero weight (alpha = 0 runs never touch it)."""
    return any(loss["mix"](alpha=alpha_at(cfg, loss["schedule"], s, total_steps))[1] > 0 for s in range(total_steps))


# ---------------------------------------------------------------------------- engines
def build_engines(cfg, ds_base, index, total_steps, world, kd_vocab):
    ds_student = student_ds_config(ds_base, cfg, world)
    teacher = None
    if kd_vocab is not None:
        ds_teacher = teacher_ds_config(ds_base, cfg)
        dtype = torch.bfloat16 if ds_teacher.get("bf16") else torch.float32
        with zero3_context(ds_teacher):
            t_lm = load_pretrained(cfg.teacher, cfg, dtype=dtype)
        teacher = init_teacher(t_lm, ds_teacher)
    lm = build_student(cfg, index["vocab_size"], cfg.seq_len, ds_student)
    student = init_student(lm, cfg, ds_student, total_steps)
    return student, teacher


# ---------------------------------------------------------------------------- data
def shift_targets(x):
    """[b, S] rows -> next-token targets [b, S]; the last position has no target."""
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, :-1] = x[:, 1:]
    return y


def step_batch(rows, order, step, cfg, rank, world, grad_accum):
    """This rank's rows of optimizer step `step`: [grad_accum, micro_batch, S]. Global sample k of the run is
    order.index(k); step s covers samples [s * G, (s + 1) * G), rank r the r-th contiguous slice of them, so any
    world size sees the same global batch and resuming needs only the step number."""
    per_rank = cfg.global_batch_size // world
    idx = order.indices(step * cfg.global_batch_size + rank * per_rank, per_rank)
    return torch.from_numpy(rows.take(idx)).view(grad_accum, cfg.micro_batch_size, -1)


# ---------------------------------------------------------------------------- plugins
def call(callbacks, hook, **kw):
    """Hooks run on every rank in config order with keyword arguments; a callback without the hook is skipped."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(**kw)


# ---------------------------------------------------------------------------- loop
def evaluate(engine, cfg, streams, rank, world):
    def loss_fn(x):
        x = x.to(engine.device)
        parts = engine(input_ids=x, targets=shift_targets(x), impl=cfg.loss_impl, w_ce=1.0, w_kd=0.0,
                       chunk_size=cfg.loss_chunk_size)
        return parts["ce_sum"], parts["n_tokens"]
    out = {}
    for name, tokens in streams.items():
        ce = windowed_ce(loss_fn, tokens, cfg.eval_window, cfg.eval_max_windows, cfg.eval_batch_size, rank, world,
                         device=engine.device)
        out[f"eval/{name}/loss"], out[f"eval/{name}/ppl"] = ce, math.exp(min(ce, 50.0))
    return out


def train(cfg, engine, teacher, rows, streams, loss, kd_vocab, total_steps, start_step, callbacks, writer,
          rank, world, grad_accum):
    order = GlobalOrder(len(rows), cfg.seed)
    end_step = min(total_steps, start_step + cfg.max_steps) if cfg.max_steps else total_steps
    want_diag = teacher is not None and any(getattr(cb, "wants_diagnostics", False) for cb in callbacks)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    dev = engine.device
    acc = torch.zeros(4 + len(DIAG_KEYS), dtype=torch.float64, device=dev)  # total, ce, kd, not-finite, diag...
    n_acc, steps_acc, t_log = 0.0, 0, time.perf_counter()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ctx = dict(cfg=cfg, engine=engine, teacher=teacher, run_dir=cfg.run_dir, writer=writer, rank=rank, world=world,
               total_steps=total_steps)
    call(callbacks, "on_train_start", start_step=start_step, **ctx)
    for step in range(start_step, end_step):
        alpha = alpha_at(cfg, loss["schedule"], step, total_steps)
        w_ce, w_kd = loss["mix"](alpha=alpha)
        lr = engine.get_lr()[0]
        batch = step_batch(rows, order, step, cfg, rank, world, grad_accum)         # [GA, mb, S]
        targets = torch.stack([shift_targets(b) for b in batch])                     # [GA, mb, S]
        n_global = (targets != IGNORE_INDEX).sum().to(dev, torch.float64)
        dist.all_reduce(n_global)
        # DeepSpeed averages gradients over ranks and micro-batches; the loss handed to it is a sum over this
        # micro-batch's tokens scaled by world * GA / N_global, so the update is the gradient of the global token
        # mean: no double normalisation, no mean-of-means (trap 3).
        # (One host sync per step for the count; ZeRO's step syncs for the grad norm anyway.)
        inv_n = 1.0 / n_global.item()
        scale = world * grad_accum * inv_n
        done = step + 1
        is_log = done % cfg.log_interval == 0 or done == end_step
        is_save = (cfg.save_interval and done % cfg.save_interval == 0) or done == end_step
        is_eval = cfg.eval_interval >= 0 and (
            (cfg.eval_interval and done % cfg.eval_interval == 0) or done == total_steps)
        # Teacher share of step time is measured on reported steps only: it needs device syncs around the teacher
        # forward, which would cost overlap on every step.
        timed = is_log or is_save
        if timed:
            sync()
            t_step, teacher_s = time.perf_counter(), 0.0
        for m in range(grad_accum):
            x, y = batch[m].to(dev, non_blocking=True), targets[m].to(dev, non_blocking=True)
            t_hidden, gather = None, contextlib.nullcontext()
            if teacher is not None:
                if timed:
                    sync()
                    t0 = time.perf_counter()
                with torch.no_grad():
                    t_hidden = teacher(x)                                            # [mb, S, Ht]
                if timed:
                    sync()
                    teacher_s += time.perf_counter() - t0
                gather = deepspeed.zero.GatheredParameters([teacher.module.head_weight], modifier_rank=None)
            with gather:
                parts = engine(input_ids=x, targets=y, teacher_hidden=t_hidden,
                               teacher_weight=teacher.module.head_weight if teacher is not None else None,
                               impl=cfg.loss_impl, kd_vocab=kd_vocab, divergence=loss["divergence"],
                               divergence_args=cfg.divergence_args, temperature=cfg.temperature,
                               w_ce=w_ce * scale, w_kd=w_kd * scale, want_diag=want_diag,
                               chunk_size=cfg.loss_chunk_size)
            engine.backward(parts["loss"])
            engine.step()
            ce, kd = parts["ce_sum"].double() * inv_n, parts["kd_sum"].double() * inv_n   # this micro-batch's share
            acc[:4] += torch.stack([w_ce * ce + w_kd * kd, ce, kd, (~torch.isfinite(parts["loss"])).double()])
            for i, k in enumerate(DIAG_KEYS):
                if k in parts["diag"]:
                    acc[4 + i] += parts["diag"][k].double()
        if timed:
            sync()
            step_s = time.perf_counter() - t_step
        steps_acc += 1
        n_acc += n_global.item()
        metrics = diag = None
        if is_log or is_save:  # a checkpoint is never written without checking the loss first
            dist.all_reduce(acc)
            a = acc.tolist()
            if a[3] > 0:
                raise TrainingError(f"loss is not finite between steps {done - steps_acc + 1} and {done}; resume "
                                    f"from the last checkpoint (resume=auto) with a lower lr, or check the data")
            dt = time.perf_counter() - t_log
            metrics = {"loss/total": a[0] / steps_acc, "loss/ce": a[1] / steps_acc, "loss/kd": a[2] / steps_acc,
                       "alpha": alpha, "lr": lr, "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "tokens/seen": done * tokens_per_step, "perf/tokens_per_s": steps_acc * tokens_per_step / dt,
                       "perf/step_s": dt / steps_acc}
            if teacher is not None:
                metrics["perf/teacher_share"] = teacher_s / step_s
            diag = {k: a[4 + i] / n_acc for i, k in enumerate(DIAG_KEYS)} if want_diag else {}
        call(callbacks, "on_step_end", step=done, metrics=metrics, diag=diag, **ctx)
        if metrics is not None:
            log_jsonl(cfg, rank, dict(step=done, **metrics))
            acc.zero_()
            n_acc, steps_acc, t_log = 0.0, 0, time.perf_counter()
        if is_eval and streams:
            results = evaluate(engine, cfg, streams, rank, world)
            call(callbacks, "on_eval", step=done, results=results, **ctx)
            log_jsonl(cfg, rank, dict(step=done, **results))
        if is_save:
            path = checkpoint.save(engine, cfg, done, {"step": done, "config": to_dict(cfg)})
            call(callbacks, "on_checkpoint", step=done, path=path, **ctx)
    return end_step


def log_jsonl(cfg, rank, record):
    if rank == 0:
        with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------- save
def finish(cfg, engine, last_step, total_steps, callbacks, writer, rank, world):
    export_dir = None
    if cfg.export and last_step == total_steps:
        export_dir = os.path.join(cfg.run_dir, "export")
        export_hf(engine.module.lm, export_dir, cfg.data, cfg.export_dtype,
                  extra_files={"distillery_config.yaml": os.path.join(cfg.run_dir, "config.yaml")}, rank=rank)
        dist.barrier()
    call(callbacks, "on_train_end", step=last_step, export_dir=export_dir, cfg=cfg, engine=engine,
         run_dir=cfg.run_dir, writer=writer, rank=rank, world=world, total_steps=total_steps)
    if writer is not None:
        writer.close()


def main(argv=None):
    args = parse_args(argv)
    if args.list_plugins:
        print(plugins.describe())
        return None
    cfg, ds_base, index, total_steps, loss, kd_vocab = resolve(args)
    rank, world = init_distributed()
    _, grad_accum = batch_layout(cfg, world)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    rows = TokenRows(cfg.data, "train")
    streams = {s: load_stream(cfg.eval_data or cfg.data, s) for s in cfg.eval_sets}
    engine, teacher = build_engines(cfg, ds_base, index, total_steps, world, kd_vocab)
    start_step = 0
    where = checkpoint.find_resume(cfg)
    if where is not None:
        start_step = checkpoint.load(engine, cfg, where)["step"]
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(cfg.run_dir)
    callbacks = [cls() for cls in loss["callbacks"]]
    last = train(cfg, engine, teacher, rows, streams, loss, kd_vocab, total_steps, start_step, callbacks, writer,
                 rank, world, grad_accum)
    finish(cfg, engine, last, total_steps, callbacks, writer, rank, world)
    return cfg.run_dir


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, plugins.PluginError, TrainingError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
