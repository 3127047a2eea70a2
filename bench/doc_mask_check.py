"""Document masking on the attention kernel the trainer picks (issue 18, check `right_doc_mask`): a packed row
A|B|C at micro-batch 2 gives B's logits as B alone does.

    python bench/doc_mask_check.py --gpu     # CUDA, bf16, attn_implementation("auto", doc_mask=True): flash-attn 2
                                             # when installed, else flex attention (compiled on first use)
    python bench/doc_mask_check.py           # CPU, fp32, SDPA with the dense block-diagonal mask

What the trainer does with doc_mask=true (distillery/packing.py, distillery/engines.py): position ids that restart
after every EOS, given to transformers' model with no attention mask; transformers builds the per-document mask for
the kernel. Here: a random-init Llama (hidden 256, 4 layers, 4 heads of 64, GQA 2) built the way the trainer
builds models; documents A, B, C (100, 150, 90 tokens, each ending with EOS); a micro-batch of two packed rows,
A|B|C and C|B|A (B at offsets 100 and 90), with doc_positions(); and B alone in its own row.

Reported: max |logits of B in each packed row - B alone| on the kernel and dtype under test; both against a float64
eager-attention run of B alone on CPU (the exact answer); and, as a control that the check can fail, the same with
no positions (each row one causal sequence, so B attends to A or C). Pass: the packed B is no further from float64
than 2x what B alone is (two roundings of the same size; + 1e-6 absolute), and the control differs by at least 10x
more than the packed row does. Ends with one JSON line.
Issue 19 adds a start-of-run probe of the kernel; this check is meant to call it when it lands.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

EOS, V, DOCS = 0, 1024, (100, 150, 90)


def model_cfg(attn):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, intermediate_size=512, max_position_embeddings=1024,
                       tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                       use_cache=False, attn_implementation=attn)


def documents(seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in DOCS:
        d = torch.randint(1, V, (n,), generator=g)
        d[-1] = EOS
        docs.append(d)
    return docs


def check(gpu):
    from transformers import AutoModelForCausalLM
    from distillery.models import attn_implementation
    from distillery.packing import doc_positions
    attn = attn_implementation("auto", True)          # the trainer's choice with doc_mask=true
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_cfg(attn)).to(dev, dtype).eval()
    exact = AutoModelForCausalLM.from_config(model_cfg("eager")).double().eval()
    exact.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    a, b, c = documents()
    rows = torch.stack([torch.cat([a, b, c]), torch.cat([c, b, a])])               # [2, 340]
    starts = (len(a), len(c))                                                      # B's offset in each row
    with torch.no_grad():
        x = rows.to(dev)
        packed = model(input_ids=x, position_ids=doc_positions(x, EOS)).logits.float().cpu()   # [2, 340, V]
        unmasked = model(input_ids=x).logits.float().cpu()                         # no positions: one sequence
        alone = model(input_ids=b[None].to(dev)).logits.float().cpu()[0]           # [150, V]
        ref = exact(input_ids=b[None]).logits[0]                                   # float64, eager, CPU
    b_in = [packed[r, s:s + len(b)] for r, s in enumerate(starts)]
    b_unm = [unmasked[r, s:s + len(b)] for r, s in enumerate(starts)]
    diff = max((p - alone).abs().max().item() for p in b_in)
    err_packed = max((p.double() - ref).abs().max().item() for p in b_in)
    err_alone = (alone.double() - ref).abs().max().item()
    control = max((p - alone).abs().max().item() for p in b_unm)
    ok = err_packed <= 2 * err_alone + 1e-6 and control >= 10 * max(diff, 1e-12)
    return {"bench": "doc_mask", "device": torch.cuda.get_device_name() if gpu else "cpu", "attn": attn,
            "dtype": str(dtype).replace("torch.", ""), "docs": list(DOCS), "micro_batch": 2,
            "max_diff_vs_alone": diff, "max_err_packed_vs_float64": err_packed,
            "max_err_alone_vs_float64": err_alone, "unmasked_control_max_diff": control,
            "logit_max_abs": ref.abs().max().item(), "ok": ok}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args(argv)
    if a.gpu and not torch.cuda.is_available():
        raise SystemExit("error: --gpu but CUDA is not available; drop --gpu for the CPU check")
    t = time.time()
    rec = check(a.gpu)
    rec["seconds"] = round(time.time() - t, 1)
    print(json.dumps(rec))
    if not rec["ok"]:
        raise SystemExit(f"error: document masking on {rec['attn']}: B in a packed row is "
                         f"{rec['max_diff_vs_alone']:.3g} from B alone (float64 error packed "
                         f"{rec['max_err_packed_vs_float64']:.3g} vs alone {rec['max_err_alone_vs_float64']:.3g}; "
                         f"unmasked control {rec['unmasked_control_max_diff']:.3g})")


if __name__ == "__main__":
    main()
