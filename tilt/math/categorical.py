"""Inverse-CDF sampling of a categorical distribution given by logits, without a full-vocabulary cumulative sum.

The draw is the one ``tilt.math.sampling.inverse_cdf_sample`` makes, y = min{i : F(i) > u * F(V)} with
F the cumulative sum of the unnormalised probabilities, but found in two levels: first the block of
``block`` consecutive tokens that holds the crossing (from the cumulative sum of the block totals), then the
token inside that block (a cumulative sum over ``block`` entries only). On CPU a cumulative sum is a
sequential scan, ~20x slower per element than a sum, and over a 32k-50k vocabulary it cost more than the
model's own forward pass on small models; the two-level search touches every entry once with a vectorised
sum and scans only (V / block + block) entries per row.

The two searches sum in a different order from one long scan, so at a float32 rounding boundary the token
may differ from ``inverse_cdf_sample``'s; the law is the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _last_positive_index(cdf: Tensor) -> Tensor:
    """(B, 1) index of the last entry with positive mass, for a non-decreasing cumulative sum cdf (B, N)."""
    return torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)


def sample_from_logits(logits: Tensor, uniforms: Tensor, *, block: int = 256) -> tuple[Tensor, Tensor]:
    """Exact inverse-CDF draw from softmax(logits) and the draw's log-probability.

    logits (B, V) float (entries may be -inf: zero mass), uniforms (B,) in [0, 1).
    Returns ``(y (B,) long, logp (B,) float)`` with logp = log softmax(logits)[y], the log of the drawn
    token's softmax probability (absolute error ~1e-7 in float32, as log of a normalised float: a token
    whose probability underflows float32, < 1e-38, is never drawn in practice). A zero-probability token
    is never returned. One fused softmax pass over the vocabulary, then sums and short scans.
    """
    b, v = logits.shape
    probs = torch.softmax(logits, dim=-1)  # (B, V), one fused pass
    n_blocks = -(-v // block)
    padded = F.pad(probs, (0, n_blocks * block - v)) if n_blocks * block != v else probs  # zero mass in the pad
    blocks = padded.view(b, n_blocks, block)  # (B, nb, block)
    block_cdf = blocks.sum(-1).cumsum(-1)  # (B, nb)
    target = uniforms.to(probs.dtype).unsqueeze(-1) * block_cdf[:, -1:]  # (B, 1)
    j = torch.searchsorted(block_cdf, target, right=True)  # (B, 1) first block whose cdf exceeds the target
    j = torch.minimum(j, _last_positive_index(block_cdf))  # rounding at the top end must not reach a zero block
    before = torch.where(j > 0, block_cdf.gather(-1, (j - 1).clamp(min=0)), torch.zeros_like(target))  # (B, 1)
    inner = blocks.gather(1, j.unsqueeze(-1).expand(b, 1, block)).squeeze(1)  # (B, block)
    inner_cdf = inner.cumsum(-1)  # (B, block)
    i = torch.searchsorted(inner_cdf, target - before, right=True)  # (B, 1)
    i = torch.minimum(i, _last_positive_index(inner_cdf))
    y = (j * block + i).squeeze(-1)  # (B,)
    logp = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1).log()  # (B,)
    return y, logp
