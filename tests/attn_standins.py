"""Stand-in attention kernels, so transformers' GPU-only attention integrations run on CPU in the tests.

Only the kernel at the bottom is replaced; every line of transformers above it runs as it does on a GPU, models
are built as the trainer builds them (attn_implementation=<kernel>; the construction-time check that flash-attn is
installed is told yes).

flash_attention_2: transformers imports flash-attn's entry points lazily, in one function
(`modeling_flash_attention_utils._lazy_imports` returns flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
pad_input, unpad_input), and caches them per implementation name. `use_standins` replaces that function (and clears
the cache), so what runs is transformers' own `flash_attention_forward` -> `_flash_attention_forward`: its
packed-sequence check (`_is_packed_sequence`, batch size 1 only), cu_seqlens from position_ids
(`_prepare_from_posids`), the keyword processing that inspects the kernel's signature (so the stand-ins have
flash-attn 2's signatures) and the choice between the varlen and the plain kernel. The stand-ins compute what
flash-attn documents for those two calls: softmax(q k^T * softmax_scale) v per sequence (a row of the batch, or a
cu_seqlens slice of the packed tokens), causal, grouped-query heads sharing kv heads, through PyTorch's SDPA. Options
the study never uses (dropout, sliding window, softcap, ALiBi) are refused rather than approximated.
Not covered: flash-attn's own numerics and its bf16-only dtype check; the start-of-run probe
(distillery/maskprobe.py) runs the real kernel on the GPU.

flex_attention: transformers builds a BlockMask from its mask functions (`masking_utils.flex_attention_mask` ->
`create_block_mask(..., _compile=True)`) and calls `integrations.flex_attention.compile_friendly_flex_attention`
(a torch.compile'd flex_attention). The stand-ins are PyTorch's own: create_block_mask with _compile=False (the same
mask_mod, evaluated eagerly) and flex_attention without torch.compile, PyTorch's reference implementation (dense
scores, score_mod and mask_mod applied to every entry), which the compiled kernels are tested against upstream.
Not covered: the compiled kernel's block sparsity; again the probe checks that on the device.
"""

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def _unsupported(dropout_p, window_size, softcap, alibi_slopes):
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("stand-in flash kernel: dropout, sliding window, softcap and ALiBi are not modelled")


def _attend(q, k, v, causal, scale):
    """One sequence: q [S, Hq, D], k/v [S, Hkv, D] (flash-attn's layout) -> [S, Hq, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=causal, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func: q [B, S, Hq, D], k/v [B, S, Hkv, D]; each row one sequence."""
    _unsupported(dropout_p, window_size, softcap, alibi_slopes)
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func: q [T, Hq, D], k/v [T, Hkv, D], sequence i = tokens cu[i]:cu[i+1]."""
    _unsupported(dropout_p, window_size, softcap, alibi_slopes)
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("stand-in flash kernel: queries and keys of different lengths are not modelled")
    cu = cu_seqlens_q.tolist()
    assert cu[0] == 0 and cu[-1] == q.shape[0], cu
    return torch.cat([_attend(q[a:b], k[a:b], v[a:b], causal, softmax_scale) for a, b in zip(cu[:-1], cu[1:])])


def eager_flex_attention(query, key, value, training=False, **kwargs):
    """compile_friendly_flex_attention without the compile: PyTorch's reference flex attention (math_attention in
    torch/_higher_order_ops/flex_attention.py), called directly (_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG, set by
    use_standins) instead of through dynamo's eager backend, which traces it again for every new shape (~20 s a
    test on 2 cores) and computes the same thing. Forward only: the flag's log2-scaled statistics matter for the
    backward and the LSE, which these tests do not use (transformers asks for no LSE on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(query, key, value, **kwargs)


def use_standins(monkeypatch, varlen=flash_attn_varlen_func):
    """Route transformers' flash_attention_2 and flex_attention paths to the stand-ins for the rest of the test
    (monkeypatch undoes it). `varlen`: another flash_attn_varlen_func, e.g. a deliberately broken one."""
    import transformers.integrations.flex_attention as flex_integration
    import transformers.masking_utils as masking
    import transformers.modeling_flash_attention_utils as fa_utils
    from torch.nn.attention import flex_attention as torch_flex
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import PreTrainedModel

    def lazy_imports(implementation, *args, **kwargs):
        return flash_attn_func, varlen, None, fa_utils._pad_input, fa_utils._unpad_input

    monkeypatch.setattr(fa_utils, "_lazy_imports", lazy_imports)
    # model construction asks whether flash-attn is installed and usable on this device (it is not on CPU): yes
    monkeypatch.setattr(PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *a, **kw: True)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)  # restored to None: the next test re-imports
    monkeypatch.setattr(masking, "create_block_mask", lambda *a, _compile=None, **kw: create_block_mask(*a, **kw))
    monkeypatch.setattr(flex_integration, "compile_friendly_flex_attention", eager_flex_attention)
    monkeypatch.setattr(torch_flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


