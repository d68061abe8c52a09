"""Best-of-N and worst-of-N sampling with any reward on any ``Policy``, and sampled win rates with intervals
(InfAlign's inference-time procedures, digest §5(a)).

* best-of-N (BoN_N): draw N completions of a prompt, return the one with the highest reward;
* worst-of-N (WoN_N, "best-of-N jailbreaking"): return the one with the lowest reward.

Ties go to the first of the tied samples, which leaves the returned completion distributed like the procedure
with any fair tie rule (the samples are exchangeable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from tilt.math.bootstrap import bootstrap_mean
from tilt.math.infalign import (
    best_of_n_index,
    best_of_n_values,
    bootstrap_win_rate,
    worst_of_n_index,
    worst_of_n_values,
)
from tilt.math.masking import masked_sum
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy, Rollout


@dataclass(frozen=True)
class Selection:
    """The completion a procedure returns for each prompt. P prompts, N samples each."""

    prompts: list  # (P,)
    completions: list  # (P,) the selected completion of each prompt
    rewards: Tensor  # (P,) float64, its reward
    index: Tensor  # (P,) long, its position among the prompt's N samples
    all_rewards: Tensor  # (P, N) float64, the reward of every sample
    rollout: Rollout  # the P * N samples, grouped by prompt


@torch.no_grad()
def _sample_and_pick(policy: Policy, prompts: Sequence[Any], n: int, reward_fn: RewardFn, generator: torch.Generator, pick) -> Selection:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rollout = policy.sample(list(prompts), n, generator=generator, exact=True)
    all_rewards = score_rewards(reward_fn, rollout.prompts, rollout.completions).view(-1, n)  # (P, N)
    index = pick(all_rewards)  # (P,)
    flat = torch.arange(all_rewards.shape[0]) * n + index  # (P,) position in the rollout
    return Selection(
        prompts=list(prompts),
        completions=[rollout.completions[i] for i in flat.tolist()],
        rewards=all_rewards.gather(1, index.unsqueeze(1)).squeeze(1),
        index=index,
        all_rewards=all_rewards,
        rollout=rollout,
    )


def best_of_n(policy: Policy, prompts: Sequence[Any], n: int, reward_fn: RewardFn, *, generator: torch.Generator) -> Selection:
    """BoN_N: N samples of each prompt from ``policy``, scored with ``reward_fn``; the highest-reward one is kept."""
    return _sample_and_pick(policy, prompts, n, reward_fn, generator, best_of_n_index)


def worst_of_n(policy: Policy, prompts: Sequence[Any], n: int, reward_fn: RewardFn, *, generator: torch.Generator) -> Selection:
    """WoN_N: N samples of each prompt from ``policy``, scored with ``reward_fn``; the lowest-reward one is kept."""
    return _sample_and_pick(policy, prompts, n, reward_fn, generator, worst_of_n_index)


@torch.no_grad()
def evaluate_win_rates(
    policy: Policy,
    ref: Policy,
    reward_fn: RewardFn,
    prompts: Sequence[Any],
    *,
    n: int,
    groups: int,
    generator: torch.Generator,
    num_resamples: int = 1000,
    level: float = 0.95,
) -> dict[str, float]:
    """Sampled win rates of ``policy`` against ``ref`` with percentile bootstrap intervals (ties count 1/2):

    * ``win_rate_standard``: one sample of pi against one of pi_ref, over all ``groups * n`` samples of each;
    * ``win_rate_bon`` / ``win_rate_won``: BoN_N(pi) against BoN_N(pi_ref) (resp. WoN), ``groups`` selections each;
    * ``kl``: the mean k1 estimate of KL(pi || pi_ref) on the policy's samples (unbiased; digest §1.2), with a
      two-level bootstrap interval (``tilt.math.bootstrap.bootstrap_mean``), like the win rates'.
    Each win rate comes with ``*_low`` and ``*_high``. Draws groups * n samples per prompt from each policy.
    """
    k = groups * n
    rollout = policy.sample(list(prompts), k, generator=generator, exact=True)
    ref_rollout = ref.sample(list(prompts), k, generator=generator, exact=True)
    rewards = score_rewards(reward_fn, rollout.prompts, rollout.completions).view(-1, k)  # (P, k)
    ref_rewards = score_rewards(reward_fn, ref_rollout.prompts, ref_rollout.completions).view(-1, k)  # (P, k)
    log_ratio = masked_sum(policy.token_logprobs(rollout) - ref.token_logprobs(rollout), rollout.completion_mask)  # (P*k,)

    out: dict[str, float] = {}
    pairs = {
        "win_rate_standard": (rewards, ref_rewards),
        "win_rate_bon": (best_of_n_values(rewards, n), best_of_n_values(ref_rewards, n)),
        "win_rate_won": (worst_of_n_values(rewards, n), worst_of_n_values(ref_rewards, n)),
    }
    for name, (a, b) in pairs.items():
        est, low, high = bootstrap_win_rate(a, b, generator=generator, num_resamples=num_resamples, level=level)
        out.update({name: est, f"{name}_low": low, f"{name}_high": high})
    kl, kl_low, kl_high = bootstrap_mean(log_ratio.view(-1, k), generator=generator, num_resamples=num_resamples, level=level)
    out.update(kl=kl, kl_low=kl_low, kl_high=kl_high, n=n, samples_per_prompt=k)
    return out
