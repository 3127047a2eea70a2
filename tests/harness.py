"""Test harness: tiny models, tokenizers and token sets for the evaluation tests, and a 2-rank CPU ZeRO-3 worker
(`python tests/harness.py job.json`, what the tests run under a timeout)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

def fill(fs, leave=0):
    """Fill the filesystem `fs` up to `leave` free bytes with a file named filler (appended to if it exists); returns
    its path. Used on a real tiny tmpfs by the full-disk tests (conftest.small_fs) and bench/faults.py."""
    import shutil
    path = os.path.join(fs, "filler")
    with open(path, "ab") as f:
        while shutil.disk_usage(fs).free > leave:
            try:
                f.write(b"\0" * max(1, min(1 << 20, shutil.disk_usage(fs).free - leave)))
                f.flush()
            except OSError:
                break
    return path


EOS = "<|endoftext|>"

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Water boils at one hundred degrees Celsius at sea level. The sun rises in the east and sets in the west. "
    "Cats and dogs are common pets. Two plus two equals four. The capital of France is Paris. "
    "Plants need light, water and air to grow. Ice is frozen water. A week has seven days. "
) * 4


def tiny_tokenizer(texts=(SAMPLE_TEXT,), vocab_size=320):
    """A byte-level BPE (Hugging Face fast tokenizer) with EOS, like data_prep's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)


def tiny_llama_config(vocab_size=320, hidden=64, layers=2, heads=4, kv_heads=2, max_pos=1024, tie=False):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=tie, eos_token_id=0, bos_token_id=0, pad_token_id=0)


def tiny_llama(seed=0, scale=None, **kw):
    """A randomly initialised tiny LlamaForCausalLM in eval mode. scale multiplies lm_head (sharper/flatter
    distributions, so tiny model pairs differ in entropy)."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_llama_config(**kw))
    with torch.no_grad():
        for p in m.parameters():  # larger than the default 0.02 init so the logits are far from uniform
            p.mul_(4.0) if p.dim() > 1 else None
        if scale is not None:
            m.lm_head.weight.mul_(scale)
    return m.eval()


def write_stream_data(out_dir, sets, tokenizer=None, vocab_size=None):
    """A data dir in distillery.shards format holding 'stream' splits {name: 1-D token array}; the tokenizer (if
    given) is saved to tokenizer/ and its hash recorded, as data_prep does."""
    from distillery import shards
    os.makedirs(out_dir, exist_ok=True)
    vocab = vocab_size or (len(tokenizer) if tokenizer is not None else int(max(int(np.max(s)) for s in sets.values()) + 1))
    dtype = shards.dtype_for_vocab(vocab)
    splits = {}
    for name, toks in sets.items():
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        rel = f"{name}/00000.bin"
        entry = shards.write_tokens(os.path.join(out_dir, rel), np.asarray(toks), dtype)
        splits[name] = {"kind": "stream", "tokens": entry["tokens"], "documents": 1, "files": [{"path": rel, **entry}]}
    index = {"format": shards.FORMAT, "version": shards.VERSION, "dtype": dtype, "vocab_size": vocab, "eos_id": 0,
             "tokenizer": {"name": "tiny", "vocab_hash": shards.vocab_hash(tokenizer) if tokenizer is not None else ""},
             "splits": splits}
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    shards.atomic_write_json(os.path.join(out_dir, "index.json"), index)
    return out_dir


def save_model(model, out_dir, tokenizer=None):
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------- 2-rank live ZeRO-3 harness
def make_wrapper(lm):
    """A light stand-in for the trainer's engine module (distillery.engines.StudentWithLoss): forward(input_ids,
    targets, w_ce, w_kd, **loss_kw) -> dict with loss, ce_sum, kd_sum, n_tokens, diag; the Hugging Face model at .lm."""
    import torch
    import torch.nn.functional as F
    from distillery.loss import IGNORE_INDEX

    class Wrapper(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, targets, w_ce=1.0, w_kd=0.0, **_):
            logits = self.lm(input_ids=input_ids).logits.float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                                 ignore_index=IGNORE_INDEX)
            n = (targets != IGNORE_INDEX).sum()
            return {"loss": w_ce * ce, "ce_sum": ce.detach(), "kd_sum": ce.new_zeros(()), "n_tokens": n, "diag": {}}

    return Wrapper(lm)


def zero3_worker(rank, world, port, job):
    """One rank of a CPU/gloo ZeRO-3 run over the model saved at job['model']: runs job['do'] steps and writes
    job['out']/rank<r>.json. Used by the tests through `launch_zero3`."""
    import json as _json
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import sys as _sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    # CPU shared-memory all-reduce: a C++ extension build (and its file lock) that gloo does not need
    _sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from transformers.integrations import HfDeepSpeedConfig
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9}
    dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841  keep alive: from_pretrained partitions under zero.Init
    lm = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    from distillery.engines import StudentWithLoss  # the trainer's real root module
    engine, *_ = deepspeed.initialize(model=StudentWithLoss(lm), config=ds_config, optimizer=None)
    from eval import downstream, ppl
    from distillery import shards
    out = {"rank": rank, "partitioned": bool(getattr(next(lm.parameters()), "ds_numel", 0))}
    if "ppl" in job["do"]:
        sets = {n: shards.load_stream(job["data"], n) for n in job["sets"]}
        out["ppl"] = ppl.evaluate_engine(engine, sets, job["window"], job["max_windows"], job["batch_size"],
                                         impl="plain")
    tok = AutoTokenizer.from_pretrained(job["model"])
    for strategy in ("lockstep", "gathered"):
        if f"mc_{strategy}" in job["do"]:
            sc = downstream.scorer_from_engine(engine, tok, strategy, batch_size=job.get("mc_batch", 2),
                                               device="cpu", dtype=torch.float32)
            r = downstream.evaluate_local(sc, job["mc"])
            out[f"mc_{strategy}"] = {**r, "forwards": sc.forwards}
    if "harness" in job["do"]:
        sc = downstream.scorer_from_engine(engine, tok, "lockstep", batch_size=2, device="cpu")
        out["harness"] = downstream.run_harness(sc, [(job["task"], 0, "acc")], job["include_path"])
        out["harness_forwards"] = sc.forwards
    if "callbacks" in job["do"]:  # the hooks in the trainer's order, on the trainer's Config and Context
        from distillery.config import Config
        from plugins.base import Callbacks, Context, NullWriter
        cfg = Config(data=job["data"], eval_window=job["window"], eval_max_windows=job["max_windows"],
                     eval_batch_size=job["batch_size"], eval_sets=job["sets"], loss_impl="plain",
                     callbacks=["eval_downstream", "eval_final", "tensorboard"],
                     callback_args={"eval_downstream": {"steps": [2], "batch_size": 2,
                                                        "local": {"mc": {"path": job["mc"], "metric": "acc_norm"}}}})
        writer = NullWriter()
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(job["run_dir"], "tb"))
        cbs = Callbacks.build(cfg.callbacks, cfg.callback_args)
        ctx = cbs.bind(Context(cfg=cfg, engine=engine, run_dir=job["run_dir"], writer=writer, rank=rank, world=world,
                               end_step=2, total_steps=2))
        cbs("on_train_start", ctx)
        metrics = {}
        for step in (1, 2):
            cbs("on_step_end", ctx, step=step, metrics=metrics, diag={})
        cbs("on_eval", ctx, step=1, results={f"eval/{k}/loss": v["ce"] for k, v in out["ppl"].items()})
        cbs("on_train_end", ctx, step=2, export_dir=None, metrics=metrics)
        ctx.log(2, metrics)
        out["callback_metrics"] = metrics
        writer.close()
    if "export" in job["do"]:  # the trainer's own exporter (gathers one parameter at a time, rank 0 writes)
        from distillery.models import export_hf
        export_hf(lm, job["export"], job["data"], "float32", rank=rank)
    torch.distributed.barrier()
    with open(os.path.join(job["out"], f"rank{rank}.json"), "w") as f:
        _json.dump(out, f)


def placement_worker(rank, world, port, job):
    """One rank of the teacher-placement check (tests/test_placement.py): the teacher of job['teacher'] built
    partitioned and replicated (distillery.placement.build_teacher) on the same inputs; writes job['out']/rank<r>.json
    with whether hidden states and head weights are bitwise equal, and the bytes each placement's teacher moves in
    the trainer's micro_step (distillery/step.py) next to a micro ZeRO-3 student, counted by distillery.commcount."""
    import json as _json
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch
    from distillery.commcount import CommCounter
    counter = CommCounter(world).install()  # before the process group (DeepSpeed binds the collectives then)
    from distillery.launch import init_distributed
    init_distributed()
    torch.set_num_threads(1)
    import deepspeed
    from transformers import AutoModelForCausalLM
    from distillery.config import Config
    from distillery.engines import init_student, student_ds_config
    from distillery.loss_parts import shift_targets
    from distillery.models import zero3_context
    from distillery.objective import Objective
    from distillery.placement import build_teacher
    from distillery.step import micro_step
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, job["vocab"], (2, 16), generator=g)
    cfg = Config(teacher=job["teacher"], micro_batch_size=2, global_batch_size=2 * world, seq_len=16, alpha=0.5,
                 train_tokens=10 ** 6)
    ds = {"zero_optimization": {"stage": 3}}
    ds_student = student_ds_config(ds, cfg, world)
    with zero3_context(ds_student):
        student = AutoModelForCausalLM.from_pretrained(job["student"], dtype=torch.float32)
    engine = init_student(student, cfg, ds_student, total_steps=10)
    loss_kw = dict(Objective.from_config(cfg, 10).loss_kw(), kd_vocab=job["vocab"])
    out, hidden, head = {"rank": rank}, {}, {}
    for placement in ("partitioned", "replicated"):
        cfg.teacher_placement = placement
        teacher = build_teacher(cfg, ds)
        with torch.no_grad():
            hidden[placement] = teacher(x)
        with deepspeed.zero.GatheredParameters([teacher.module.head_weight], modifier_rank=None):
            head[placement] = teacher.module.head_weight.detach().clone()
        out[f"{placement}_hooked"] = any(hasattr(p, "ds_id") for p in teacher.module.parameters())
        for i in range(2):  # the second micro-step: ZeRO-3's trace of the first is complete
            counter.reset()
            with counter.phase("student"):
                micro_step(engine, teacher, x, shift_targets(x), loss_kw, 0.01, 0.01,
                           teacher_timer=lambda: counter.phase("teacher"))
        out[f"{placement}_bytes"] = counter.totals().get("teacher", {})
    out["hidden_equal"] = torch.equal(hidden["partitioned"], hidden["replicated"])
    out["head_equal"] = torch.equal(head["partitioned"], head["replicated"])
    torch.distributed.barrier()
    with open(os.path.join(job["out"], f"rank{rank}.json"), "w") as f:
        _json.dump(out, f)


def launch_zero3(job, world=2, port=None):
    """Spawn `world` gloo ranks running zero3_worker(job) (or placement_worker, job['worker']: 'placement'); returns
    the per-rank result dicts."""
    import json as _json

    import torch.multiprocessing as mp
    if port is None:
        from distillery.launch import free_port
        port = free_port()
    os.makedirs(job["out"], exist_ok=True)
    worker = placement_worker if job.get("worker") == "placement" else zero3_worker
    mp.spawn(worker, args=(world, port, job), nprocs=world, join=True)
    res = []
    for r in range(world):
        with open(os.path.join(job["out"], f"rank{r}.json")) as f:
            res.append(_json.load(f))
    return res


if __name__ == "__main__":  # python tests/harness.py job.json  (what the tests run, under a timeout)
    import json as _json
    import sys
    with open(sys.argv[1]) as f:
        _job = _json.load(f)
    launch_zero3(_job, world=_job.get("world", 2))
