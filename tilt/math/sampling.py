"""Sampling a categorical distribution from given uniforms, so randomness can be assigned per prompt."""
from __future__ import annotations

import torch
from torch import Tensor


def inverse_cdf_sample(probs: Tensor, uniforms: Tensor) -> Tensor:
    """y_b = the first index whose cumulative probability exceeds u_b * total, for probs (B, V) and uniforms (B,)
    in [0, 1). Exact inverse-CDF sampling; a zero-probability index is never returned. Returns (B,) long."""
    cdf = probs.cumsum(-1)  # (B, V)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sampling_uniforms(num_prompts: int, samples_per_prompt: int, steps: int, *, generator: torch.Generator | None = None,
                      prompt_seeds=None, dtype: torch.dtype = torch.float64) -> Tensor:
    """(P * K, steps) uniforms that drive sampling. With ``prompt_seeds`` (one int per prompt) the K rows of
    prompt p come from a generator seeded with ``prompt_seeds[p]``, so a prompt's completions do not depend on
    which other prompts share its batch (or its process); otherwise all rows come from ``generator``."""
    if prompt_seeds is None:
        return torch.rand(num_prompts * samples_per_prompt, steps, generator=generator, dtype=dtype)
    if len(prompt_seeds) != num_prompts:
        raise ValueError(f"{len(prompt_seeds)} prompt seeds for {num_prompts} prompts")
    rows = [torch.rand(samples_per_prompt, steps, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in prompt_seeds]
    return torch.cat(rows)
