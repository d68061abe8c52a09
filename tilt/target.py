"""The tilted target pi*(y|x) ∝ pi_ref(y|x) * exp(Phi(r(x, y)) / beta): one object every method approximates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tilt.math.target import log_normaliser, tilted_log_weight
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy, Rollout


def identity(rewards: Tensor) -> Tensor:
    return rewards


@dataclass(frozen=True)
class ExactTarget:
    """pi* on an enumerated support: ``log_probs`` (C, N) and ``log_z`` (C,), one row per context."""

    log_z: Tensor
    log_probs: Tensor
    log_weights: Tensor
    transformed_rewards: Tensor


@dataclass(frozen=True)
class TiltedTarget:
    """pi*(y|x) = pi_ref(y|x) exp(Phi(r(x, y)) / beta) / Z(x)  (Korbak et al. 2022, §2; digest §1.1).

    ref: the prior, any ``Policy``; reward: ``f(prompts, completions) -> floats``; beta > 0: the temperature
    (KL coefficient); transform: Phi, applied to a (B,) reward tensor, identity by default.
    """

    ref: Policy
    reward: RewardFn
    beta: float
    transform: Callable[[Tensor], Tensor] = identity

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"TiltedTarget needs beta > 0 (beta = 0 is pure RL, which has no posterior); got {self.beta}")

    def transformed_rewards(self, rollout: Rollout) -> Tensor:
        """(B,) Phi(r(x, y)) of each sample."""
        return self.transform(score_rewards(self.reward, rollout.prompts, rollout.completions))

    @torch.no_grad()
    def log_weight(self, rollout: Rollout) -> Tensor:
        """(B,) log pi_ref(y|x) + Phi(r(x, y)) / beta for each sample of the rollout."""
        ref_seq = self.ref.token_logprobs(rollout).where(rollout.completion_mask, 0.0).sum(-1)
        phi = self.transformed_rewards(rollout).to(ref_seq.dtype)
        return tilted_log_weight(ref_seq, phi, beta=self.beta)

    def exact(self, support: Rollout) -> ExactTarget:
        """The exact normaliser and distribution over an enumerated support: ``support`` lists every sequence
        of each context, grouped as a rollout with ``samples_per_prompt`` = N sequences per context."""
        n = support.samples_per_prompt
        ref_seq = self.ref.token_logprobs(support).detach().where(support.completion_mask, 0.0).sum(-1).view(-1, n)
        phi = self.transformed_rewards(support).to(ref_seq.dtype).view(-1, n)
        log_w = tilted_log_weight(ref_seq, phi, beta=self.beta)  # (C, N)
        log_z = log_normaliser(log_w)  # (C,)
        return ExactTarget(log_z=log_z, log_probs=log_w - log_z.unsqueeze(-1), log_weights=log_w, transformed_rewards=phi)
