"""Document masking for packed rows: per-token positions that restart after every EOS, and the one function that runs
a model on packed rows so that every attention kernel masks per document at every micro-batch size.

data_prep packs documents into fixed-length rows, each document ending with EOS. The study's trainer gives every
document its own positions and lets attention see only its own document, for the teacher too (Lu & Liu 2026,
paper_setup.md 'Data'). We derive the positions on the fly from the tokens (doc_positions), so no data is re-packed,
and hand them to the models as position_ids. What transformers 5.24 does with restarting positions depends on the
kernel (config._attn_implementation):

* sdpa, eager, flex_attention: masking_utils.find_packed_sequence_indices reads the restarting positions of every row
  of a [B, S] batch and builds the block-diagonal causal mask (a dense mask for sdpa / eager, a BlockMask for flex).
  Correct at every batch size; hidden_states passes [B, S] as it is.
* flash_attention_2/3/4 (any kernel whose mask function is masking_utils.flash_attention_mask, hub kernels
  included): transformers builds no mask; modeling_flash_attention_utils._is_packed_sequence switches to the varlen
  kernel only when the batch holds ONE row, and otherwise runs plain causal attention over each whole row, across
  documents, while the positions restart ("it's user's responsibility to take care of flattening position_ids",
  transformers #39121). hidden_states therefore flattens the micro-batch into one packed row [1, B*S]: every row
  starts at position 0, so a row start is a document start, and transformers cuts the row into sequences there and at
  every EOS (cu_seqlens from the positions) and runs the varlen kernel; the hidden states are reshaped back to
  [B, S, H]. The fused head and the losses see [B, S] as before.

Every path that runs a model on packed rows goes through hidden_states: the student (engines.StudentWithLoss), the
live teacher (engines.TeacherHidden, in step.micro_step and the teacher-cache builder) and the start-of-run probe
(distillery/maskprobe.py), which checks on the run's own configs, kernel and micro-batch size that a packed document's
hidden states equal the document's alone, and refuses to start otherwise. Evaluation windows are not
document-masked (docs/evaluation.md) and pass no positions: one causal sequence per row on every kernel.

Cost: one cummax over [B, S] int64 per micro-batch; flattening is a view. The attention kernel, not this, is what
changes (see bench/train_step.py --doc_mask and docs/benchmarks.md); on flash-attention the varlen path costs
transformers' packed-sequence check, a device sync per layer, as it did at micro-batch 1 before.
"""
import torch


def doc_positions(x, eos_id):
    """x [B, S] token ids -> position ids [B, S] (int64): 0 at the start of the row and right after each EOS, then
    counting up. A document's EOS belongs to it (it is the document's last token)."""
    b, s = x.shape
    idx = torch.arange(s, device=x.device).expand(b, s)
    starts = torch.zeros_like(x, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = x[:, :-1] == eos_id
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start of each token's document
    return idx - first


def flattens(kernel):
    """Whether `kernel` (an attn_implementation name) reads documents only from the positions of a single packed row:
    the kernels transformers gives no mask, its flash-attention family (flash_attention_mask is their mask
    function; a hub kernel or a user's registered with it counts too)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    return kernel in ALL_MASK_ATTENTION_FUNCTIONS and ALL_MASK_ATTENTION_FUNCTIONS[kernel] is flash_attention_mask


def hidden_states(model, input_ids, position_ids=None):
    """Last hidden states [B, S, H] of a transformers base model (model.model of a causal LM: LlamaModel, Qwen3Model,
    ...) over input_ids [B, S]. position_ids [B, S] from doc_positions (0 at every row start): attention stays inside
    each document, on every kernel, at every B; None: one causal sequence per row."""
    b, s = input_ids.shape
    if position_ids is not None and b > 1 and flattens(model.config._attn_implementation):
        h = model(input_ids=input_ids.reshape(1, b * s), position_ids=position_ids.reshape(1, b * s),
                  use_cache=False).last_hidden_state                                # [1, B*S, H]
        return h.view(b, s, h.shape[-1])
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state  # [B, S, H]
