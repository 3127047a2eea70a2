"""What ZeRO-3 moves and holds per rank, from a model's parameter shapes: the one accounting behind scripts/scaling.py
(docs/scaling.md's tables), the teacher placement decision (distillery/placement.py) and the predictions that
bench/teacher_placement.py prints beside its measurements.

Configs: a transformers config, a config.json dict or a model directory (distillery.flops.architecture).
Bytes moved are what one rank sends (= receives) for a ring collective over n ranks: an all-gather or reduce-scatter
of a tensor of B bytes moves B (n - 1) / n (distillery/commcount.py counts the same way).

ZeRO-3 facts the counts follow (DeepSpeed 0.19, runtime/zero/partition_parameters.py):
  * a parameter of at most `stage3_param_persistence_threshold` elements (1e5 by default; the teacher's inference
    config keeps the default) is never partitioned: every rank holds it whole, nothing is gathered for it;
  * any other is cut into n equal partitions of ceil(numel / n) elements (the last one padded), so a gather moves
    the padded size;
  * parameters are gathered in the run's dtype (bf16 on GPU configs, fp32 on CPU).
"""
import math

from distillery.flops import architecture, param_counts

GiB = 2 ** 30
# DeepSpeed's defaults (runtime/zero/config.py): stage3_param_persistence_threshold, stage3_prefetch_bucket_size,
# stage3_max_live_parameters
PERSISTENCE_DEFAULT, PREFETCH_DEFAULT, LIVE_DEFAULT = 100_000, 50_000_000, 1_000_000_000


def tensor_numels(config):
    """{name: numel} of every parameter tensor, tied weights once, in the model's named_parameters() layout (for
    the llama / qwen2 / qwen3 / mistral families of distillery.flops); their sum is param_counts()["total"]."""
    a = architecture(config)
    d, q, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    out = {"model.embed_tokens.weight": a.vocab * d}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        layer = {"self_attn.q_proj.weight": d * q, "self_attn.k_proj.weight": d * kv,
                 "self_attn.v_proj.weight": d * kv, "self_attn.o_proj.weight": q * d,
                 "mlp.gate_proj.weight": d * a.ffn, "mlp.up_proj.weight": d * a.ffn, "mlp.down_proj.weight": a.ffn * d,
                 "input_layernorm.weight": d, "post_attention_layernorm.weight": d}
        if a.qkv_bias:
            layer.update({"self_attn.q_proj.bias": q, "self_attn.k_proj.bias": kv, "self_attn.v_proj.bias": kv})
        if a.o_bias:
            layer["self_attn.o_proj.bias"] = d
        if a.mlp_bias:
            layer.update({"mlp.gate_proj.bias": a.ffn, "mlp.up_proj.bias": a.ffn, "mlp.down_proj.bias": d})
        if a.qk_norm:
            layer.update({"self_attn.q_norm.weight": a.head_dim, "self_attn.k_norm.weight": a.head_dim})
        out.update({p + k: v for k, v in layer.items()})
    out["model.norm.weight"] = d
    if not a.tied:
        out["lm_head.weight"] = a.vocab * d
    assert sum(out.values()) == param_counts(config)["total"]
    return out


def padded(numel, world):
    """Elements a ZeRO-3 gather of a `numel` parameter produces over `world` ranks: n partitions of ceil(numel / n)."""
    return math.ceil(numel / world) * world


def persistence_threshold(ds):
    """stage3_param_persistence_threshold of a DeepSpeed config dict, or DeepSpeed's default."""
    return int(ds.get("zero_optimization", {}).get("stage3_param_persistence_threshold", PERSISTENCE_DEFAULT))


def partition_elems(config, world, persistence=PERSISTENCE_DEFAULT):
    """Elements of the model one rank holds under ZeRO-3: persistent parameters whole, the others 1/n (padded)."""
    return sum(v if v <= persistence else math.ceil(v / world) for v in tensor_numels(config).values())


def gathered_elems(config, world, persistence=PERSISTENCE_DEFAULT):
    """Elements one ZeRO-3 gather of every partitioned parameter produces (padded; persistent ones excluded)."""
    return sum(padded(v, world) for v in tensor_numels(config).values() if v > persistence)


# ---------------------------------------------------------------------------- the teacher
def teacher_gather_bytes(config, world, dtype_bytes, persistence=PERSISTENCE_DEFAULT):
    """All-gather bytes per rank per micro-step of a partitioned (ZeRO-3 inference) teacher: its forward gathers
    every partitioned parameter once (nothing recurs in a forward); the fused head gathers the output weight
    (distillery/step.py): untied, that is lm_head, which the forward (model.model) never touches; tied, the
    embedding a second time. Replicated: 0."""
    numels = tensor_numels(config)
    elems = gathered_elems(config, world, persistence)
    head = numels["model.embed_tokens.weight"] if "lm_head.weight" not in numels else 0  # tied: gathered again
    if head > persistence:
        elems += padded(head, world)
    return elems * dtype_bytes * (world - 1) / world


def teacher_resident_bytes(placement, config, world, dtype_bytes, persistence=PERSISTENCE_DEFAULT):
    """Device bytes per rank for the teacher's parameters. replicated: all of them. partitioned: its partition
    (persistent parameters whole) plus teacher_working_bytes. offload: the persistent parameters plus the same
    working set; the partitions live in CPU memory."""
    numels = tensor_numels(config)
    if placement == "replicated":
        return sum(numels.values()) * dtype_bytes
    persistent = sum(v for v in numels.values() if v <= persistence)
    held = partition_elems(config, world, persistence) if placement == "partitioned" else persistent
    return held * dtype_bytes + teacher_working_bytes(config, world, dtype_bytes, persistence)


def teacher_working_bytes(config, world, dtype_bytes, persistence=PERSISTENCE_DEFAULT):
    """Parameters a ZeRO-3 teacher holds gathered during its forward: the largest tensor in use and one prefetch
    bucket (DeepSpeed's default 5e7 elements: the teacher's inference config sets none)."""
    numels = tensor_numels(config)
    return (max(numels.values()) + min(PREFETCH_DEFAULT, gathered_elems(config, world, persistence))) * dtype_bytes


def teacher_forward_bytes(config, rows, seq_len, dtype_bytes):
    """Activations of the teacher's no-grad forward: its last hidden states h_t [rows, S, Ht], kept for the
    student's loss, plus one layer's transient tensors (residual, norm output, q/k/v, attention output, SwiGLU's
    three [.., ffn] tensors): nothing is stored for a backward."""
    a = architecture(config)
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    per_token = a.hidden + (3 * a.hidden + 2 * q + 2 * kv + 3 * a.ffn)
    return rows * seq_len * per_token * dtype_bytes


def offload_h2d_bytes(config, dtype_bytes):
    """Host-to-device bytes per rank per micro-step with offload_param: the gathered layers, each rank its own copy."""
    return param_counts(config)["total"] * dtype_bytes


# ---------------------------------------------------------------------------- the student
def student_comm_bytes(config, world, dtype_bytes, persistence=PERSISTENCE_DEFAULT, grad_bytes=None):
    """Bytes per rank a ZeRO-3 student moves:
      all_gather_min / all_gather_max, per micro-step: the forward gathers every partitioned parameter once; the
        backward gathers again those released in between. Which are released depends on stage3_max_reuse_distance,
        the prefetch bucket and max_live_parameters against the model's size (partitioned_param_coordinator.py),
        so this gives the range: forward only (min: what 2 CPU ranks measured at bench/teacher_placement.py's
        sizes, where everything stays gathered for the backward) to forward + backward (max, docs/scaling.md's 4 P).
      reduce_scatter, per micro-step: every gradient (padded) in grad_bytes, the communication dtype (default the
        parameters'); ZeRO-3 reduces every micro-step, so gradient accumulation does not amortise it.
      persistent_gather, per optimizer step: the persistent parameters, updated in their partitions by the
        optimizer, gathered back after the step."""
    numels = tensor_numels(config)
    frac = (world - 1) / world
    once = gathered_elems(config, world, persistence) * dtype_bytes * frac
    return {"all_gather_min": once, "all_gather_max": 2 * once,
            "reduce_scatter": sum(padded(v, world) for v in numels.values()) * (grad_bytes or dtype_bytes) * frac,
            "persistent_gather": sum(padded(v, world) for v in numels.values() if v <= persistence) * dtype_bytes
            * frac}


def student_state_bytes(params, world, stage, dtype_bytes=2, offload_optimizer=False):
    """Model states per rank with Adam (Rajbhandari et al. 2020, ZeRO, Sec. 3: 2 + 2 + 12 bytes per parameter in
    mixed precision: bf16 weights, bf16 gradients, fp32 master + two moments; in fp32 the master is the weight):
    stage 0 replicates all, 1 partitions the optimizer states, 2 also the gradients, 3 also the weights.
    offload_optimizer moves the optimizer states (and the master) to CPU memory."""
    opt = (12 if dtype_bytes == 2 else 8) * params
    if offload_optimizer:
        opt = 0
    w, g = dtype_bytes * params, dtype_bytes * params
    if stage >= 1:
        opt /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        w /= world
    return w + g + opt


def student_activation_bytes(config, rows, seq_len, dtype_bytes, grad_ckpt=False):
    """Activations the student's backward needs (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", Sec. 4.1, recounted for a pre-norm SwiGLU block without dropout, with an attention kernel
    that stores no S x S scores): per layer and token 4 h + 2 q + 2 kv + 4 ffn elements (norm inputs and outputs,
    q/k/v, attention output, gate, up, their product). grad_ckpt: the layer inputs only, plus one layer recomputed.
    The fused KD head adds about ten fp32 [C, V] chunk buffers (distillery/fused_kd.py), ~2^25 logits each."""
    a = architecture(config)
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    layer = 4 * a.hidden + 2 * q + 2 * kv + 4 * a.ffn
    tokens = rows * seq_len
    stored = tokens * (a.layers * a.hidden + layer if grad_ckpt else a.layers * layer) * dtype_bytes
    head = 10 * min(2 ** 25, tokens * a.vocab) * 4 + 2 * tokens * a.hidden * 4  # chunk buffers; h_s and its grad
    return stored + head


def student_bytes(config, ds_base, world, cfg, dtype_bytes):
    """The student's per-rank footprint in a run: model states (ZeRO stage and optimizer offload of the DeepSpeed
    config), ZeRO-3's gathered parameters (up to stage3_max_live_parameters: at the bench's sizes everything the
    forward gathers stays for the backward, see student_comm_bytes), activations of one micro-batch."""
    zero = ds_base.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    off = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    p = sum(tensor_numels(config).values())
    live = min(p, int(zero.get("stage3_max_live_parameters", LIVE_DEFAULT))) * dtype_bytes if stage >= 3 else 0
    return (student_state_bytes(p, world, stage, dtype_bytes, off) + live
            + student_activation_bytes(config, cfg.micro_batch_size, cfg.seq_len, dtype_bytes, cfg.grad_ckpt))
