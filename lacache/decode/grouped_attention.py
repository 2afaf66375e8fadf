"""Masked grouped-query attention without copying keys and values out to every query head.

transformers' SDPA path lets SDPA read grouped key/value heads (``enable_gqa``) only when no mask is
passed: on CUDA, SDPA's masked kernels have no grouped-query mode. Any forward that needs a mask, such
as every chunk of a chunked prefill after the first (its queries see the held slots and a causal
block of their own), therefore copies each layer's keys and values out to all query heads
(``repeat_kv``). For an 8B model (32 query heads, 8 KV heads) and a 512-token chunk over 4,096 held
slots, that is 75 MB written and read again per layer: 2.6 ms of a 26 ms chunk on an H200
(``docs/PERFORMANCE.md``).

:func:`grouped_sdpa_attention` asks for no copy. The ``g`` query heads that share a key/value head are
stacked as ``g * q_len`` query rows of that head, and the mask's rows are repeated ``g`` times to
match. Each row is the same dot products and the same softmax as before; only the kernel's tiling
differs. Results therefore match transformers' attention up to rounding, not bit for bit.

A chunk's mask is usually nothing but causal over the slots before it: query ``i`` of ``q_len`` sees
keys ``0 .. kv_len - q_len + i`` (no padding, no sliding window). transformers still builds it as a
tensor, which rules out flash attention. The mask function registered with this attention hands such a
forward torch's lower-right :class:`~torch.nn.attention.bias.CausalBias` instead. Flash attention then
computes it from the two lengths and reads the grouped heads itself: no mask, no copy. Where flash
cannot run (a CPU, fp32, an old torch), the bias becomes the bool mask it stands for and takes the
packed path.

So it serves the fast paths only (``cache.decode=fast|triton``, where the decode step already differs
by rounding), through :func:`grouped_attention`. The exact path keeps transformers' own attention.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right

ATTENTION_NAME = "lacache_grouped_sdpa"


def _flash_reads_groups(query, key, value, dropout: float) -> bool:
    """Whether SDPA's flash kernel takes these tensors, grouped heads as they are."""
    if not query.is_cuda:
        return False
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, None, dropout, False, True)  # as CausalBias asks
    except TypeError:  # torch < 2.5: SDPA has no grouped-query mode
        return False
    return torch.backends.cuda.can_use_flash_attention(params)


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' attention-function signature: ``query`` (batch, heads, q_len, dim), ``key``/``value``
    (batch, kv_heads, kv_len, dim); returns (batch, q_len, heads, dim) and no weights.

    A masked multi-row forward with grouped heads runs packed (see the module docstring). Every other
    call goes to transformers' SDPA function unchanged: no mask, one query row, no grouping, a position
    bias, or a mask whose head dimension is neither 1 nor ``heads``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    mask = attention_mask
    if isinstance(mask, CausalBias):
        if _flash_reads_groups(query, key, value, dropout):
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                                   scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None
        mask = torch.ones(mask.seq_len_q, mask.seq_len_kv, dtype=torch.bool, device=query.device).tril(
            mask.seq_len_kv - mask.seq_len_q)[None, None]
        attention_mask = mask
    if (groups == 1 or rows == 1 or mask is None or mask.dim() != 4 or mask.shape[1] not in (1, heads)
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # query head h = k * groups + j reads key/value head k (transformers' repeat_kv order): row j * rows + i of head k
    packed = query.reshape(batch, kv_heads, groups * rows, dim)
    mask_batch, mask_heads, _, keys = mask.shape
    if mask_heads == 1:
        mask = mask[:, :, None].expand(mask_batch, 1, groups, rows, keys).reshape(mask_batch, 1, groups * rows, keys)
    else:
        mask = mask.reshape(mask_batch, kv_heads, groups * rows, keys)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(out.shape[0], heads, rows, value.shape[-1]).transpose(1, 2).contiguous(), None


def lower_right_or_sdpa_mask(*args, **kwargs):
    """transformers' SDPA mask, except for a multi-token forward whose mask would be plain causal over
    every slot before it (no padding, window or extra mask function, offsets that put the queries
    last): then a lower-right :class:`CausalBias` of the two lengths. Mask functions of transformers
    versions that pass other arguments get the SDPA mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    q_length, kv_length, q_offset = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("q_offset")
    if (not args and kwargs.get("mask_function") is causal_mask_function and kwargs.get("attention_mask") is None
            and kwargs.get("local_size") is None and kwargs.get("allow_is_causal_skip", True)
            and kwargs.get("kv_offset", 0) == 0 and isinstance(q_offset, int) and isinstance(q_length, int)
            and q_offset > 0 and q_length > 1 and q_offset + q_length == kv_length):
        return causal_lower_right(q_length, kv_length)
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, lower_right_or_sdpa_mask)


@contextlib.contextmanager
def grouped_attention(model: torch.nn.Module, enabled: bool = True):
    """Within the context, a model loaded with ``attn_implementation="sdpa"`` attends through
    :func:`grouped_sdpa_attention`; any other implementation (eager, flash-attention) is left as is."""
    config = model.config
    usual = getattr(config, "_attn_implementation", None)
    if not enabled or usual != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = usual
