"""Downstream evaluation: the paper's lm-evaluation-harness tasks (log-likelihood scoring, no chat template), a harness
`LM` adapter over our models (plain, or a live ZeRO-3 engine), and an offline multiple-choice scorer over local JSONL.

Scoring (one code path for everything here): a request is (context, continuation); trailing spaces of the context move
to the continuation, context + continuation is tokenized as a whole and split at the context's token length (what the
harness does for causal models); an empty context is replaced by the EOS token. Tokens are encoded without special
tokens. The inputs are truncated on the left to `max_length`; log p(continuation) is summed in fp32 and is_greedy says
whether every continuation token is the argmax.

Live ZeRO-3 (peers_and_pitfalls.md traps 5 and 6): the default strategy is "lockstep": the harness shards documents over
the ranks (data parallel, as with accelerate), and before each request type every rank agrees (all_reduce MAX) on the
number of forward batches; ranks with fewer run dummy forwards. Every ZeRO-3 forward is a collective, so equal counts
is exactly what prevents the hang, and no rank needs a full copy of the weights. The alternative, "gathered", builds a
full 16-bit copy of the weights on every rank (deepspeed.zero.GatheredParameters) and evaluates that copy with no
collectives inside forwards; it costs one model of memory per rank. Results record which strategy ran.

Offline (no hub), multiple-choice tasks from local JSONL, one document per line:
    {"query": "Question: ...\\nAnswer:", "choices": ["a", "b", ...], "gold": 1}
acc = argmax log p(" " + choice | prompt); acc_norm divides log p by len(choice) in characters (the harness's
definition). `write_harness_task` writes the same file as an lm-eval task (dataset_path: json), so the harness and the
built-in scorer can be run on identical documents.

    python -m eval.downstream --model runs/<name> --tasks paper            # lm-eval, the paper's 8 tasks and shots
    python -m eval.downstream --model <dir> --tasks hellaswag:0 mmlu:5 --limit 100
    python -m eval.downstream --model <dir> --local my_task=path.jsonl:0 --out results.json   # built-in scorer
"""
import argparse
import json
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distillery.launch import rank_world

# (task, shots, metric): the paper's main table, then the other tasks it used.
PAPER_TASKS = [("hellaswag", 0, "acc_norm"), ("arc_easy", 0, "acc_norm"), ("piqa", 0, "acc_norm"), ("sciq", 0, "acc"),
               ("winogrande", 5, "acc"), ("boolq", 5, "acc"), ("mmlu", 5, "acc"), ("mathqa", 5, "acc")]
EXTRA_TASKS = [("openbookqa", 5, "acc_norm"), ("social_iqa", 0, "acc"), ("commonsense_qa", 10, "acc"),
               ("truthfulqa_mc1", 0, "acc"), ("logiqa2", 10, "acc"), ("race", 0, "acc"), ("medmcqa", 10, "acc"),
               ("anli_r1", 10, "acc")]
KNOWN = {t: (s, m) for t, s, m in PAPER_TASKS + EXTRA_TASKS}
STRATEGIES = ("single", "lockstep", "gathered")


def task_specs(names):
    """'paper' | 'all' | 'name' | 'name:shots' | 'name:shots:metric' -> [(task, shots, metric)]. Unknown names are
    allowed (any harness task) with 0 shots and acc unless given."""
    out = []
    for n in names:
        if n == "paper":
            out += PAPER_TASKS
        elif n == "all":
            out += PAPER_TASKS + EXTRA_TASKS
        else:
            parts = n.split(":")
            shots, metric = KNOWN.get(parts[0], (0, "acc"))
            if len(parts) > 1:
                shots = int(parts[1])
            if len(parts) > 2:
                metric = parts[2]
            out.append((parts[0], shots, metric))
    return out


# --------------------------------------------------------------------------------------------------- scoring core
class Scorer:
    """Log-likelihood of token continuations with a `logits_fn(input_ids [b, L]) -> logits [b, L, V]`.

    rank/world: the process group this scorer runs in; with lockstep=True every call runs the same number of forwards
    on all ranks (max over ranks; extra ones are dummies), which a ZeRO-3 model needs."""

    def __init__(self, logits_fn, tokenizer, max_length=2048, batch_size=8, device="cpu", rank=0, world=1,
                 lockstep=False, strategy="single"):
        self.logits_fn, self.tokenizer = logits_fn, tokenizer
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        self.rank, self.world, self.lockstep, self.strategy = rank, world, lockstep, strategy
        eot = tokenizer.eos_token_id
        self.eot = eot if eot is not None else 0
        self.forwards = 0  # forwards this scorer ran, dummies included (tests read it)

    # tokenization, exactly as lm-eval's TemplateLM for causal models
    def encode(self, s):
        return self.tokenizer.encode(s, add_special_tokens=False)

    def encode_pair(self, context, continuation):
        if context == "":
            cont = self.encode(continuation)
            return ([self.eot], cont) if cont[:1] != [self.eot] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def score_tokens(self, pairs):
        """[(context_ids, continuation_ids)] -> [(sum log p(continuation), is_greedy)] in input order."""
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            items.append((i, whole[:-1], list(cont)[-len(whole) + 1:] if len(cont) >= len(whole) else list(cont)))
        items.sort(key=lambda it: (-len(it[1]), it[0]))  # longest first: padding waste is small, order deterministic
        batches = [items[a:a + self.batch_size] for a in range(0, len(items), self.batch_size)]
        n = len(batches)
        if self.lockstep and self.world > 1:
            t = torch.tensor([n], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n = int(t.item())
        out = [None] * len(pairs)
        for bi in range(n):
            if bi >= len(batches):  # dummy forward: keeps ZeRO-3 ranks in lockstep, result unused
                self.logits_fn(torch.full((1, 2), self.eot, dtype=torch.long, device=self.device))
                self.forwards += 1
                continue
            batch = batches[bi]
            L = max(len(it[1]) for it in batch)
            x = torch.full((len(batch), L), self.eot, dtype=torch.long)
            for r, (_, inp, _) in enumerate(batch):
                x[r, :len(inp)] = torch.tensor(inp)  # right padding: a causal model's earlier positions never see it
            logits = self.logits_fn(x.to(self.device))
            self.forwards += 1
            for r, (i, inp, cont) in enumerate(batch):
                k = len(cont)
                lp = F.log_softmax(logits[r, len(inp) - k:len(inp)].float(), -1)
                y = torch.tensor(cont, device=lp.device)
                out[i] = (float(lp.gather(-1, y[:, None]).sum().item()), bool((lp.argmax(-1) == y).all().item()))
        return out

    def loglikelihood(self, requests):
        """[(context, continuation)] strings -> [(logprob, is_greedy)]."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def rolling_windows(self, text):
        """Disjoint rolling windows over a whole document (lm-eval's get_rolling_token_windows with context_len 1):
        the first token is conditioned on EOS, each window predicts up to max_length tokens with as much context as
        fits."""
        toks = self.encode(text)
        L, wins, done = self.max_length, [], 0
        if not toks:
            return wins
        first = min(L, len(toks))
        wins.append(([self.eot] + toks[:first - 1], toks[:first]))
        done = first
        while done < len(toks):
            k = min(len(toks) - done, L)
            end = done + k
            wins.append((toks[max(end - L - 1, 0):end - 1], toks[end - k:end]))
            done = end
        # make disjoint: the context is what precedes the predicted tokens
        return [(ctx[:len(ctx) - (len(pred) - 1)], pred) for ctx, pred in wins]

    def loglikelihood_rolling(self, texts):
        per_doc = [self.rolling_windows(t) for t in texts]
        flat = [w for ws in per_doc for w in ws]
        scores = self.score_tokens(flat) if flat or (self.lockstep and self.world > 1) else []
        out, a = [], 0
        for ws in per_doc:
            out.append(float(sum(s for s, _ in scores[a:a + len(ws)])))
            a += len(ws)
        return out


def hf_logits_fn(model):
    return lambda x: model(input_ids=x).logits


def _max_length(config, default=2048):
    return int(getattr(config, "max_position_embeddings", None) or default)


def scorer_from_model(model, tokenizer, max_length=None, batch_size=8, device=None):
    """Scorer for a plain (single-process) Hugging Face model."""
    device = device or next(model.parameters()).device
    return Scorer(hf_logits_fn(model), tokenizer, max_length or _max_length(model.config), batch_size, device)


def scorer_from_dir(path, device=None, dtype="fp32", max_length=None, batch_size=8):
    """Scorer for a Hugging Face model directory or one of our run directories (export/)."""
    from eval import common
    device = common.auto_device(device)
    model = common.load_model(path, device, dtype)
    tok = common.load_tokenizer(common.resolve_model_dir(path))
    if tok is None:
        raise common.EvalError(f"{path!r} has no tokenizer files; downstream tasks need the model's tokenizer")
    return scorer_from_model(model, tok, max_length, batch_size, device)


def gathered_copy(hf_model, dtype=torch.bfloat16, device=None):
    """A full, plain (unpartitioned) copy of a ZeRO-3 partitioned Hugging Face model in `dtype`, built on every rank.
    Collective: every rank must call it."""
    import deepspeed
    cfg = hf_model.config
    params = list(hf_model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        sd = {k: v.detach().to(dtype).clone() for k, v in hf_model.state_dict().items()}
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        copy = type(hf_model)(cfg)  # the plain constructor: no zero.Init even while an HfDeepSpeedConfig is alive
    finally:
        torch.set_default_dtype(old)
    missing, unexpected = copy.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"gathered copy does not match: missing {missing}, unexpected {unexpected}")
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    dev = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    return copy.to(dev).eval()


def scorer_from_engine(engine, tokenizer, strategy="lockstep", lm_attr="lm", max_length=None, batch_size=8,
                       device=None, dtype=torch.bfloat16):
    """Scorer over a live (ZeRO-3) DeepSpeed engine whose module holds the Hugging Face model at `.lm_attr`.
    Every rank must build it and use it in the same order (see the module doc)."""
    if strategy not in ("lockstep", "gathered"):
        raise ValueError(f"strategy must be 'lockstep' or 'gathered', got {strategy!r}")
    rank, world = rank_world()
    hf = getattr(engine.module, lm_attr) if lm_attr else engine.module
    if device is None:
        device = getattr(engine, "device", None) or next(hf.parameters()).device
    ml = max_length or _max_length(hf.config)
    if strategy == "gathered":
        copy = gathered_copy(hf, dtype, device)
        return Scorer(hf_logits_fn(copy), tokenizer, ml, batch_size, device, rank, world, lockstep=False,
                      strategy="gathered")
    return Scorer(hf_logits_fn(hf), tokenizer, ml, batch_size, device, rank, world, lockstep=True,
                  strategy="lockstep")


# ------------------------------------------------------------------------------------------ local multiple choice
def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mc_requests(doc, shots_docs=(), target_delimiter=" ", fewshot_delimiter="\n\n"):
    """The harness's multiple-choice prompt: shots as 'query + delimiter + gold choice' joined by a blank line, then the
    query; one (context, ' ' + choice) request per choice."""
    prefix = "".join(d["query"] + target_delimiter + d["choices"][d["gold"]] + fewshot_delimiter for d in shots_docs)
    ctx = prefix + doc["query"]
    return [(ctx, target_delimiter + c) for c in doc["choices"]]


def evaluate_local(scorer, path_or_docs, num_fewshot=0, limit=None, fewshot_docs=None, seed=1234):
    """acc / acc_norm on local multiple-choice JSONL with the built-in scorer. Documents are sharded over the scorer's
    ranks and results gathered; every rank gets the result. Few-shot examples come from fewshot_docs or, when absent,
    from the other documents of the set (seeded per document; the harness's own sampler may pick others)."""
    docs = read_jsonl(path_or_docs) if isinstance(path_or_docs, str) else list(path_or_docs)
    if limit:
        docs = docs[:limit]
    mine = list(range(scorer.rank, len(docs), scorer.world))
    reqs, owner = [], []
    for i in mine:
        shots = []
        if num_fewshot:
            pool = fewshot_docs if fewshot_docs is not None else [d for j, d in enumerate(docs) if j != i]
            shots = random.Random(seed + i).sample(pool, min(num_fewshot, len(pool)))
        r = mc_requests(docs[i], shots)
        reqs += r
        owner += [i] * len(r)
    scores = scorer.loglikelihood(reqs)
    per_doc = {}
    for i, (lp, _) in zip(owner, scores):
        per_doc.setdefault(i, []).append(lp)
    rows = []
    for i in mine:
        lls, d = per_doc[i], docs[i]
        acc = float(max(range(len(lls)), key=lambda k: lls[k]) == d["gold"])
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"])]
        acc_norm = float(max(range(len(norm)), key=lambda k: norm[k]) == d["gold"])
        rows.append((i, acc, acc_norm, lls))
    if scorer.world > 1:
        allrows = [None] * scorer.world
        dist.all_gather_object(allrows, rows)
        rows = sorted(r for part in allrows for r in part)
    n = len(rows)
    return {"acc": sum(r[1] for r in rows) / n, "acc_norm": sum(r[2] for r in rows) / n, "n": n,
            "num_fewshot": num_fewshot, "loglikelihoods": [r[3] for r in rows], "strategy": scorer.strategy}


def write_harness_task(task_name, jsonl_path, out_dir, output_type="multiple_choice", num_fewshot=0):
    """Write an lm-eval task YAML reading a local JSONL file (dataset_path: json, split 'test'); returns the dir to pass
    as include_path. multiple_choice uses the JSONL schema above; loglikelihood_rolling reads {"text": ...}."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(jsonl_path)
    lines = [f"task: {task_name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {path}",
             "test_split: test", f"output_type: {output_type}", f"num_fewshot: {num_fewshot}"]
    if output_type == "multiple_choice":
        lines += ["fewshot_split: test", 'doc_to_text: "{{query}}"', 'doc_to_choice: "{{choices}}"',
                  'doc_to_target: "{{gold}}"', "metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    elif output_type == "loglikelihood_rolling":
        lines += ['doc_to_text: ""', 'doc_to_target: "{{text}}"', "metric_list:", "  - metric: word_perplexity",
                  "  - metric: byte_perplexity", "  - metric: bits_per_byte"]
    else:
        raise ValueError(f"unsupported output_type {output_type!r}")
    with open(os.path.join(out_dir, f"{task_name}.yaml"), "w") as f:
        f.write("\n".join(lines + ["metadata:", "  version: 1.0", ""]))
    return out_dir


# ----------------------------------------------------------------------------------------------- lm-eval adapter
def make_harness_lm(scorer):
    """An lm-eval `LM` over a Scorer (lm_eval must be installed). Its rank / world_size are the scorer's, so under
    a live engine the harness shards documents over ranks and the scorer keeps forwards in lockstep."""
    from lm_eval.api.model import TemplateLM

    class DistilleryLM(TemplateLM):
        backend = "causal"

        def __init__(self):
            super().__init__()
            self.scorer = scorer
            self.tokenizer = scorer.tokenizer
            self._rank, self._world_size = scorer.rank, scorer.world
            self._device = scorer.device

        @property
        def eot_token_id(self):
            return self.scorer.eot

        @property
        def max_length(self):
            return self.scorer.max_length

        @property
        def device(self):
            return self._device

        @property
        def tokenizer_name(self):
            return getattr(self.tokenizer, "name_or_path", "distillery").replace("/", "__")

        def tok_encode(self, string, add_special_tokens=None, **kw):
            return self.scorer.encode(string)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kw):
            return self.scorer.score_tokens([(ctx, cont) for _, ctx, cont in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return self.scorer.loglikelihood_rolling([req.args[0] for req in requests])

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError("generation tasks are not supported: the paper scores every task by "
                                      "log-likelihood")

        def all_gather(self, tensor):
            if self._world_size == 1:
                return tensor
            parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
            dist.all_gather(parts, tensor)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj, dst=0):
            if self._world_size == 1:
                return [obj]
            out = [None] * self._world_size
            dist.all_gather_object(out, obj)
            return out if self._rank == dst else None

        def barrier(self):
            if self._world_size > 1:
                dist.barrier()

    return DistilleryLM()


def _local_task_names(include_path):
    import yaml
    names = set()
    for p in (include_path if isinstance(include_path, (list, tuple)) else [include_path]):
        for root, _, files in os.walk(p):
            for f in files:
                if f.endswith((".yaml", ".yml")):
                    try:
                        with open(os.path.join(root, f)) as fh:
                            doc = yaml.safe_load(fh)
                    except Exception:  # harness YAMLs may use custom tags; those are not ours
                        continue
                    if isinstance(doc, dict) and isinstance(doc.get("task"), str):
                        names.add(doc["task"])
    return names


def run_harness(scorer, specs, include_path=None, limit=None, log_samples=False):
    """Run lm-eval tasks through the adapter. specs: [(task, shots, metric)]; tasks with equal shots run together.
    Returns {task: {"metric", "value", "shots", "all": {metric: value}}, "_strategy": ...} on every rank (rank 0's
    results are broadcast)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    lm = make_harness_lm(scorer)
    # indexing the harness's built-in tasks takes seconds: skip it when every task is a local YAML
    local = _local_task_names(include_path) if include_path else set()
    tm = TaskManager(include_path=include_path, include_defaults=not {t for t, _, _ in specs} <= local) \
        if include_path else TaskManager()
    groups = {}
    for task, shots, metric in specs:
        groups.setdefault(shots, []).append((task, metric))
    out = {}
    for shots in sorted(groups):
        names = [t for t, _ in groups[shots]]
        res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=tm,
                                      log_samples=log_samples, bootstrap_iters=0)
        if scorer.rank == 0:
            for task, metric in groups[shots]:
                r = res["results"].get(task, {})
                all_m = {k.split(",")[0]: v for k, v in r.items() if "," in k and "stderr" not in k
                         and isinstance(v, (int, float))}
                out[task] = {"metric": metric, "value": all_m.get(metric), "shots": shots, "all": all_m}
    if scorer.world > 1:
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    out["_strategy"] = scorer.strategy
    return out


def main(argv=None):
    from eval import common
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model dir or run dir (uses export/)")
    ap.add_argument("--tasks", nargs="*", default=[], help="'paper', 'all', or task[:shots[:metric]] (lm-eval)")
    ap.add_argument("--local", nargs="*", default=[], help="name=path.jsonl[:shots] with the built-in scorer")
    ap.add_argument("--include_path", default=None, help="extra lm-eval task YAML directory")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not a.tasks and not a.local:
        ap.error("give --tasks and/or --local")
    scorer = scorer_from_dir(a.model, a.device, a.dtype, a.max_length, a.batch_size)
    t0 = time.time()
    out = {"model": common.resolve_model_dir(a.model), "tasks": {}}
    for spec in a.local:
        name, rest = spec.split("=", 1)
        path, _, shots = rest.partition(":")
        r = evaluate_local(scorer, path, int(shots or 0), a.limit)
        r.pop("loglikelihoods")
        out["tasks"][name] = r
    if a.tasks:
        out["tasks"].update(run_harness(scorer, task_specs(a.tasks), a.include_path, a.limit))
    out["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(out["tasks"], indent=1))
    if a.out:
        common.write_json(a.out, out)
    return out


if __name__ == "__main__":
    from distillery.errors import cli
    cli(main)
