"""Policy-gradient pieces for KL-regularised RL (Korbak, Perez, Buckley 2022; digest §1.3, §2(a)).

The objective is J_KL(pi) = E_pi[r] - beta * KL(pi || pi_ref), maximised by the tilted target
pi* ∝ pi_ref * exp(r / beta). Its score-function gradient is

    ∇J_KL = E_{y~pi}[ (r(y) - beta * log(pi(y)/pi_ref(y)) - b) ∇log pi(y) ]

for any baseline b that does not depend on y (digest §1.3). All losses here are *minimised* and returned per
sequence, shape (B,); the caller reduces.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.math.masking import masked_sum


def kl_shaped_reward(rewards: Tensor, seq_logprobs: Tensor, ref_seq_logprobs: Tensor, *, beta: float) -> Tensor:
    """r'(y) = r(y) - beta * (log pi(y) - log pi_ref(y)), the KL-shaped reward (Korbak et al. 2022, §2 eq. for r'_theta).

    rewards, seq_logprobs, ref_seq_logprobs: (B,), detached. Returns (B,). With beta = 0 this is pure RL.
    At the optimum pi = pi*, r' equals beta * log Z for every y.
    """
    return rewards - beta * (seq_logprobs - ref_seq_logprobs)


def leave_one_out_advantage(group_rewards: Tensor) -> Tensor:
    """RLOO advantage (Kool et al. 2019; Ahmadian et al. 2024): each sample's reward minus the mean of the
    *other* K-1 samples of the same prompt, an unbiased baseline.

    group_rewards: (P, K), K >= 2 samples of each of P prompts. Returns (P, K).
    Equals K/(K-1) * (r_i - mean_j r_j); exactly zero when all K rewards are equal.
    """
    k = group_rewards.shape[-1]
    if k < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt (samples_per_prompt >= 2)")
    total = group_rewards.sum(-1, keepdim=True)
    return group_rewards - (total - group_rewards) / (k - 1)


def reinforce_loss(token_logprobs: Tensor, advantages: Tensor, completion_mask: Tensor) -> Tensor:
    """-A(y) * log pi(y), per sequence, with log pi(y) the sum over counted tokens.

    token_logprobs: (B, T) with grad; advantages: (B,) detached; completion_mask: (B, T) bool.
    Returns (B,). Its expected gradient is -∇J for the objective whose advantage A is.
    """
    return -advantages * masked_sum(token_logprobs, completion_mask)


def ppo_clip_loss(
    token_logprobs: Tensor,
    old_token_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    clip_eps: float,
) -> tuple[Tensor, Tensor]:
    """PPO-clip surrogate (Schulman et al. 2017, eq. 7) with per-token ratios and a sequence-level advantage.

    loss_t = -min(rho_t * A, clip(rho_t, 1-eps, 1+eps) * A),  rho_t = pi(y_t|.)/pi_old(y_t|.)
    summed over the counted tokens of each sequence. At rho = 1 its gradient equals ``reinforce_loss``'s,
    so the first epoch on fresh samples is exactly REINFORCE.

    token_logprobs: (B, T) with grad; old_token_logprobs: (B, T) detached; advantages: (B,);
    completion_mask: (B, T) bool. Returns ``(loss (B,), clipped_fraction (B,))``, not reduced.
    """
    ratio = torch.exp(token_logprobs - old_token_logprobs)  # (B, T)
    adv = advantages.unsqueeze(-1)  # (B, 1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    was_clipped = (clipped < unclipped).float()
    n_tokens = completion_mask.sum(-1).clamp(min=1)
    return masked_sum(per_token, completion_mask), masked_sum(was_clipped, completion_mask) / n_tokens
