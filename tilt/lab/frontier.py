"""A lab world for the frontier: P prompts, each with K enumerated responses, where every point of the frontier is
exact (``tilt.math.frontier`` on the exact probabilities) and the estimate from m reference samples can be checked
against it.

Each prompt: pi_ref ~ Dirichlet(alpha) over K responses (alpha = 1 as in tilt.lab.ctrl, digest §5(e) E4.5); a reward
r ~ N(0, 1) per response, rounded to ``tie_step`` (0 = no rounding) so that, as with VADER, many responses tie;
``zero_mass`` of pi_ref's mass is moved onto responses whose reward is exactly 0 (VADER's "no sentiment word").
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.recipes.common import derive_seed


def frontier_world(prompts: int, responses: int, *, seed: int, tie_step: float = 0.0, zero_mass: float = 0.0,
                   alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """(probs (P, K), rewards (P, K)) of the world described in the module docstring."""
    if prompts < 1 or responses < 2 or not 0 <= zero_mass < 1 or tie_step < 0 or alpha <= 0:
        raise ValueError("need prompts >= 1, responses >= 2, 0 <= zero_mass < 1, tie_step >= 0, alpha > 0")
    g = torch.Generator().manual_seed(derive_seed(seed, "frontier-world"))
    gamma = torch.distributions.Gamma(torch.full((prompts, responses), float(alpha), dtype=torch.float64), 1.0)
    torch.manual_seed(derive_seed(seed, "frontier-world", "gamma"))
    draws = gamma.sample()
    probs = draws / draws.sum(-1, keepdim=True)
    rewards = torch.randn(prompts, responses, generator=g, dtype=torch.float64)
    if tie_step > 0:
        rewards = torch.round(rewards / tie_step) * tie_step
    if zero_mass > 0:  # the first tenth of the responses score 0 and hold zero_mass of the reference's mass
        k0 = max(1, responses // 10)
        rewards[:, :k0] = 0.0
        probs[:, :k0] *= zero_mass / probs[:, :k0].sum(-1, keepdim=True)
        probs[:, k0:] *= (1 - zero_mass) / probs[:, k0:].sum(-1, keepdim=True)
    return probs, rewards


def sample_rewards(probs: Tensor, rewards: Tensor, samples_per_prompt: int, *, generator: torch.Generator) -> Tensor:
    """(P, m) rewards of m independent draws of each prompt's reference distribution."""
    idx = torch.multinomial(probs, samples_per_prompt, replacement=True, generator=generator)
    return rewards.gather(-1, idx)
