"""Variable-length attention for padding-free packed rows, without the flash-attn package.

With packing, TRL flattens a micro-batch into one row of several conversations and passes their
boundaries (``cu_seq_lens_q``). Plain SDPA then needs a block-diagonal mask over the whole row: its
kernels (cuDNN or memory-efficient) compute every query-key pair of the row, masked or not, so the
attention work grows with the square of the *micro-batch* (4 x 2048 packed tokens: ~16x the work
of the rows' own attention) and each new length costs cuDNN a new plan (~1.7 ms of host time per
call on an H200). Measured in docs/benchmarks.md ("SFT").

Two ways to attend only within each conversation, chosen by ``backend()``:

- ``varlen`` (issue 18): PyTorch's own variable-length flash attention,
  ``torch.nn.attention.varlen.varlen_attn`` — one launch per layer for the whole packed row, however
  many conversations it holds (CUDA only; torch >= 2.10). The per-row loop's launches grew with the
  micro-batch and capped it at ~4 packed sequences (docs/benchmarks.md).
- ``loop``: SDPA once per conversation, causal and unmasked, so the flash kernel computes only each
  row's own triangle: a launch per row and layer. Used on CPU, on a torch without ``varlen_attn``,
  and when ``TUNELINE_PACKED_ATTENTION=loop`` (the benchmark's lever).

flash-attn's ``flash_attn_varlen_func`` does what ``varlen`` does and is preferred where it is
installed (``Profile.attention``). Registered under ``ATTENTION`` with transformers'
``AttentionInterface``; plain SDPA stays for anything that is not a packed row (evaluation batches,
generation).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

from tasks.runtime.hardware import PACKED_ATTENTION as ATTENTION  # the name transformers knows it by

#: ``TUNELINE_PACKED_ATTENTION``: ``auto`` (varlen where it runs, else the loop), ``varlen``, ``loop``.
BACKEND_ENV = "TUNELINE_PACKED_ATTENTION"

# The varlen kernel when packed rows use it, set by ``register`` (a module global rather than a call
# per layer, so that torch.compile traces a plain attribute read).
_varlen: Callable[..., Any] | None = None
_bounds_cache: list[Any] = [None, None]  # [cu_seq_lens tensor, its boundaries as ints]


def _boundaries(cu_seq_lens: Any) -> list[int]:
    """The row's boundaries as Python ints. The tensor is the same object in every layer of one
    forward (and in the recomputation of gradient checkpointing), so the device-to-host copy
    happens once per micro-batch, not once per layer. The cache holds the tensor, so its id
    cannot be reused by another micro-batch's tensor while it is cached."""
    if _bounds_cache[0] is not cu_seq_lens:
        _bounds_cache[0], _bounds_cache[1] = cu_seq_lens, [int(x) for x in cu_seq_lens.tolist()]
    return _bounds_cache[1]


@functools.cache
def _varlen_kernel() -> Callable[..., Any] | None:
    """torch's ``varlen_attn`` called the same way on every torch that has it, or None. Its keywords
    changed between releases (``is_causal`` in 2.10; ``window_size=(-1, 0)`` and ``enable_gqa``
    later), so they are read from its signature; without ``enable_gqa`` grouped key/value heads are
    repeated first."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params

    def attend(q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float | None) -> Any:
        if q.shape[1] != k.shape[1]:
            if gqa:
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, enable_gqa=True, **causal)
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)

    return attend


def backend(device_type: str = "cuda") -> str:
    """Which way packed rows are attended on ``device_type``: ``varlen`` or ``loop`` (see above)."""
    wanted = os.environ.get(BACKEND_ENV, "auto")
    if wanted not in ("auto", "varlen", "loop"):
        raise ValueError(f"{BACKEND_ENV}={wanted!r}: use auto, varlen or loop")
    if wanted == "loop" or device_type != "cuda":
        return "loop"
    if _varlen_kernel() is None:
        if wanted == "varlen":
            raise RuntimeError(f"{BACKEND_ENV}=varlen but this torch has no torch.nn.attention.varlen.varlen_attn")
        return "loop"
    return "varlen"


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
    p = dropout if module.training else 0.0
    if p == 0.0 and _varlen is not None and query.is_cuda:
        # [1, heads, tokens, dim] -> [tokens, heads, dim]: the layout varlen kernels take
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = max(b - a for a, b in zip(_boundaries(cu)[:-1], _boundaries(cu)[1:]))
        # the kernel launches on the current device: make it the tensors' (a process may hold two)
        with torch.cuda.device(query.device):
            out = _varlen(q, k, v, cu.to(device=query.device, dtype=torch.int32), int(max_len), scaling)
        return out.unsqueeze(0), None
    bounds = _boundaries(cu)
    if bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q ends at {bounds[-1]} but the packed row holds {query.shape[2]} tokens")
    groups = getattr(module, "num_key_value_groups", 1)
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
    built as for SDPA (used by the fallback; the packed path ignores them). Reads the backend
    (``TUNELINE_PACKED_ATTENTION``) again, so a benchmark can switch it between runs."""
    global _varlen
    import torch

    _varlen = _varlen_kernel() if torch.cuda.is_available() and backend("cuda") == "varlen" else None
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION
