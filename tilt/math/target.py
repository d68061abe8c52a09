"""The tilted target pi*(y|x) ∝ pi_ref(y|x) * exp(Phi(r(x, y)) / beta) as tensor math (digest §1.1)."""
from __future__ import annotations

import torch
from torch import Tensor


def tilted_log_weight(ref_seq_logprobs: Tensor, transformed_rewards: Tensor, *, beta: float) -> Tensor:
    """log P(x, y) = log pi_ref(y|x) + Phi(r(x, y)) / beta, the unnormalised log-target.

    ref_seq_logprobs, transformed_rewards: same shape. beta > 0 (beta = 0 has no tilted target: it is
    pure RL, whose optimum is a point mass on the reward's argmax).
    """
    if not beta > 0:
        raise ValueError(f"the tilted target needs beta > 0, got {beta}")
    return ref_seq_logprobs + transformed_rewards / beta


def log_normaliser(log_weights: Tensor) -> Tensor:
    """log Z(x) = log sum_y P(x, y) over an enumerated support. log_weights: (C, N). Returns (C,)."""
    return torch.logsumexp(log_weights, dim=-1)


def kl_regularised_value(policy_logp: Tensor, ref_logp: Tensor, rewards: Tensor, *, beta: float) -> Tensor:
    """J_KL(pi) = E_pi[r] - beta * KL(pi || pi_ref), exact over a support, averaged over contexts.

    All arguments (C, N). Satisfies J_KL(pi) + beta * KL(pi || pi*) = beta * log Z (digest §1.1).
    """
    p = policy_logp.exp()
    per_context = (p * rewards).sum(-1) - beta * torch.where(p > 0, p * (policy_logp - ref_logp), 0.0).sum(-1)
    return per_context.mean()
