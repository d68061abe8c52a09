"""Exact quantities over an enumerated support.

An enumerable world lists every sequence y of every context x. Each function takes log-probabilities
over that support, shape (C, N): C contexts, N sequences per context, and averages over contexts
uniformly (the prompt distribution of the lab). Sequences with zero probability carry -inf.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.math.kl import entropy as row_entropy


def _plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """p * (log p - log q), with 0 where p = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_y p(y) log(p(y)/q(y)), averaged over contexts. logp, logq: (C, N). Returns a scalar."""
    return _plogp_ratio(logp, logq).sum(-1).mean()


def entropy(logp: Tensor) -> Tensor:
    """H(p) = -sum_y p(y) log p(y), averaged over contexts. logp: (C, N). Returns a scalar."""
    return row_entropy(logp).mean()


def expectation(logp: Tensor, values: Tensor) -> Tensor:
    """E_p[values], averaged over contexts. logp, values: (C, N). Returns a scalar."""
    return (logp.exp() * values).sum(-1).mean()


def total_variation(logp: Tensor, logq: Tensor) -> Tensor:
    """TV(p, q) = 1/2 sum_y |p(y) - q(y)|, averaged over contexts."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1).mean()
