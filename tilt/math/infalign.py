"""Inference-aware alignment as tensor math: calibrated rewards, reward transforms, best-of-N and worst-of-N
selection, their exact distributions, and win rates (Balashankar et al. 2024, "InfAlign"; digest §5).

Win rate, with ties counted as one half (digest §5(a), definition [R]):

    W_r(pi_1 > pi_2) = E_{y~pi_1, z~pi_2}[ 1{r(y) > r(z)} + 1/2 * 1{r(y) = r(z)} ]

Calibrated reward: the quantile of r(y) among reference samples, C(y) = W_r(y > pi_ref). Under pi_ref its mean
is exactly 1/2, ties included, and it does not change under any strictly increasing map of r (digest §5(a) [D]).

Transforms Phi of the calibrated reward u in [0, 1] (digest §5(a) CTRL):
  * identity Phi(u) = u: optimal for the standard win rate at any KL (digest §5(a) [D]);
  * best-of-N: Phi(u) = exp(t u), t > 0;
  * worst-of-N: Phi(u) = -exp(-t u), t > 0 (increasing in u).
The policy pi ∝ pi_ref exp(Phi(C)/beta) depends on Phi and beta only through Phi/beta, so a positive affine map
of Phi only rescales beta. The ``unit_*`` forms map [0, 1] onto [0, 1], which keeps beta and the RL reward on one
scale whatever t is; the paper's forms are given too.

The exact discrete formula for best-of-N (digest §5(b), E4.1; Beirami et al. 2024): with responses sorted by
reward and F_i the reference CDF, BoN(y_(i)) = F_i^N - F_{i-1}^N. Here generalised to ties: a tie class S takes
F(<=S)^N - F(<S)^N and shares it in proportion to pi(y) within S (which is what picking any one of the tied
samples gives, by exchangeability).

All functions are pure and import torch only. Shapes: K responses per prompt, ``...`` any leading prompt dims.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tilt.math.bootstrap import two_level_bootstrap
from tilt.math.winrate import exact_win_rate, win_probability  # the one tie rule and exact win rate (re-exported)

# --- calibration -------------------------------------------------------------------------------------------------


def calibrated_reward(rewards: Tensor, ref_rewards: Tensor) -> Tensor:
    """Empirical calibrated reward C(y) = (1/m) sum_j [1{r(z_j) < r(y)} + 1/2 * 1{r(z_j) = r(y)}]
    (digest §5(a), the CTRL calibration step): the tie rule of ``tilt.math.winrate``, counted by binary search in
    the sorted reference rewards (O((B + m) log m), not the B x m comparisons).

    rewards: (..., B) rewards of the completions to calibrate; ref_rewards: (..., m) rewards of m reference
    samples of the same prompt (leading dims equal). Returns (..., B) in [0, 1], on the grid of 1/(2m).
    """
    ref_sorted = ref_rewards.sort(dim=-1).values.contiguous()
    rewards = rewards.to(ref_sorted.dtype).contiguous()
    below = torch.searchsorted(ref_sorted, rewards, right=False)  # (..., B) count of r(z) < r(y)
    at_or_below = torch.searchsorted(ref_sorted, rewards, right=True)  # (..., B) count of r(z) <= r(y)
    return (below + at_or_below).to(rewards.dtype) / (2 * ref_rewards.shape[-1])


def exact_calibrated_reward(rewards: Tensor, ref_probs: Tensor) -> Tensor:
    """Population calibrated reward C(y) = P_{z~pi_ref}[r(z) < r(y)] + 1/2 P_{z~pi_ref}[r(z) = r(y)] over an
    enumerated support. rewards, ref_probs: (..., K). Returns (..., K)."""
    return (ref_probs.unsqueeze(-2) * _beats(rewards.unsqueeze(-1), rewards.unsqueeze(-2))).sum(-1)


def _beats(a: Tensor, b: Tensor) -> Tensor:
    """1{a > b} + 1/2 * 1{a = b} (``tilt.math.winrate.win_probability``), elementwise with broadcasting, as float64."""
    return win_probability(a.double(), b.double())


# --- transforms --------------------------------------------------------------------------------------------------


def identity_transform(calibrated: Tensor) -> Tensor:
    """Phi(u) = u: calibrated RLHF, optimal for the standard win rate (digest §5(a) [D])."""
    return calibrated


def exp_transform(calibrated: Tensor, *, t: float) -> Tensor:
    """Phi(u) = exp(t u), the best-of-N transform of the paper (digest §5(a); t > 0 [V-text author thread])."""
    return torch.exp(t * calibrated)


def neg_exp_transform(calibrated: Tensor, *, t: float) -> Tensor:
    """Phi(u) = -exp(-t u), the worst-of-N transform of the paper (digest §5(a), §6.3: increasing in u)."""
    return -torch.exp(-t * calibrated)


def unit_exp_transform(calibrated: Tensor, *, t: float) -> Tensor:
    """(exp(t u) - 1) / (exp(t) - 1): ``exp_transform`` mapped affinely onto [0, 1] (same policies, beta rescaled
    by 1/(exp(t) - 1)). Increasing for any t != 0."""
    if t == 0:
        raise ValueError("t must be non-zero (t -> 0 is the identity transform)")
    if t < 0:
        return torch.expm1(t * calibrated) / math.expm1(t)
    # = exp(t (u - 1)) (1 - exp(-t u)) / (1 - exp(-t)): no overflow at large t
    return torch.exp(t * (calibrated - 1)) * torch.expm1(-t * calibrated) / math.expm1(-t)


def unit_neg_exp_transform(calibrated: Tensor, *, t: float) -> Tensor:
    """(1 - exp(-t u)) / (1 - exp(-t)): ``neg_exp_transform`` mapped affinely onto [0, 1] (same policies, beta
    rescaled by 1/(1 - exp(-t))). Increasing for any t != 0."""
    if t == 0:
        raise ValueError("t must be non-zero (t -> 0 is the identity transform)")
    if t > 0:
        return torch.expm1(-t * calibrated) / math.expm1(-t)
    return torch.exp(-t * (calibrated - 1)) * torch.expm1(t * calibrated) / math.expm1(t)


# --- best-of-N / worst-of-N selection ----------------------------------------------------------------------------


def best_of_n_index(group_rewards: Tensor) -> Tensor:
    """Index of the highest reward in each group. group_rewards: (P, N). Returns (P,) long; ties go to the first
    (torch.argmax's rule), which leaves the selected response distributed like BoN_N with any fair tie rule."""
    return group_rewards.argmax(dim=-1)


def worst_of_n_index(group_rewards: Tensor) -> Tensor:
    """Index of the lowest reward in each group. group_rewards: (P, N). Returns (P,) long, first on ties."""
    return group_rewards.argmin(dim=-1)


def best_of_n_values(rewards: Tensor, n: int) -> Tensor:
    """Maximum reward of consecutive groups of n: rewards (..., G * n) -> (..., G)."""
    return rewards.unflatten(-1, (-1, n)).amax(-1)


def worst_of_n_values(rewards: Tensor, n: int) -> Tensor:
    """Minimum reward of consecutive groups of n: rewards (..., G * n) -> (..., G)."""
    return rewards.unflatten(-1, (-1, n)).amin(-1)


# --- exact distributions over an enumerated support --------------------------------------------------------------


def _cdf_below_and_at(probs: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(F(<r(y)), F(<=r(y))) for each y: probs, rewards (..., K) -> two (..., K)."""
    z = rewards.unsqueeze(-2)  # (..., 1, K)
    y = rewards.unsqueeze(-1)  # (..., K, 1)
    p = probs.unsqueeze(-2)
    below = (p * (z < y)).sum(-1)
    at_or_below = (p * (z <= y)).sum(-1)
    return below, at_or_below


def _share_of_class(probs: Tensor, class_mass: Tensor, below: Tensor, at_or_below: Tensor) -> Tensor:
    """pi(y) / pi(S) * mass, with 0 where pi(S) = 0."""
    tie_mass = at_or_below - below  # (..., K) pi(S) of y's tie class
    safe = torch.where(tie_mass > 0, tie_mass, torch.ones_like(tie_mass))
    return torch.where(tie_mass > 0, probs * class_mass / safe, torch.zeros_like(probs))


def best_of_n_probs(probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Exact distribution of BoN_N(pi): pi(y)/pi(S_y) * (F(<=r_y)^N - F(<r_y)^N), S_y the tie class of y
    (digest §5(b): BoN(y_(i)) = F_i^N - F_{i-1}^N without ties). probs, rewards: (..., K). Returns (..., K)."""
    below, at_or_below = _cdf_below_and_at(probs, rewards)
    return _share_of_class(probs, at_or_below.pow(n) - below.pow(n), below, at_or_below)


def worst_of_n_probs(probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Exact distribution of WoN_N(pi): pi(y)/pi(S_y) * ((1 - F(<r_y))^N - (1 - F(<=r_y))^N). (..., K) -> (..., K)."""
    below, at_or_below = _cdf_below_and_at(probs, rewards)
    return _share_of_class(probs, (1 - below).pow(n) - (1 - at_or_below).pow(n), below, at_or_below)


# --- closed forms (continuous reward, no ties) -------------------------------------------------------------------


def best_of_n_kl_closed_form(n: int) -> float:
    """KL(BoN_N(pi_ref) || pi_ref) = log N - (N - 1)/N with a continuous reward; an upper bound in general
    (Beirami et al. 2024; digest §5(b))."""
    return math.log(n) - (n - 1) / n


def best_of_n_win_rate_closed_form(n: int) -> float:
    """W_r(BoN_N(pi_ref) > pi_ref) = N/(N + 1) with a continuous reward; an upper bound in general (digest §5(b))."""
    return n / (n + 1)


# --- win rates from samples, with bootstrap intervals -------------------------------------------------------------


def pairwise_win_rate(rewards: Tensor, other_rewards: Tensor) -> Tensor:
    """Per-prompt win rate from samples: mean over all pairs (i, j) of 1{a_i > b_j} + 1/2 1{a_i = b_j}.

    rewards: (P, A) rewards of samples of the first side; other_rewards: (P, B) of the second side, same prompts.
    Returns (P,), not averaged over prompts (the caller takes the mean over prompts).
    """
    return _beats(rewards.unsqueeze(-1), other_rewards.unsqueeze(-2)).mean((-1, -2))


def bootstrap_win_rate(
    rewards: Tensor, other_rewards: Tensor, *, generator: torch.Generator, num_resamples: int = 1000, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean win rate over prompts and its percentile bootstrap interval (``tilt.math.bootstrap.two_level_bootstrap``:
    prompts with replacement and, within each drawn prompt, both sides' samples with replacement, so it is valid
    with one prompt and with one sample per prompt alike).
    rewards: (P, A); other_rewards: (P, B). Returns (estimate, low, high). Cost: num_resamples * P * A * B.
    """
    beats = _beats(rewards.unsqueeze(-1), other_rewards.unsqueeze(-2))  # (P, A, B)
    p, a, b = beats.shape
    low, high = two_level_bootstrap(lambda w: torch.einsum("rpa,pab,rpb->rp", w[0], beats, w[1]), p, [a, b],
                                    generator=generator, num_resamples=num_resamples, level=level)
    return beats.mean().item(), low, high


def bootstrap_win_rate_difference(
    rewards_a: Tensor, rewards_b: Tensor, ref_rewards: Tensor, *, generator: torch.Generator, num_resamples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """W(a > ref) - W(b > ref), the gap between two policies' win rates against the SAME reference draws, with a
    paired percentile bootstrap interval: each resample draws the prompts once for both policies and the reference
    samples once for both, so the reference's own noise cancels in the difference (unlike two separate intervals).

    rewards_a: (P, A), rewards_b: (P, B), ref_rewards: (P, C), row i for prompt i (for inference-time win rates,
    pass best-of-N or worst-of-N values). Returns (estimate, low, high).
    """
    if not rewards_a.shape[0] == rewards_b.shape[0] == ref_rewards.shape[0]:
        raise ValueError(f"the three reward tables must have one row per prompt; got {rewards_a.shape[0]}, "
                         f"{rewards_b.shape[0]}, {ref_rewards.shape[0]} rows")
    beats_a = _beats(rewards_a.unsqueeze(-1), ref_rewards.unsqueeze(-2))  # (P, A, C)
    beats_b = _beats(rewards_b.unsqueeze(-1), ref_rewards.unsqueeze(-2))  # (P, B, C)
    p, a, c = beats_a.shape

    def gap(w: list[Tensor]) -> Tensor:  # (R, P); w[2], the reference's resample, is shared by both sides
        return torch.einsum("rpa,pac,rpc->rp", w[0], beats_a, w[2]) - torch.einsum("rpb,pbc,rpc->rp", w[1], beats_b, w[2])

    low, high = two_level_bootstrap(gap, p, [a, beats_b.shape[1], c], generator=generator, num_resamples=num_resamples,
                                    level=level)
    return beats_a.mean().item() - beats_b.mean().item(), low, high