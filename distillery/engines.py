"""DeepSpeed engines: the trained ZeRO student and the frozen ZeRO-3 inference teacher, in one process.

ds_configs/*.json hold engine settings only (ZeRO stage, precision, offload, buckets). Batch sizes, clipping,
optimizer and LR schedule come from the Distillery config and are filled in here, so there is one source of truth.
"""
import json
import math
import os

import deepspeed
import torch
import torch.nn as nn

from distillery.config import ConfigError
from distillery.loss import compute_loss
from distillery.packing import hidden_states

OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler")


def check_precision(ds, where):
    """fp16 (and apex AMP) train with a dynamic loss scale that DeepSpeed applies to the loss before backward; the
    fused KD head computes the output layer's gradients in its forward, before that scale, so in fp16 most of them
    underflow or are unscaled wrongly. Refused in one line; bf16 and fp32 need no loss scale."""
    for key in ("fp16", "amp"):
        sec = ds.get(key)
        enabled = sec.get("enabled", False) if isinstance(sec, dict) else sec
        if enabled not in (None, False):
            raise ConfigError(f"{where} enables {key}; fp16 is not supported: the fused KD head computes output-layer "
                              f"gradients in its forward, before the loss scale; use bf16 (ds_configs/zero3.json) "
                              f"or fp32")


def load_ds_config(path):
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path!r} not found; the shipped ones are in ds_configs/")
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON at line {e.lineno}, column {e.colno}: "
                              f"{e.msg}; fix the file") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} holds a {type(ds).__name__}, not a JSON object of DeepSpeed "
                          f"settings; see ds_configs/cpu.json")
    owned = [k for k in OWNED_KEYS if k in ds]
    if owned:
        raise ConfigError(f"{path} sets {', '.join(owned)}; batch sizes, clipping, optimizer and schedule come from "
                          f"the Distillery config (micro_batch_size=, global_batch_size=, grad_clip=, lr=): "
                          f"remove them from the JSON")
    check_precision(ds, path)
    return ds


def batch_layout(cfg, world):
    """(micro_batch, grad_accum) such that micro * accum * world == global_batch_size, or a one-line error."""
    per_rank, rem = divmod(cfg.global_batch_size, world)
    if rem or per_rank % cfg.micro_batch_size:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not micro_batch_size="
                          f"{cfg.micro_batch_size} x grad_accum x world_size={world}; pick a global_batch_size "
                          f"that is a multiple of {cfg.micro_batch_size * world}")
    return cfg.micro_batch_size, per_rank // cfg.micro_batch_size


def student_ds_config(ds, cfg, world):
    check_precision(ds, "the DeepSpeed config")
    mb, ga = batch_layout(cfg, world)
    out = json.loads(json.dumps(ds))
    out.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga,
               train_batch_size=mb * ga * world, gradient_clipping=cfg.grad_clip)
    out.setdefault("steps_per_print", 10 ** 9)  # our progress callback prints; keep DeepSpeed quiet
    return out


def teacher_ds_config(ds, cfg):
    """Inference-only ZeRO-3 for teacher_placement partitioned and offload (replicated builds no engine:
    distillery/placement.py): no optimizer, parameters partitioned across ranks, with offload their partitions in
    CPU memory. Precision follows the student's engine config."""
    check_precision(ds, "the DeepSpeed config")
    zero = {"stage": 3}
    if cfg.teacher_placement == "offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "zero_optimization": zero,
           "steps_per_print": 10 ** 9}
    if (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled"):  # "bfloat16": DeepSpeed's older spelling
        out["bf16"] = {"enabled": True}
    return out


class StudentWithLoss(nn.Module):
    """Root module of the student engine: hidden states -> loss, so ZeRO-3 sees the whole step as one forward.

    The output-layer weight is read directly by the loss (fused or plain), outside lm_head.forward, where ZeRO-3
    would hand us an empty partition (trap 4). Registering it as an external parameter of this module makes ZeRO
    gather it for our forward and backward and route its gradient into the usual reduction."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        w = lm.get_output_embeddings().weight
        if hasattr(w, "ds_id"):
            deepspeed.zero.register_external_parameter(self, w)

    def forward(self, input_ids, targets, teacher_hidden=None, teacher_weight=None, position_ids=None, **loss_kw):
        # position_ids [B, S] restarting per document (distillery/packing.py): attention per document on every
        # kernel and micro-batch size; None is one causal sequence per row.
        hidden = hidden_states(self.lm.model, input_ids, position_ids)           # [B, S, H]
        parts = compute_loss(student_hidden=hidden, student_weight=self.lm.get_output_embeddings().weight,
                             targets=targets, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                             **loss_kw)
        # A plain dict, not the LossParts dataclass: ZeRO-3 finds the output tensors of the root module to hook
        # its backward (re-gathering the external head weight); it cannot see inside unknown types.
        return {f: getattr(parts, f) for f in ("loss", "ce_sum", "kd_sum", "n_tokens", "diag")}


class TeacherHidden(nn.Module):
    """Root module of the teacher engine: last hidden states only; the head is applied chunk-wise by the loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm.eval()
        for p in self.lm.parameters():
            p.requires_grad_(False)

    def forward(self, input_ids, position_ids=None):
        # the student's positions: the teacher sees exactly the context the student sees (peers_and_pitfalls.md)
        return hidden_states(self.lm.model, input_ids, position_ids)              # [B, S, Ht]

    @property
    def head_weight(self):
        return self.lm.get_output_embeddings().weight


def lr_lambda(total_steps, warmup_frac, min_lr_frac):
    """Paper schedule: linear warmup over warmup_frac of the steps, cosine decay to min_lr_frac of peak."""
    warm = max(1, int(round(warmup_frac * total_steps)))

    def f(step):  # step = optimizer steps taken so far; the first update uses f(0)
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def param_groups(model, weight_decay):
    """Weight decay on matrices only (not norms/biases), the usual LLM recipe."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_student(lm, cfg, ds_config, total_steps):
    model = StudentWithLoss(lm)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if offload:  # ZeRO-Offload needs DeepSpeed's CPU Adam (compiled on first use)
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        opt = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    else:
        opt = torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_frac, cfg.min_lr_frac))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine


def init_teacher(lm, ds_config):
    engine, _, _, _ = deepspeed.initialize(model=TeacherHidden(lm), config=ds_config)
    engine.eval()
    return engine
