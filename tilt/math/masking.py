"""Masked reductions. Every mask is True where a token counts."""
from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` (B, T) over the last axis where ``mask`` (B, T) is True. Returns (B,)."""
    return torch.where(mask, values, 0.0).sum(-1)


def picked_token_logprobs(token_log_probs: Tensor, completion_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """(B, T) log-probs of the completion tokens, picked from (B, T, V) log-softmaxes; 0 off the completion mask."""
    return token_log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1).masked_fill(~completion_mask, 0.0)


def completion_mask_from_eos(completion_ids: Tensor, eos_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The one masking convention: tokens up to and including the first EOS count, nothing after it.

    completion_ids: (B, T) long; eos_ids: (E,) long, the ids that end a completion.
    Returns ``(completion_mask (B, T) bool, truncated (B,) bool)``; ``truncated`` is True where no EOS
    appears, i.e. the completion was cut at the length limit.
    """
    is_eos = torch.isin(completion_ids, eos_ids)  # (B, T)
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # number of EOS strictly before t
    completion_mask = eos_before == 0
    truncated = ~is_eos.any(-1)
    return completion_mask, truncated
