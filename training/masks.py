"""The three self-attention masks of BLIP-2 stage 1, as "who may see whom" boolean matrices.

Sequences are laid out as [queries; text]. Each mask has shape (batch, 1, Q + T, Q + T): row i may
attend to column j where the entry is True. Text padding is never visible as a key.

- `unimodal_mask` (ITC): queries see only queries, text sees only text.
- `bidirectional_mask` (ITM): every position sees every non-padding position.
- `multimodal_causal_mask` (ITG): queries see only queries; text sees all queries and earlier text.
"""

from __future__ import annotations

import torch


def _blocks(
    num_queries: int, text_mask: torch.Tensor, query_to_text: bool, text_to_query: bool, causal: bool
):
    batch, text_len = text_mask.shape
    device = text_mask.device
    q2q = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device)
    q2t = torch.full((num_queries, text_len), query_to_text, dtype=torch.bool, device=device)
    t2q = torch.full((text_len, num_queries), text_to_query, dtype=torch.bool, device=device)
    t2t = torch.ones(text_len, text_len, dtype=torch.bool, device=device)
    if causal:
        t2t = torch.tril(t2t)
    may_see = torch.cat([torch.cat([q2q, q2t], dim=1), torch.cat([t2q, t2t], dim=1)], dim=0)
    visible_keys = torch.cat(
        [torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_mask.bool()], 1
    )
    return may_see[None, None] & visible_keys[:, None, None, :]


def unimodal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITC: queries and text cannot see each other, so each side is encoded on its own."""
    return _blocks(num_queries, text_mask, query_to_text=False, text_to_query=False, causal=False)


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM: queries and text see each other, so the query outputs fuse both modalities."""
    return _blocks(num_queries, text_mask, query_to_text=True, text_to_query=True, causal=False)


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: text tokens see all queries and the text before them; queries never see text."""
    return _blocks(num_queries, text_mask, query_to_text=False, text_to_query=True, causal=True)


def additive(may_see: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as an additive bias (0 where visible, the dtype's minimum elsewhere)."""
    bias = torch.zeros(may_see.shape, dtype=dtype, device=may_see.device)
    return bias.masked_fill(~may_see, torch.finfo(dtype).min)
