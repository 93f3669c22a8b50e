"""Variable-length attention for padding-free packed rows, without the flash-attn package.

With packing, TRL flattens a micro-batch into one row of several conversations and passes their
boundaries (``cu_seq_lens_q``). Plain SDPA then needs a block-diagonal mask over the whole row: its
kernels (cuDNN or memory-efficient) compute every query-key pair of the row, masked or not, so the
attention work grows with the square of the *micro-batch* (4 x 2048 packed tokens: ~16x the work
of the rows' own attention) and each new length costs cuDNN a new plan (~1.7 ms of host time per
call on an H200). Measured in docs/benchmarks.md ("SFT").

``packed_sdpa`` runs SDPA once per conversation, causal and unmasked, so the flash kernel computes
only each row's own triangle. flash-attn's ``flash_attn_varlen_func`` does the same in one launch
and is preferred where it is installed (``Profile.attention``); transformers ships no varlen SDPA,
hence this small loop (a launch per row and layer: its host cost starts to show at 16k tokens per
micro-batch; PyTorch's nested-tensor SDPA, one launch for all rows, was not tried). It registers
under ``ATTENTION`` with transformers' ``AttentionInterface`` and keeps plain SDPA for anything
that is not a packed row (evaluation batches, generation).
"""

from __future__ import annotations

from typing import Any

from tasks.hardware import PACKED_ATTENTION as ATTENTION  # the name transformers knows it by

_bounds_cache: list[Any] = [None, None]  # [cu_seq_lens tensor, its boundaries as ints]


def _boundaries(cu_seq_lens: Any) -> list[int]:
    """The row's boundaries as Python ints. The tensor is the same object in every layer of one
    forward (and in the recomputation of gradient checkpointing), so the device-to-host copy
    happens once per micro-batch, not once per layer. The cache holds the tensor, so its id
    cannot be reused by another micro-batch's tensor while it is cached."""
    if _bounds_cache[0] is not cu_seq_lens:
        _bounds_cache[0], _bounds_cache[1] = cu_seq_lens, [int(x) for x in cu_seq_lens.tolist()]
    return _bounds_cache[1]


def packed_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: ``query`` is ``[batch, heads, tokens, dim]``, key and value
    may have fewer (grouped) heads; returns ``[batch, tokens, heads, dim]``."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or query.shape[2] == 1 or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    bounds = _boundaries(cu)
    if bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q ends at {bounds[-1]} but the packed row holds {query.shape[2]} tokens")
    groups = getattr(module, "num_key_value_groups", 1)
    p = dropout if module.training else 0.0
    outs = []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                outs.append(
                    torch.nn.functional.scaled_dot_product_attention(
                        query[:, :, start:end],
                        key[:, :, start:end],
                        value[:, :, start:end],
                        dropout_p=p,
                        is_causal=True,
                        scale=scaling,
                        enable_gqa=groups > 1,
                    )
                )
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``attn_implementation=ATTENTION`` known to transformers; returns the name. Masks are
    built as for SDPA (used by the fallback; the packed path ignores them)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION
