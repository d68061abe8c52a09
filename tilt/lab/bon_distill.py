"""Best-of-N distillation and regression to pi* in the exact lab: the exact CDF, the exact pi_BoN and quantile target,
and distances to them.

A world is a tabular reference (``tilt.lab.tabular``) and a reward table (C, V^L). Everything here is exact: the CDF is
the reference's own, pi_BoN is ``pi_ref * exp(bon_log_ratio)`` (checked in tests against enumerating every N-tuple of
draws with a uniform tie break), and the quantile target is pi_ref exp(R/beta) / Z with the closed-form Z.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from tilt.lab.tabular import TabularPolicy
from tilt.math import exact
from tilt.math.bon_target import bon_log_ratio, cdf_bounds, quantile_log_normaliser, quantile_reward
from tilt.math.infalign import exact_win_rate


class ExactCDF:
    """The CDF source of a lab world: (F_x(r-), F_x(r)) = (P_ref(r(z) < r | x), P_ref(r(z) <= r | x)), exactly.
    ``table``: (C, V^L) rewards; ``ref``: the tabular reference. Called as ``cdf(prompts, rewards (B,))``."""

    def __init__(self, ref: TabularPolicy, table: Tensor):
        self.probs = ref.support_logprobs().detach().exp()  # (C, N)
        self.table = table.to(torch.float64)

    def __call__(self, prompts: Sequence[Any], rewards: Tensor) -> tuple[Tensor, Tensor]:
        ctx = torch.as_tensor(list(prompts), dtype=torch.long)
        z, p = self.table[ctx], self.probs[ctx]  # (B, N)
        r = rewards.to(torch.float64).unsqueeze(-1)  # (B, 1)
        return (p * (z < r)).sum(-1), (p * (z <= r)).sum(-1)


def bon_log_probs(ref: TabularPolicy, table: Tensor, n: int) -> Tensor:
    """(C, N) log pi_BoN(y|x), best-of-n of the reference, ties broken uniformly (exact)."""
    ref_logp = ref.support_logprobs().detach()
    below, at = cdf_bounds(table, ref_logp.exp())
    return ref_logp + bon_log_ratio(below, at, n=n)


def quantile_target_log_probs(ref: TabularPolicy, table: Tensor, beta: float) -> Tensor:
    """(C, N) log pi*(y|x) = log pi_ref + R/beta - log Z, R the exact quantile reward and log Z in closed form."""
    ref_logp = ref.support_logprobs().detach()
    below, at = cdf_bounds(table, ref_logp.exp())
    return ref_logp + quantile_reward(below, at, beta=beta) / beta - quantile_log_normaliser(beta)


def distance_report(policy: TabularPolicy, target_logp: Tensor, ref: TabularPolicy, table: Tensor) -> dict[str, float]:
    """Exact distances of ``policy`` to a target (C, N): KL both ways, max |log pi - log target| over the support, TV,
    and win rates against the reference (ties 1/2) of the policy and of the target, averaged over contexts."""
    logp = policy.support_logprobs().detach()
    ref_logp = ref.support_logprobs().detach()
    return {
        "kl_target_policy": exact.kl(target_logp, logp).item(),
        "kl_policy_target": exact.kl(logp, target_logp).item(),
        "max_abs_logprob_diff": (logp - target_logp).abs().max().item(),
        "tv": exact.total_variation(logp, target_logp).item(),
        "kl_ref": exact.kl(logp, ref_logp).item(),
        "target_kl_ref": exact.kl(target_logp, ref_logp).item(),
        "win_rate": exact_win_rate(logp.exp(), ref_logp.exp(), table).mean().item(),
        "target_win_rate": exact_win_rate(target_logp.exp(), ref_logp.exp(), table).mean().item(),
    }
