"""Document masking for packed rows: per-token positions that restart after every EOS.

data_prep packs documents into fixed-length rows, each document ending with EOS. The study's trainer gives every
document its own positions and lets attention see only its own document, for the teacher too (Lu & Liu 2026,
paper_setup.md 'Data'). We derive the positions on the fly from the tokens, so no data is re-packed, and hand them to
the models as position_ids: transformers (masking_utils.find_packed_sequence_indices) reads restarting positions as
packed sequences and builds the block-diagonal causal mask itself, for SDPA, eager and flex attention, and
flash-attn 2 takes its varlen path. We write no attention code.

Cost: one cummax over [B, S] int64 per micro-batch (negligible); the attention kernel, not this, is what changes
(see bench/train_step.py --doc_mask and docs/benchmarks.md).
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
