"""Where the frozen teacher lives: replicated on every rank, partitioned by ZeRO-3, or ZeRO-3 with its parameters in
CPU memory (`teacher_placement=`); `auto` picks one from the model sizes and the memory per rank before any model is
built, with the accounting of distillery/zero_cost.py (docs/scaling.md: the same numbers as scripts/scaling.py).

    replicated   every rank holds the whole teacher in the run's dtype (bf16 on GPU configs), as a plain module: no
                 ZeRO hooks on its forward, no collective, the fused head reads its output weight as it is. Loaded
                 from safetensors into that dtype on the rank's device, tensor by tensor from the mapped file: no
                 fp32 copy of the model exists (bench/teacher_placement.py: a 34M-parameter fp32 file loads as bf16
                 adding 79 MiB of RSS, against 64 MiB of bf16 weights and 128 MiB for an fp32 copy). Costs
                 P_t x dtype bytes per rank.
    partitioned  a ZeRO-3 inference engine (distillery.engines.init_teacher): 1/n of the parameters per rank, and an
                 all-gather of every partitioned parameter per micro-step (2 P_t (n - 1) / n bytes in bf16).
    offload      the same with offload_param to CPU memory: nothing resident on the GPU, and the gathered layers
                 cross PCIe every micro-step. The last resort.
"""
import dataclasses
import os

import torch

from distillery import zero_cost
from distillery.config import PLACEMENTS
from distillery.engines import TeacherHidden, init_teacher, teacher_ds_config
from distillery.models import load_pretrained, zero3_context

GiB = 2 ** 30
HEADROOM = 0.10  # of the device memory, kept free: allocator fragmentation, CUDA context, kernels' workspaces


@dataclasses.dataclass
class Decision:
    placement: str        # replicated | partitioned | offload
    line: str             # the run's log line and config.yaml comment: the placement and why
    numbers: dict         # the estimate behind it (bytes), for tests and benches


def run_dtype_bytes(ds_base):
    """Bytes per teacher parameter: 2 when the DeepSpeed config runs bf16, else 4 (fp32)."""
    return 2 if (ds_base.get("bf16") or ds_base.get("bfloat16") or {}).get("enabled") else 4


def device_memory(cfg):
    """(bytes per rank, what they are): device_memory_gib when set; the GPU's total memory; on CPU the machine's
    physical memory shared by the ranks on this machine."""
    if cfg.device_memory_gib:
        return cfg.device_memory_gib * GiB, f"device_memory_gib={cfg.device_memory_gib:g}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)))
        return props.total_memory, props.name
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return phys / local, f"CPU memory / {local} rank(s)"


def decide(cfg, ds_base, world, teacher_config, student_config=None, rows=None, memory=None):
    """The teacher's placement for this run, and the line that says why: cfg.teacher_placement when set, else
    (auto) replicated if the whole teacher fits next to the student within the memory per rank less HEADROOM, else
    partitioned if its share does, else offload (zero_cost.py: the student's states, gathered parameters and
    activations; the teacher's parameters, working set and forward activations).

    Configs: transformers configs, config.json dicts or model directories (distillery.flops.architecture); no
    student for the teacher cache builder (rows: its batch, default cfg.micro_batch_size). memory: (bytes, label)
    instead of device_memory(cfg)."""
    b = run_dtype_bytes(ds_base)
    mem, mem_label = memory or device_memory(cfg)
    unit = "GPU" if torch.cuda.is_available() else "rank"
    p_t = sum(zero_cost.tensor_numels(teacher_config).values())
    teacher = {p: zero_cost.teacher_resident_bytes(p, teacher_config, world, b) for p in PLACEMENTS[1:]}
    t_work = zero_cost.teacher_forward_bytes(teacher_config, rows or cfg.micro_batch_size, cfg.seq_len, b)
    gather = zero_cost.teacher_gather_bytes(teacher_config, world, b)
    work = zero_cost.teacher_working_bytes(teacher_config, world, b)
    student = 0 if student_config is None else zero_cost.student_bytes(student_config, ds_base, world, cfg, b)
    free = mem * (1 - HEADROOM) - student - t_work
    fits = {p: teacher[p] <= free for p in teacher}
    best = next((p for p in ("replicated", "partitioned") if fits[p]), "offload")
    placement = best if cfg.teacher_placement == "auto" else cfg.teacher_placement
    budget = (f"{gib(free)} free of {gib(mem)} ({mem_label})"
              + (f" next to the student's {gib(student)}" if student_config is not None else ""))
    if placement == "replicated":
        saves = (f"saves {gather / 1e9:.2g} GB of all-gather per micro-step" if world > 1 else
                 "no ZeRO hooks on its forward (one rank: nothing to gather either way)")
        why = f"{gib(teacher['replicated'])} per {unit}, {saves}; {budget}"
    elif placement == "partitioned":
        why = (f"{gib(teacher['partitioned'] - work)} per {unit} ({p_t / 1e9:.3g}B parameters over {world}) + "
               f"{gib(work)} gathered while it runs, all-gathers {gather / 1e9:.2g} GB per micro-step; replicated "
               f"needs {gib(teacher['replicated'])}, {budget}")
    else:
        why = (f"parameters in CPU memory, {zero_cost.offload_h2d_bytes(teacher_config, b) / 1e9:.2g} GB "
               f"host-to-device per micro-step; partitioned needs {gib(teacher['partitioned'])}, {budget}")
    line = f"teacher {placement} ({'auto' if cfg.teacher_placement == 'auto' else 'set'}): {why}"
    if placement != best and not fits.get(placement, True):
        line += f" (estimate: it does not fit; auto would pick {best})"
    return Decision(placement, line, dict(memory=mem, free=free, student=student, teacher_work=t_work,
                                          gather=gather, **{f"teacher_{k}": v for k, v in teacher.items()}))


def gib(x):
    return f"{x / GiB:.3g} GiB"


class ReplicatedTeacher:
    """The whole teacher on this rank's device as a plain module (no DeepSpeed engine, no hooks): the surface
    micro_step and the cache builder use, like an inference engine's: call, .module (TeacherHidden), .device."""

    def __init__(self, lm, device):
        self.device = torch.device(device)
        self.module = TeacherHidden(lm).to(self.device)
        if self.device.type == "cpu":
            # transformers leaves tensors whose dtype matches the file as views of the mmapped safetensors file; a
            # copy (one tensor at a time) makes the teacher this process's own: a file rewritten in place during the
            # run cannot change it, and its memory shows in RSS like the other placements'.
            for p in self.module.parameters():
                p.data = p.data.clone()

    def __call__(self, input_ids, position_ids=None):
        return self.module(input_ids, position_ids=position_ids)                  # [B, S, Ht]


def build_teacher(cfg, ds_base):
    """The teacher of cfg.teacher in cfg.teacher_placement (resolved by decide()): a ReplicatedTeacher, or a ZeRO-3
    inference engine (partitioned, offload). Collective for the ZeRO-3 ones."""
    placement = cfg.teacher_placement
    if placement not in PLACEMENTS[1:]:
        raise ValueError(f"build_teacher needs a decided placement, not {placement!r} (distillery.placement.decide)")
    dtype = torch.bfloat16 if run_dtype_bytes(ds_base) == 2 else torch.float32
    if placement == "replicated":  # no HfDeepSpeedConfig alive: a plain load in `dtype`, straight to this device
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return ReplicatedTeacher(load_pretrained(cfg.teacher, cfg, dtype=dtype, device=dev), dev)
    ds_teacher = teacher_ds_config(ds_base, cfg)
    with zero3_context(ds_teacher):
        lm = load_pretrained(cfg.teacher, cfg, dtype=dtype)
    return init_teacher(lm, ds_teacher)
