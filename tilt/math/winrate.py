"""Win rates: the one tie rule and the one exact win rate (digest §5(a), definition [R]).

    W_r(pi_1 > pi_2) = E_{y~pi_1, z~pi_2}[ 1{r(y) > r(z)} + 1/2 * 1{r(y) = r(z)} ]

a tie counts one half, so W(p > q) + W(q > p) = 1 and W(p > p) = 1/2. Under a Bradley-Terry judge of scale s the
indicator becomes sigma(s (r(y) - r(z))). Every win rate in tilt (the preference oracles, InfAlign's calibrated
reward and win rates, the evaluation, the labs) is built on ``win_probability``; every exact one on
``exact_win_rate``. Pure functions; imports torch only.
"""
from __future__ import annotations

import torch
from torch import Tensor


def win_probability(rewards_a: Tensor, rewards_b: Tensor, *, scale: float | None = None) -> Tensor:
    """P(a is preferred to b) for each pair: sigma(scale * (r(a) - r(b))) under Bradley-Terry, or, with
    ``scale=None``, the deterministic comparison 1[r(a) > r(b)] + 1/2 * 1[r(a) = r(b)] (a tie counts half).
    Shapes broadcast. Returns a float tensor of the broadcast shape (float64 for integer rewards)."""
    if not rewards_a.is_floating_point():
        rewards_a = rewards_a.double()
    if scale is None:
        return (rewards_a > rewards_b).to(rewards_a.dtype) + 0.5 * (rewards_a == rewards_b).to(rewards_a.dtype)
    return torch.sigmoid(scale * (rewards_a - rewards_b))


def exact_win_rate(probs: Tensor, other_probs: Tensor, rewards: Tensor, *, scale: float | None = None) -> Tensor:
    """W_r(p > q) = sum_{y,z} p(y) q(z) w(y, z) over an enumerated support, w = ``win_probability`` (ties count
    half, or Bradley-Terry of ``scale``).

    probs, other_probs, rewards: (..., K), probabilities and rewards of the K sequences of each prompt. Returns
    (...,), per prompt, not averaged (the caller takes the mean over prompts). W(p > q) + W(q > p) = 1.
    """
    wins = win_probability(rewards.unsqueeze(-1), rewards.unsqueeze(-2), scale=scale)  # (..., K, K): y row, z column
    return (probs.unsqueeze(-1) * wins * other_probs.unsqueeze(-2)).sum((-1, -2))
