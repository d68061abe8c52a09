"""The one two-level percentile bootstrap behind every interval on per-prompt samples (evaluation, win rates,
best-of-N, the pipelines and the experiments).

Data: K_i samples of each of P prompts, in one or more tables (a policy's rewards, a reference's rewards, ...).
Each resample draws the P prompts with replacement (the outer level) and, for each prompt, K_i of its samples with
replacement in every table (the inner level); a prompt drawn twice keeps one inner resample. The statistic of a
resample is the mean over the drawn prompts of a per-prompt statistic of the resampled samples; the interval is the
percentile interval of that statistic over the resamples (Efron & Tibshirani 1993, ch. 13; the two-stage scheme of
Davison & Hinkley 1997, §3.8). It is valid with one prompt and with one sample per prompt alike, counts the prompts
as a sample from a population, and is conservative (within-prompt noise enters twice) when there are many prompts.

Pure functions; imports torch only.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _resample_weights(shape: tuple[int, ...], size: int, generator: torch.Generator) -> Tensor:
    """(*shape, size) weights: the counts of each of ``size`` indices in ``size`` draws with replacement, / size."""
    draws = torch.randint(size, (*shape, size), generator=generator)
    counts = torch.zeros(*shape, size, dtype=torch.float64)
    return counts.scatter_add_(-1, draws, torch.ones(draws.shape, dtype=torch.float64)) / size


def two_level_bootstrap(per_prompt: Callable[[list[Tensor]], Tensor], prompts: int, samples: Sequence[int], *,
                        generator: torch.Generator, num_resamples: int = 1000, level: float = 0.95,
                        chunk: int = 100) -> tuple[float, float]:
    """Percentile interval (low, high) of mean_p per_prompt_p under two-level resampling (see the module docstring).

    per_prompt(weights): ``weights`` holds one (R, P, K_i) tensor per table (``samples`` = [K_1, K_2, ...]), row
    [r, p] the resampled weights of prompt p's K_i samples (non-negative, summing to 1; uniform 1/K_i is the data
    itself); returns (R, P), the per-prompt statistic under those weights. Resamples are drawn ``chunk`` at a time.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if num_resamples < 1 or prompts < 1 or any(k < 1 for k in samples):
        raise ValueError(f"need num_resamples, prompts and samples per prompt >= 1; got {num_resamples}, {prompts}, {list(samples)}")
    stats = []
    for start in range(0, num_resamples, chunk):
        r = min(chunk, num_resamples - start)
        prompt_weights = _resample_weights((r,), prompts, generator)  # (R, P) counts / P
        weights = [_resample_weights((r, prompts), k, generator) for k in samples]  # (R, P, K_i) each
        stats.append((prompt_weights * per_prompt(weights)).sum(-1))  # (R,)
    boot = torch.cat(stats)  # (num_resamples,)
    tail = (1 - level) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def bootstrap_mean(values: Tensor, *, generator: torch.Generator, num_resamples: int = 1000, level: float = 0.95,
                   chunk: int = 100) -> tuple[float, float, float]:
    """Mean over all entries and its two-level percentile bootstrap interval.

    values: (P, K), K samples of each of P prompts; the statistic is the mean of the prompts' means (equal to the
    overall mean, since every prompt has K samples). Returns (estimate, low, high).
    """
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty (P, K) tensor, got shape {tuple(values.shape)}")
    values = values.double()
    low, high = two_level_bootstrap(lambda w: torch.einsum("rpk,pk->rp", w[0], values), values.shape[0], [values.shape[1]],
                                    generator=generator, num_resamples=num_resamples, level=level, chunk=chunk)
    return values.mean().item(), low, high
