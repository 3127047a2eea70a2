"""Compute accounting: exact parameter counts and model FLOPs of students and teachers, a per-run ledger, the
compute-matched baseline budget, and the `distillery_compute.json` file an export carries. See docs/compute.md.

Conventions (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1 / Sec. 2.1; Hoffmann et al.
2022, "Training Compute-Optimal Large Language Models", Appendix F):
  * A multiply-add is 2 FLOPs; FLOPs are *model* FLOPs: activation recompute (grad_ckpt) is not counted, nor
    elementwise work (norms, RoPE, SwiGLU gating, softmax, the KD loss's O(V) per token), nor evaluation passes.
  * N (`matmul_params`) = the weights of every matmul a token goes through: q/k/v/o and gate/up/down of every layer
    plus the output projection (lm_head, V x d), *tied or not* (a tied head still does the V x d matmul).
    The input embedding lookup is a gather, not a matmul, and is NOT counted (Chinchilla App. F counts it as a
    one-hot matmul, +2Vd per token; Kaplan leaves out both embedding and de-embedding). Biases and norm weights are
    not in N (an add / elementwise scale, not a matmul).
  * Attention (QK^T and AV, per layer): each is 2 * ctx * d_attn FLOPs per query token, d_attn = n_heads * head_dim
    (query heads: GQA shares K/V but every query head still does its own dot products). With causal=True (the
    default) ctx = S/2, the average context of a causal row over a packed sequence of length S, so
    forward attention = 2 * n_layers * S * d_attn per token, which is Kaplan's C_forward term; causal=False counts
    the full S (Chinchilla's count, what a kernel that does not skip masked blocks spends): 4 * n_layers * S * d_attn.
    Full (not sliding-window) attention is assumed.
  * forward per token = 2 N + attention_forward;  training per token = 3 x forward = 6 N + 3 attention_forward
    (backward = 2 x forward). A distillation run costs student training + teacher forward on the same tokens
    (+ optionally the teacher's own pretraining, amortised over the students sharing it): Busbridge et al. 2025,
    FLOPs = 3 F(N_S) D_S + F(N_T) (D_S + 3 D_T).

Configs: a transformers config object (LlamaConfig, Qwen3Config, ... as built by distillery.models.hf_config), the
dict of a config.json, or a Hugging Face model directory / config.json path. Supported model types: llama, qwen3,
qwen2, mistral (their parameter layout is spelled out in `architecture`; another type is a ConfigError).
"""
import json
import math
import os
from dataclasses import asdict, dataclass

from distillery.atomic import write_json
from distillery.errors import ConfigError

SCHEMA = "distillery_compute/1"
COMPUTE_FILE = "distillery_compute.json"
CONVENTION = ("model FLOPs, 2 per multiply-add; train = 3 x forward; N = matmul weights incl. lm_head (tied or not), "
              "embedding lookup excluded; attention 4 * n_layers * ctx * d_attn forward, ctx = S/2 if causal else S")
SUPPORTED = ("llama", "qwen3", "qwen2", "mistral")


@dataclass(frozen=True)
class Arch:
    """The shape numbers that decide parameter counts and FLOPs."""
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    qkv_bias: bool   # bias on q/k/v projections
    o_bias: bool     # bias on the output projection
    mlp_bias: bool   # bias on gate/up/down
    qk_norm: bool    # Qwen3: RMSNorm(head_dim) on q and k in every layer

    @property
    def d_attn(self):
        return self.heads * self.head_dim


def _as_dict(config):
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise ConfigError(f"no model config at {config!r}; give a Hugging Face model directory (with config.json)")
        with open(path) as f:
            return json.load(f)
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ConfigError(f"cannot read a model config from {type(config).__name__}; pass a transformers config, "
                      f"a config.json dict or a model directory")


def architecture(config):
    """Arch of a transformers config / config.json dict / model directory."""
    d = _as_dict(config)
    mt = d.get("model_type")
    if mt not in SUPPORTED:
        raise ConfigError(f"FLOP accounting knows model types {', '.join(SUPPORTED)}, not {mt!r}; add its layout to "
                          f"distillery/flops.py:architecture")
    try:
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        attn_bias = bool(d.get("attention_bias") or False)
        return Arch(model_type=mt, vocab=int(d["vocab_size"]), hidden=hidden, layers=int(d["num_hidden_layers"]),
                    heads=heads, kv_heads=int(d.get("num_key_value_heads") or heads),
                    head_dim=int(d.get("head_dim") or hidden // heads), ffn=int(d["intermediate_size"]),
                    # transformers' default is tied when the key is absent
                    tied=bool(d.get("tie_word_embeddings", True)),
                    qkv_bias=True if mt == "qwen2" else attn_bias,   # Qwen2 always has q/k/v biases
                    o_bias=attn_bias if mt in ("llama", "qwen3") else False,
                    mlp_bias=bool(d.get("mlp_bias") or False) if mt == "llama" else False,
                    qk_norm=mt == "qwen3")
    except KeyError as e:
        raise ConfigError(f"model config lacks {e.args[0]!r}; is it a causal LM config.json?") from None


def param_counts(config):
    """Exact parameter counts (equal to sum(p.numel() for p in model.parameters()), tied weights once):
    embedding (input table, V*d), lm_head (separate output matrix; 0 when tied), non_embedding (transformer blocks
    + final norm: Kaplan's N), matmul (N of the FLOP counts: block matmul weights + the V*d output projection),
    total."""
    a = architecture(config)
    d, q, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    attn_w = d * q + 2 * d * kv + q * d
    mlp_w = 3 * d * a.ffn
    per_layer = (attn_w + mlp_w
                 + (q + 2 * kv if a.qkv_bias else 0) + (d if a.o_bias else 0) + (2 * a.ffn + d if a.mlp_bias else 0)
                 + 2 * d                                   # input / post-attention RMSNorm
                 + (2 * a.head_dim if a.qk_norm else 0))
    embedding = a.vocab * d
    lm_head = 0 if a.tied else a.vocab * d
    non_embedding = a.layers * per_layer + d              # + final norm
    return {"embedding": embedding, "lm_head": lm_head, "non_embedding": non_embedding,
            "matmul": a.layers * (attn_w + mlp_w) + a.vocab * d, "total": embedding + lm_head + non_embedding}


def matmul_params(config):
    """N of the FLOP formulas (see the module docstring)."""
    return param_counts(config)["matmul"]


def _check_len(seq_len):
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ConfigError(f"seq_len={seq_len!r} must be > 0 (the packed row length the model trains on)")


def attention_flops_per_token(config, seq_len, causal=True):
    """Forward attention FLOPs per token: QK^T + AV = 2 matmuls x 2 FLOPs x n_layers x ctx x d_attn,
    ctx = seq_len / 2 if causal (average causal context) else seq_len."""
    _check_len(seq_len)
    a = architecture(config)
    ctx_x2 = seq_len if causal else 2 * seq_len        # 2 x ctx, so that S/2 stays an integer count
    return 2 * 2 * a.layers * a.d_attn * ctx_x2 // 2


def forward_flops_per_token(config, seq_len, causal=True):
    """2 N + attention forward."""
    return 2 * matmul_params(config) + attention_flops_per_token(config, seq_len, causal)


def train_flops_per_token(config, seq_len, causal=True):
    """3 x forward = 6 N + 3 x attention forward."""
    return 3 * forward_flops_per_token(config, seq_len, causal)


def _check_tokens(tokens, what="tokens"):
    if tokens < 0:
        raise ConfigError(f"{what}={tokens} must be >= 0")


def student_train_flops(config, tokens, seq_len, causal=True):
    """Training FLOPs of `tokens` tokens (forward + backward)."""
    _check_tokens(tokens)
    return tokens * train_flops_per_token(config, seq_len, causal)


def teacher_forward_flops(config, tokens, seq_len, causal=True):
    """Forward-only FLOPs of a frozen teacher over `tokens` tokens."""
    _check_tokens(tokens)
    return tokens * forward_flops_per_token(config, seq_len, causal)


def _amortised(teacher_pretrain_flops, n_students):
    if n_students < 1:
        raise ConfigError(f"n_students={n_students} must be >= 1 (students sharing the teacher's pretraining)")
    if teacher_pretrain_flops < 0:
        raise ConfigError(f"teacher_pretrain_flops={teacher_pretrain_flops} must be >= 0")
    return teacher_pretrain_flops / n_students


def distillation_flops(student_config, teacher_config, student_tokens, seq_len, count_teacher_pretraining=False,
                       teacher_pretrain_flops=0, n_students=1, causal=True):
    """Student training + teacher forward on the same tokens [+ teacher pretraining / n_students]."""
    total = (student_train_flops(student_config, student_tokens, seq_len, causal)
             + teacher_forward_flops(teacher_config, student_tokens, seq_len, causal))
    if count_teacher_pretraining:
        total += _amortised(teacher_pretrain_flops, n_students)
    return total


def compute_matched_tokens(student_config, teacher_config, student_tokens, seq_len, count_teacher_pretraining=False,
                           teacher_pretrain_flops=0, n_students=1, causal=True, multiple_of=1):
    """Token budget of an alpha = 0 baseline (same student, same seq_len) whose training FLOPs equal the distilled
    run's; rounded to the nearest multiple of `multiple_of` (e.g. global_batch_size * seq_len, so the trainer's
    steps = train_tokens // tokens_per_step lose nothing). With multiple_of=1 the baseline's FLOPs are within half a
    token's training FLOPs of the distilled run's."""
    if multiple_of < 1:
        raise ConfigError(f"multiple_of={multiple_of} must be >= 1")
    target = distillation_flops(student_config, teacher_config, student_tokens, seq_len, count_teacher_pretraining,
                                teacher_pretrain_flops, n_students, causal)
    per_token = train_flops_per_token(student_config, seq_len, causal)
    return int(round(target / per_token / multiple_of)) * multiple_of


class ComputeLedger:
    """FLOPs of one run, per step and cumulative: student training, teacher forward, and (optionally) the teacher's
    own pretraining amortised over the `n_students` that share it. The amortised pretraining is a fixed cost, in
    the total from step 0 (the teacher had to exist before the first step).

    A run distilled from a teacher cache (`cached=True`) runs no teacher: its teacher forward is 0. It is charged
    instead the forward its cache spent on the rows it read (`teacher_cache` FLOPs: the teacher's forward FLOPs per
    token x the tokens it trained on), so its run FLOPs equal an online run's on the same tokens and a compute-matched
    baseline (compute_match_budget) gets the same budget whether the forward ran live or in the cache. The cache's
    whole build (every row, once) is a one-time cost of its own: a student is charged the rows it used, not how many
    students end up sharing the cache (unknown when it runs). docs/compute.md.

        ledger = ComputeLedger(student_cfg, seq_len, teacher_cfg, teacher_pretrain_flops=export_pretrain_flops(t))
        ledger.add_step(tokens_per_step)              # every optimizer step (teacher_tokens=0 when it was skipped)
        metrics.update(ledger.metrics())              # every log step
        state["compute"] = ledger.to_dict()           # in checkpoints; ComputeLedger.from_dict(...) on resume
        write_export_compute(export_dir, ledger.to_dict())
    """

    def __init__(self, student_config, seq_len, teacher_config=None, teacher_pretrain_flops=0, n_students=1,
                 causal=True, cached=False):
        _check_len(seq_len)
        self.seq_len, self.causal, self.n_students = int(seq_len), bool(causal), int(n_students)
        self.cached = bool(cached)
        if self.cached and teacher_config is None:
            raise ConfigError("a cached ComputeLedger needs the cache's teacher_config (its forward FLOPs)")
        self.teacher_pretrain_flops = float(teacher_pretrain_flops or 0)
        self.pretrain_amortised = _amortised(self.teacher_pretrain_flops, self.n_students) if teacher_config else 0.0
        self.student = self._describe(student_config, train=True)
        self.teacher = self._describe(teacher_config, train=False) if teacher_config is not None else None
        self.tokens = self.teacher_tokens = self.cache_tokens = self.steps = 0
        self.last_step = {"student_flops": 0, "teacher_flops": 0, "teacher_cache_flops": 0}

    def _describe(self, config, train):
        a, pc = architecture(config), param_counts(config)
        per_token = (train_flops_per_token if train else forward_flops_per_token)(config, self.seq_len, self.causal)
        return {"model_type": a.model_type, "params_total": pc["total"], "params_non_embedding": pc["non_embedding"],
                "params_matmul": pc["matmul"], ("train" if train else "forward") + "_flops_per_token": per_token}

    def add_step(self, tokens, teacher_tokens=None):
        """One optimizer step over `tokens` student tokens; the teacher ran on (or, cached, was read for)
        `teacher_tokens` of them (default: all, when there is a teacher). Returns this step's {'student_flops',
        'teacher_flops', 'teacher_cache_flops'}."""
        _check_tokens(tokens)
        if teacher_tokens is None:
            teacher_tokens = tokens if self.teacher else 0
        if teacher_tokens and not self.teacher:
            raise ConfigError("teacher_tokens given to a ComputeLedger built without a teacher_config")
        _check_tokens(teacher_tokens, "teacher_tokens")
        forward = teacher_tokens * self.teacher["forward_flops_per_token"] if teacher_tokens else 0
        self.tokens += tokens
        self.steps += 1
        if self.cached:
            self.cache_tokens += teacher_tokens
        else:
            self.teacher_tokens += teacher_tokens
        self.last_step = {"student_flops": tokens * self.student["train_flops_per_token"],
                          "teacher_flops": 0 if self.cached else forward,
                          "teacher_cache_flops": forward if self.cached else 0}
        return dict(self.last_step)

    @property
    def student_flops(self):
        return self.tokens * self.student["train_flops_per_token"]

    @property
    def teacher_flops(self):
        """The live teacher's forward in this run (0 for a cached run)."""
        return self.teacher_tokens * self.teacher["forward_flops_per_token"] if self.teacher else 0

    @property
    def teacher_cache_flops(self):
        """The forward a teacher cache spent on the rows this (cached) run read."""
        return self.cache_tokens * self.teacher["forward_flops_per_token"] if self.teacher else 0

    @property
    def run_flops(self):
        """What it took to make this run's model, teacher pretraining aside: student training + the teacher forward
        over its tokens, run live or read from a cache. compute_match_budget gives a baseline exactly this."""
        return self.student_flops + self.teacher_flops + self.teacher_cache_flops

    @property
    def total_flops(self):
        return self.run_flops + self.pretrain_amortised

    def metrics(self):
        """Flat compute/* metrics for a log record (floats; cumulative unless named per step / per token)."""
        total = self.total_flops
        return {
            "compute/student_flops": float(self.student_flops),
            "compute/teacher_flops": float(self.teacher_flops),
            "compute/teacher_cache_flops": float(self.teacher_cache_flops),
            "compute/teacher_pretrain_flops": float(self.pretrain_amortised),
            "compute/run_flops": float(self.run_flops),
            "compute/total_flops": float(total),
            # teacher forward (live or cached) + amortised teacher pretraining, as a fraction of the total
            "compute/teacher_share": float((self.run_flops - self.student_flops + self.pretrain_amortised) / total)
            if total else 0.0,
            "compute/step_flops": float(sum(self.last_step.values())),
            "compute/tokens": float(self.tokens),
            "compute/teacher_tokens": float(self.teacher_tokens),
            "compute/teacher_cache_tokens": float(self.cache_tokens),
        }

    def to_dict(self):
        """The distillery_compute.json record (schema distillery_compute/1; also the ledger's checkpoint state)."""
        return {"schema": SCHEMA, "convention": CONVENTION, "causal": self.causal, "seq_len": self.seq_len,
                "steps": self.steps, "tokens": self.tokens, "teacher_tokens": self.teacher_tokens,
                "cached": self.cached, "teacher_cache_tokens": self.cache_tokens,
                "last_step": dict(self.last_step), "student": dict(self.student),
                "teacher": dict(self.teacher) if self.teacher else None,
                "teacher_pretrain_flops": self.teacher_pretrain_flops, "n_students": self.n_students,
                "flops": {"student": self.student_flops, "teacher_forward": self.teacher_flops,
                          "teacher_cache": self.teacher_cache_flops,
                          "teacher_pretrain_amortised": self.pretrain_amortised, "run": self.run_flops,
                          "total": self.total_flops}}

    def load_state_dict(self, d):
        """Restore the cumulative counts of a checkpointed ledger (same models and seq_len)."""
        _validate(d, "ledger state")
        if d["seq_len"] != self.seq_len or d["student"]["params_matmul"] != self.student["params_matmul"]:
            raise ConfigError("checkpointed compute ledger is for another student or seq_len; resume with the run's "
                              "own config")
        if bool(d.get("cached", False)) != self.cached:
            raise ConfigError("checkpointed compute ledger is for a run with" + ("" if d.get("cached") else "out")
                              + " a teacher cache; resume with the run's own config")
        self.steps, self.tokens, self.teacher_tokens = int(d["steps"]), int(d["tokens"]), int(d["teacher_tokens"])
        self.cache_tokens = int(d.get("teacher_cache_tokens", 0))
        self.last_step = {"student_flops": 0, "teacher_flops": 0, "teacher_cache_flops": 0,
                          **(d.get("last_step") or {})}

    @classmethod
    def from_dict(cls, d, student_config, teacher_config=None):
        led = cls(student_config, d["seq_len"], teacher_config, d.get("teacher_pretrain_flops", 0),
                  d.get("n_students", 1), d.get("causal", True), d.get("cached", False))
        led.load_state_dict(d)
        return led


# ---------------------------------------------------------------------------- distillery_compute.json
# {"schema": "distillery_compute/1", "convention": str, "causal": bool, "seq_len": int, "steps": int,
#  "tokens": int (student tokens trained), "teacher_tokens": int (tokens the teacher ran on),
#  "cached": bool, "teacher_cache_tokens": int (tokens whose teacher targets came from a cache; absent before issue 20),
#  "last_step": {"student_flops", "teacher_flops", "teacher_cache_flops"} (the last optimizer step's FLOPs),
#  "student": {"model_type", "params_total", "params_non_embedding", "params_matmul", "train_flops_per_token"},
#  "teacher": null | {"model_type", "params_total", "params_non_embedding", "params_matmul", "forward_flops_per_token"},
#  "teacher_pretrain_flops": number (the teacher's full cost, before amortisation), "n_students": int,
#  "flops": {"student", "teacher_forward", "teacher_cache" (optional), "teacher_pretrain_amortised", "run", "total"}}
#  (numbers, FLOPs; run = student + teacher_forward + teacher_cache)
# flops.total is what it cost to produce this model, and is what a later run reads as its teacher's pretraining.
_REQUIRED = ("schema", "seq_len", "steps", "tokens", "teacher_tokens", "student", "flops")
_REQUIRED_FLOPS = ("student", "teacher_forward", "teacher_pretrain_amortised", "run", "total")


def _validate(d, where):
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise ConfigError(f"{where} is not a {SCHEMA} record; write it with distillery.flops.write_export_compute"
                          f"(export_dir, ledger.to_dict())")
    missing = [k for k in _REQUIRED if k not in d] + [f"flops.{k}" for k in _REQUIRED_FLOPS
                                                      if k not in (d.get("flops") or {})]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}; rewrite it from ComputeLedger.to_dict()")
    for k in _REQUIRED_FLOPS:
        v = d["flops"][k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{where}: flops.{k}={v!r} is not a FLOP count; rewrite it from ComputeLedger.to_dict()")


def write_export_compute(export_dir, ledger_dict):
    """Write <export_dir>/distillery_compute.json (atomically) from ComputeLedger.to_dict() (or the ledger)."""
    d = ledger_dict.to_dict() if isinstance(ledger_dict, ComputeLedger) else ledger_dict
    _validate(d, "the compute record")
    if not os.path.isdir(export_dir):
        raise ConfigError(f"export directory {export_dir!r} does not exist; export the model first")
    path = os.path.join(export_dir, COMPUTE_FILE)
    write_json(path, d)
    return path


def read_export_compute(export_dir):
    """The distillery_compute.json record of an export directory, or None when it has none."""
    path = os.path.join(export_dir, COMPUTE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON; delete it (its pretraining FLOPs then count as unknown)") \
            from None
    _validate(d, path)
    return d


def export_pretrain_flops(export_dir):
    """FLOPs it took to produce the model in `export_dir` (its record's flops.total), or None if unrecorded."""
    d = read_export_compute(export_dir)
    return None if d is None else d["flops"]["total"]


def describe(config, seq_len, causal=True):
    """Arch + parameter counts + per-token FLOPs, for printing or a report."""
    return {**asdict(architecture(config)), **{f"params_{k}": v for k, v in param_counts(config).items()},
            "forward_flops_per_token": forward_flops_per_token(config, seq_len, causal),
            "train_flops_per_token": train_flops_per_token(config, seq_len, causal)}


def compute_match_budget(cfg, student_config):
    """train_tokens of an alpha = 0 baseline with cfg.compute_match set: FLOPs equal to the distilled run it names.

    compute_match = a distilled run's directory (its config.yaml gives the teacher and the token budget; the student
    and seq_len must be ours) or a teacher's model directory (distilled at this config's own train_tokens). A run
    distilled from a teacher cache is matched like an online one: its ledger charges the forward its cache spent on
    its tokens (ComputeLedger, cached=True), whose FLOPs come from the teacher config the cache stores.
    compute_match_pretrain = true also counts the teacher's pretraining (its export's distillery_compute.json).
    Rounded to whole optimizer steps (global_batch_size x seq_len), so the baseline's total is within one step's
    FLOPs of the distilled run's. Returns (train_tokens, teacher_dir, distilled_tokens)."""
    import yaml
    src = cfg.compute_match.rstrip("/")
    if cfg.alpha != 0:
        raise ConfigError(f"compute_match is for alpha = 0 baselines (alpha={cfg.alpha}); drop it or set alpha=0")
    run_cfg = os.path.join(src, "config.yaml")
    if os.path.isfile(run_cfg):
        with open(run_cfg) as f:
            other = yaml.safe_load(f) or {}
        from distillery.config import PAIR_KEYS  # the keys eval/report.py pairs a baseline on, too
        def norm(k, v):
            return os.path.normpath(v) if k in ("data", "student_init") and v else v
        for k in (k for k in PAIR_KEYS if k != "train_tokens"):
            a, b = other.get(k), getattr(cfg, k)
            if norm(k, a) != norm(k, b):
                raise ConfigError(f"compute_match={src} trained {k}={a!r}, this run {b!r}; a compute-matched "
                                  f"baseline shares every run-defining setting but the teacher's and train_tokens")
        teacher, distilled_tokens = other.get("teacher"), int(other["train_tokens"])
        teacher_config = teacher
        if not other.get("alpha"):
            raise ConfigError(f"compute_match={src} is itself an alpha = 0 run; name a distilled run")
        if other.get("teacher_cache"):  # the teacher's forward FLOPs from the cache (its teacher may not be here)
            from distillery.teacher_cache import CacheReader
            teacher_config = CacheReader(other["teacher_cache"]).teacher_config
    elif os.path.isfile(os.path.join(src, "config.json")):
        teacher = teacher_config = src
        distilled_tokens = cfg.train_tokens
    else:
        raise ConfigError(f"compute_match={src!r} is neither a run directory (config.yaml) nor a model directory "
                          f"(config.json); name the distilled run, e.g. compute_match=runs/kd-a0.4")
    pretrain = 0
    if cfg.compute_match_pretrain:
        pretrain = export_pretrain_flops(teacher)
        if pretrain is None:
            raise ConfigError(f"compute_match_pretrain=true but teacher {teacher} has no {COMPUTE_FILE} (it was not "
                              f"trained by this trainer); set compute_match_pretrain=false")
    step = cfg.global_batch_size * cfg.seq_len
    tokens = compute_matched_tokens(student_config, teacher_config, distilled_tokens, cfg.seq_len,
                                    count_teacher_pretraining=cfg.compute_match_pretrain,
                                    teacher_pretrain_flops=pretrain, multiple_of=step)
    return tokens, teacher, distilled_tokens
