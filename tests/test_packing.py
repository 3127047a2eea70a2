"""Document masking (distillery/packing.py): a packed document's logits equal the document alone at the start of a
row, for the student and the teacher, through the real model classes; the packed KD loss is the sum of the
documents' losses once the boundary targets (a document's EOS predicting the next document's first token) are left
out. Those boundary targets are trained, as in the study: they are the only difference.

Every attention kernel at every micro-batch size (issue 19): sdpa, eager, and transformers' real flash_attention_2
and flex_attention integration code on CPU stand-in kernels (tests/attn_standins.py), micro-batch 1, 2 and 4, Llama
and Qwen3, student (StudentWithLoss.forward) and teacher (TeacherHidden): A|B|C packed gives B's logits as B alone
does. Before packing.hidden_states flattened flash-attention's micro-batch, micro-batch 2 and 4 failed on flash
(max logit difference 0.51 to 0.61: transformers read the documents only at batch size 1)."""
import pytest
import torch

from distillery.engines import StudentWithLoss, TeacherHidden
from distillery.loss_parts import IGNORE_INDEX, shift_targets
from distillery.models import hf_config
from distillery.packing import doc_positions
from plugins import get

EOS, V = 0, 96


def test_positions_restart_after_each_eos():
    x = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 3], [EOS, 1, 2, 3, EOS, EOS, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert doc_positions(x, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 0, 0, 1],
                                               [0, 1, 2, 3, 4, 5, 6, 7]]


def docs():
    g = torch.Generator().manual_seed(3)
    return [torch.cat([torch.randint(1, V, (n,), generator=g), torch.tensor([EOS])]) for n in (7, 10, 6)]


def models(preset):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(hf_config(preset, V, 64)).eval()
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(hf_config("micro", V, 64)).eval()
    return StudentWithLoss(student), TeacherHidden(teacher)


@pytest.mark.parametrize("preset", ["micro", "micro-qwen3"])
@torch.no_grad()
def test_packed_document_sees_only_itself(preset):
    a, b, c = docs()
    packed = torch.cat([a, b, c])[None]                # A|B|C
    alone = torch.cat([b, c])[None]                    # B at the start of a row
    sb = slice(len(a), len(a) + len(b))                # B's positions in the packed row
    student, teacher = models(preset)
    w_s, w_t = student.lm.get_output_embeddings().weight, teacher.head_weight
    for name, hidden, w in (("student", lambda x, p: student.lm.model(input_ids=x, position_ids=p).last_hidden_state,
                             w_s), ("teacher", lambda x, p: teacher(x, position_ids=p), w_t)):
        lp = hidden(packed, doc_positions(packed, EOS))[0, sb] @ w.t()
        la = hidden(alone, doc_positions(alone, EOS))[0, :len(b)] @ w.t()
        torch.testing.assert_close(lp, la, rtol=1e-5, atol=1e-5, msg=name)
        # without document masking B's logits depend on A: the check above can fail
        unmasked = hidden(packed, None)[0, sb] @ w.t()
        assert (unmasked - la).abs().max() > 1e-3, name


@pytest.mark.parametrize("impl", ["plain", "fused"])
@pytest.mark.parametrize("preset", ["micro", "micro-qwen3"])
@torch.no_grad()
def test_packed_kd_loss_is_the_sum_of_the_documents(preset, impl):
    ds = docs()
    packed = torch.cat(ds)[None]
    student, teacher = models(preset)
    kw = dict(teacher_weight=teacher.head_weight, impl=impl, divergence=get("divergence", "forward_kl"),
              temperature=2.0, w_ce=1.0, w_kd=1.0, kd_vocab=V)

    def sums(x, y):
        pos = doc_positions(x, EOS)
        out = student(input_ids=x, targets=y, teacher_hidden=teacher(x, position_ids=pos), position_ids=pos, **kw)
        return torch.stack([out["ce_sum"], out["kd_sum"], out["n_tokens"].double().float()])

    y = shift_targets(packed)
    ends = torch.cumsum(torch.tensor([len(d) for d in ds]), 0)[:-1] - 1   # each document's EOS but the last
    y[0, ends] = IGNORE_INDEX                                              # the boundary targets, left out
    per_doc = sum(sums(d[None], shift_targets(d[None])) for d in ds)
    torch.testing.assert_close(sums(packed, y), per_doc, rtol=1e-5, atol=1e-5)


# ---- every attention kernel at every micro-batch size (issue 19) ------------------------------------------------------
# transformers' real sdpa / eager / flash_attention_2 / flex_attention integration code; flash-attn and compiled flex
# are replaced by stand-in kernels that compute the same thing on CPU (tests/attn_standins.py says how and why).

def batch_docs(mb, seed):
    """mb rows A_r|B_r|C_r of different documents (lengths 7, 10, 6 tokens + EOS), and B_r at the start of a row."""
    g = torch.Generator().manual_seed(seed)
    rows, alone = [], []
    for _ in range(mb):
        a, b, c = [torch.cat([torch.randint(1, V, (n,), generator=g), torch.tensor([EOS])]) for n in (7, 10, 6)]
        rows.append(torch.cat([a, b, c]))
        alone.append(torch.cat([b, c, a]))
    return torch.stack(rows), torch.stack(alone), slice(8, 19)


def student_hidden(student, monkeypatch):
    """The student's hidden states as StudentWithLoss.forward hands them to the loss (the path that trains)."""
    import distillery.engines as engines
    seen = {}

    def spy(**kw):
        seen["h"] = kw["student_hidden"]
        return compute_loss(**kw)
    from distillery.loss import compute_loss
    monkeypatch.setattr(engines, "compute_loss", spy)

    def fn(x, pos):
        student(input_ids=x, targets=shift_targets(x), position_ids=pos, impl="plain", w_ce=1.0, w_kd=0.0)
        return seen["h"]
    return fn


@pytest.mark.parametrize("mb", [1, 2, 4])
@pytest.mark.parametrize("kernel", ["flash_attention_2", "flex_attention", "sdpa", "eager"])
@pytest.mark.parametrize("preset", ["micro", "micro-qwen3"])
@torch.no_grad()
def test_every_kernel_masks_documents_at_every_micro_batch(preset, kernel, mb, monkeypatch):
    """A|B|C packed gives B's logits as B alone does (B at the start of its row), to fp32 rounding, for the student
    (StudentWithLoss.forward) and the teacher (TeacherHidden), in every row of the micro-batch."""
    from attn_standins import use_standins
    use_standins(monkeypatch)
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    student = StudentWithLoss(AutoModelForCausalLM.from_config(hf_config(preset, V, 64, kernel)).eval())
    torch.manual_seed(1)
    teacher = TeacherHidden(AutoModelForCausalLM.from_config(hf_config(preset, V, 64, kernel)).eval())
    assert student.lm.config._attn_implementation == teacher.lm.config._attn_implementation == kernel
    x, alone, sb = batch_docs(mb, seed=mb)
    w_s, w_t = student.lm.get_output_embeddings().weight, teacher.head_weight
    for name, hidden, w in (("student", student_hidden(student, monkeypatch), w_s),
                            ("teacher", lambda x, p: teacher(x, position_ids=p), w_t)):
        packed = hidden(x, doc_positions(x, EOS))[:, sb] @ w.t()             # [mb, 11, V]
        ref = hidden(alone, doc_positions(alone, EOS))[:, :11] @ w.t()
        diff = (packed - ref).abs().max().item()
        print(f"{preset} {kernel} micro-batch {mb} {name}: max |B packed - B alone| = {diff:.3g}")
        torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5, msg=f"{name}: max diff {diff:.3g}")


def test_packed_training_gradients_match_sdpa(monkeypatch):
    """The training path, backward included: StudentWithLoss at micro-batch 2 on document positions, flash-attention's
    flattened row gives sdpa's loss and parameter gradients to fp32 rounding (worst gradient difference relative to
    the gradient's largest entry; eager differs from sdpa by the same ~1e-6). Flex attention has no backward on CPU
    (PyTorch refuses it), so its gradients are for the GPU check."""
    from attn_standins import use_standins
    use_standins(monkeypatch)
    from transformers import AutoModelForCausalLM
    x, _, _ = batch_docs(2, seed=7)
    pos, y = doc_positions(x, EOS), shift_targets(x)
    out = {}
    for k in ("sdpa", "flash_attention_2"):
        torch.manual_seed(0)
        student = StudentWithLoss(AutoModelForCausalLM.from_config(hf_config("micro-qwen3", V, 64, k)))
        loss = student(input_ids=x, targets=y, position_ids=pos, impl="fused", w_ce=1.0, w_kd=0.0)["loss"]
        loss.backward()
        out[k] = (loss.detach(), {n: p.grad for n, p in student.named_parameters()})
    torch.testing.assert_close(out["flash_attention_2"][0], out["sdpa"][0], rtol=1e-6, atol=0)
    for n, g in out["sdpa"][1].items():
        assert ((out["flash_attention_2"][1][n] - g).abs().max() / g.abs().max()).item() <= 1e-5, n
