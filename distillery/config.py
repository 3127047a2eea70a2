"""One typed config for a run: defaults here, presets in configs/*.yaml, then `key=value` overrides.

Unknown keys are an error (with the closest known key); values are parsed as YAML and checked against the field
type, so `alpha=0.4`, `eval_sets=[heldout,ood_english]` and `teacher=runs/t/export` all work from the command line.
The resolved config is written as config.yaml into every run directory and into every checkpoint.
"""
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field

import yaml

from distillery import atomic
from distillery.errors import ConfigError

PLACEMENTS = ("auto", "replicated", "partitioned", "offload")  # teacher_placement (distillery/placement.py)



@dataclass
class Config:
    # --- run
    name: str = "default"              # run directory: {out_dir}/{name}
    out_dir: str = "runs"
    seed: int = 43                     # paper: teachers 42, students and baselines 43
    # --- data (data_prep output; see docs/data.md)
    data: str = "data/offline"
    eval_data: str = ""                # data dir of the eval token sets (data_prep.evalsets); "" = `data`
    eval_sets: list = field(default_factory=list)  # stream splits of eval_data to evaluate; [] = all of them
    # --- models
    student: str = "tiny-student"      # preset name (distillery/models.py) ...
    student_init: str = ""             # ... or start from a Hugging Face directory (continued pretraining)
    teacher: str = "runs/offline-teacher/export"  # HF-format directory (safetensors); unused when KD weight is 0
    teacher_placement: str = "auto"    # auto | replicated (whole teacher on every rank, no gathers) | partitioned
                                       # (ZeRO-3) | offload (ZeRO-3, parameters in CPU memory); auto decides from
                                       # sizes and memory (distillery/placement.py, docs/scaling.md)
    device_memory_gib: float = 0.0     # memory per rank that auto assumes; 0: the GPU's, or on CPU the machine's
                                       # shared by the ranks on it
    teacher_cache: str = ""            # a data_prep.teacher_cache dir: sparse cached targets replace the live teacher
    teacher_cache_mode: str = "renorm"  # top-k caches: renorm | tail | support (docs/teacher_cache.md); sampled: -
    teacher_cache_k: int = 0           # use the first k entries of a top-k cache (0: all it holds)
    trust_remote_code: bool = False    # only for teachers that need custom modelling code
    attn_impl: str = "auto"            # auto: flash_attention_2 when installed on GPU, flex_attention on GPU with
                                       # doc_mask, else sdpa; or any kernel registered with transformers (the start-
                                       # of-run probe checks it keeps documents apart: distillery/maskprobe.py)
    grad_ckpt: bool = False            # activation checkpointing of the student (paper: full recompute)
    doc_mask: bool = True              # packed documents attend only within themselves, teacher too (the study's
                                       # setting; distillery/packing.py); false: one causal sequence per row
    # --- loss (paper_setup.md, 'Loss')
    alpha: float = 0.2
    temperature: float = 1.0
    divergence: str = "forward_kl"
    divergence_args: dict = field(default_factory=dict)
    mix: str = "standard"
    alpha_schedule: str = "constant"
    alpha_start: float = 0.0
    alpha_end: float = 0.0
    alpha_warmup_frac: float = 0.0
    alpha_decay_frac: float = 0.2
    alpha_controller: str = ""         # an alpha controller (plugins/alpha_controllers.py) decides alpha from what the
                                       # run measures, with `alpha` as its ceiling; "" = alpha_schedule
    alpha_controller_args: dict = field(default_factory=dict)  # its options, e.g. {scale: 0.5, every: 10}
    loss_impl: str = "fused"           # fused (chunked, distillery/fused_kd.py) or plain (reference)
    loss_chunk_size: int = 0           # rows per chunk in the fused head; 0: auto, ~2^25 logits (256 rows at 128k)
    loss_closed_form: bool = True      # fused head: CE + KD + dL/dlogits from formulas where the divergence has one
                                       # (forward_kl); false: autograd per chunk for every divergence
    loss_compile: bool = False         # fused head: torch.compile the autograd route per chunk (26-67 s to compile)
    # --- batch and length
    seq_len: int = 0                   # 0: the data set's row length
    micro_batch_size: int = 8          # rows per rank per forward
    global_batch_size: int = 16        # rows per optimizer step = micro_batch_size * grad_accum * world_size
    train_tokens: int = 1_000_000      # run length; steps = train_tokens // (global_batch_size * seq_len)
    compute_match: str = ""            # alpha = 0 only: a distilled run dir (or a teacher dir) whose FLOPs (student +
                                       # teacher forward) this baseline matches: train_tokens is set to match them
    compute_match_pretrain: bool = False  # ... counting the teacher's own pretraining FLOPs too (docs/compute.md)
    max_steps: int = 0                 # stop after this many steps of that schedule (0: run it to the end)
    # --- optimisation (paper: AdamW 0.9/0.95, eps 1e-8, wd 0.1, clip 1.0, peak 3e-4, 5% warmup, cosine to 10%)
    lr: float = 3e-4                   # the tiny CPU presets use 1e-3..2e-3 (configs/offline)
    min_lr_frac: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # --- logging and evaluation
    log_interval: int = 10
    eval_interval: int = 0             # held-out loss every N steps (0: only at the end; -1: never)
    eval_window: int = 4096
    eval_max_windows: int = 256
    eval_batch_size: int = 1
    callbacks: list = field(default_factory=lambda: ["entropy", "progress", "tensorboard", "eval_final"])
    callback_args: dict = field(default_factory=dict)  # per-callback options, e.g. {eval_downstream: {every: 1000}}
    # --- checkpoints and export
    save_interval: int = 0             # DeepSpeed checkpoint every N steps (0: only at the end)
    resume: str = ""                   # "" fresh, "auto" latest checkpoint of this run if any, or a checkpoint dir
    keep_last: int = 3                 # complete checkpoints kept (older ones pruned after a new one is committed); 0 all
    export: bool = True                # Hugging Face-format student at the end (usable as a later teacher)
    export_dtype: str = "float32"
    # --- reliability (docs/reliability.md)
    verify_data: bool = True           # sha256 of every training shard before the first step (~1.3 s/GB per rank)
    max_bad_steps: int = 3             # consecutive skipped / non-finite steps that stop the run
    max_skipped_frac: float = 0.5      # a run that skipped more than this fraction of its steps fails, however short

    @property
    def run_dir(self):
        return os.path.join(self.out_dir, self.name)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TEACHER_CACHE_MODES = ("renorm", "tail", "support")  # distillery/sparse_kd.py MODES (a sampled cache takes renorm)

# What a resume may change (docs/reliability.md, "Resume semantics"). RUN_DEFINING keys fix the model, the data and
# its order, the objective and the optimizer state: changing one mid-run would silently mix two experiments, so a
# resume (or a rerun under the same name) with a different value is refused before anything is written. Every other
# key may change and is applied for real (lr and its schedule are re-applied over the checkpoint's scheduler state);
# the change is recorded in <run_dir>/config_history.jsonl. Every field is in exactly one of the two.
RUN_DEFINING = ("seed", "data", "doc_mask", "student", "student_init", "teacher", "teacher_cache",
                "teacher_cache_mode", "teacher_cache_k", "alpha", "temperature", "divergence",
                "divergence_args", "mix", "alpha_schedule", "alpha_start", "alpha_end", "alpha_warmup_frac",
                "alpha_decay_frac", "alpha_controller", "alpha_controller_args", "seq_len", "global_batch_size",
                "train_tokens", "compute_match", "compute_match_pretrain", "weight_decay", "beta1", "beta2", "eps")
MAY_CHANGE = ("name", "out_dir", "eval_data", "eval_sets", "teacher_placement", "device_memory_gib",
              "trust_remote_code", "attn_impl", "grad_ckpt", "loss_impl", "loss_chunk_size", "loss_closed_form",
              "loss_compile", "micro_batch_size",
              "max_steps", "lr", "min_lr_frac", "warmup_frac", "grad_clip", "log_interval", "eval_interval", "eval_window", "eval_max_windows",
              "eval_batch_size", "callbacks", "callback_args", "save_interval", "resume", "keep_last", "export",
              "export_dtype", "verify_data", "max_bad_steps", "max_skipped_frac")
# The run-defining keys that make a run a distillation of some teacher: an alpha = 0 baseline differs from the run
# it is compared with in these (a compute-matched one in train_tokens too) and shares every other key of
# RUN_DEFINING; eval/report.py pairs a run with a baseline on exactly those others (plus the evaluation itself).
KD_KEYS = ("teacher", "teacher_cache", "teacher_cache_mode", "teacher_cache_k", "alpha", "temperature", "divergence",
           "divergence_args", "mix", "alpha_schedule", "alpha_start", "alpha_end", "alpha_warmup_frac",
           "alpha_decay_frac", "alpha_controller", "alpha_controller_args", "compute_match", "compute_match_pretrain")
PAIR_KEYS = tuple(k for k in RUN_DEFINING if k != "seed" and k not in KD_KEYS)  # what a baseline shares with its run
_TYPES = typing.get_type_hints(Config)


def _coerce(key, value):
    want = _TYPES[key]
    if want in (int, float) and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"config key {key!r} wants {want.__name__}, got {value!r}") from None
        if want is int and value.is_integer():
            value = int(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is str and value is None:
        return ""
    if want is list and isinstance(value, str):  # eval_sets=heldout  ->  ["heldout"]
        return [v for v in value.split(",") if v]
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} wants {want.__name__}, got {value!r}")
    return value


# Keys that were replaced: refused with the new spelling (one way to say a thing; an old run's config.yaml still
# resumes, since resume checks only the keys it knows).
REPLACED = {"teacher_offload": "teacher_offload was replaced by teacher_placement: write teacher_placement=offload "
                               "for true, or drop the key (teacher_placement=auto) for false"}


def _check_key(key, where):
    if key in REPLACED:
        raise ConfigError(f"config key {key!r} in {where}: {REPLACED[key]}")
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see distillery/config.py for the keys"
        raise ConfigError(f"unknown config key {key!r} in {where}{hint}")


def parse_overrides(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. alpha=0.4)")
        k, v = item.split("=", 1)
        _check_key(k, "the command line")
        try:
            out[k] = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it or fix the brackets") from None
    return out


def load_config(path=None, overrides=()):
    values = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} not found; presets are in configs/")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}; fix the "
                                  f"file") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        for k in values:
            _check_key(k, path)
    values.update(parse_overrides(overrides))
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg):
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"alpha={cfg.alpha} must be in [0, 1]")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature={cfg.temperature} must be > 0")
    for k in ("micro_batch_size", "global_batch_size", "train_tokens", "log_interval"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{k}={getattr(cfg, k)} must be > 0")
    if cfg.loss_chunk_size < 0:
        raise ConfigError(f"loss_chunk_size={cfg.loss_chunk_size} must be >= 0 (0: automatic)")
    if cfg.loss_impl not in ("fused", "plain"):
        raise ConfigError(f"loss_impl={cfg.loss_impl!r}: use fused or plain")
    if cfg.keep_last < 0 or cfg.max_bad_steps < 1 or not 0.0 < cfg.max_skipped_frac <= 1.0:
        raise ConfigError(f"keep_last={cfg.keep_last} must be >= 0, max_bad_steps={cfg.max_bad_steps} >= 1, "
                          f"max_skipped_frac={cfg.max_skipped_frac} in (0, 1]")
    if cfg.teacher_placement not in PLACEMENTS:
        raise ConfigError(f"teacher_placement={cfg.teacher_placement!r}: use {' | '.join(PLACEMENTS)}")
    if cfg.device_memory_gib < 0:
        raise ConfigError(f"device_memory_gib={cfg.device_memory_gib} must be >= 0 (0: measured)")
    if cfg.export_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"export_dtype={cfg.export_dtype!r}: use float32, bfloat16 or float16")
    # Everything below was used unchecked until the first step (or a later one), after config.yaml was written: a
    # typo then burnt the run name (the corrected rerun is a change of a run-defining key). Plugin names and their
    # options (divergence_args, callback_args) and attn_impl are checked in train.resolve().
    if not cfg.name:
        raise ConfigError("name='' must name the run directory ({out_dir}/{name}); set name=<run name>")
    if cfg.teacher_cache_mode not in TEACHER_CACHE_MODES:
        raise ConfigError(f"teacher_cache_mode={cfg.teacher_cache_mode!r}: use {', '.join(TEACHER_CACHE_MODES[:-1])} "
                          f"or {TEACHER_CACHE_MODES[-1]} (top-k caches; docs/teacher_cache.md)")
    for k in ("teacher_cache_k", "save_interval", "max_steps", "seed", "lr", "grad_clip", "weight_decay", "eps"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{k}={getattr(cfg, k)} must be >= 0")
    for k in ("eval_max_windows", "eval_batch_size"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{k}={getattr(cfg, k)} must be > 0")
    if cfg.eval_window < 2:  # a window of W tokens scores W - 1 targets
        raise ConfigError(f"eval_window={cfg.eval_window} must be >= 2 (tokens per evaluation window)")
    if cfg.eval_interval < -1:
        raise ConfigError(f"eval_interval={cfg.eval_interval} must be >= -1 (-1: never, 0: only at the end)")
    for k in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, k) < 1.0:
            raise ConfigError(f"{k}={getattr(cfg, k)} must be in [0, 1)")
    for k in ("min_lr_frac", "warmup_frac", "alpha_start", "alpha_end", "alpha_warmup_frac", "alpha_decay_frac"):
        if not 0.0 <= getattr(cfg, k) <= 1.0:
            raise ConfigError(f"{k}={getattr(cfg, k)} must be in [0, 1]")


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def save_config(cfg, path, header=""):
    """The resolved config as YAML; `header` (e.g. the teacher placement and why) as leading comment lines."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    atomic.write_text(path, comment + yaml.safe_dump(to_dict(cfg), sort_keys=False))
