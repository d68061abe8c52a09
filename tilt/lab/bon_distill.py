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


# --- runs (``tilt lab bon-distill`` and ``tilt lab regress``; the tests call these) -------------------------------------

DISTILL_METHODS = ("vbon", "dpg", "bond", "bonbon")
REGRESSION_METHODS = ("apo", "qrpo")


def bon_world(responses: int, levels: int, seed: int) -> tuple[TabularPolicy, Tensor]:
    """One prompt, ``responses`` one-token responses, pi_ref with N(0, 1) logits. Rewards: ``levels`` = 0: distinct,
    U[0, 1); else the values floor(levels * i / responses), i = 0..responses-1, in a seeded random order: every level
    present, with ties when levels < responses. Returns (ref, table (1, K))."""
    from tilt.lab.tabular import random_tabular_policy
    from tilt.lab.world import reward_table
    from tilt.recipes.common import derive_seed

    ref = random_tabular_policy(responses, 1, 1, seed=seed)
    if levels <= 0:
        return ref, reward_table("random", responses, 1, reward_seed=seed)
    grid = (torch.arange(responses, dtype=torch.float64) * levels / responses).floor()
    order = torch.randperm(responses, generator=torch.Generator().manual_seed(derive_seed(seed, "bon-world")))
    return ref, grid[order].unsqueeze(0)


def run_bon_distill_lab(method: str, *, responses: int = 4, levels: int = 3, n: int = 4, steps: int = 400, batch: int = 32,
                        lr: float = 0.05, seed: int = 1, jeffreys_weight: float = 0.5, alpha: float = 1.0,
                        ref: TabularPolicy | None = None, table: Tensor | None = None) -> dict[str, float]:
    """Distil best-of-n of the reference with one method, from pi_ref, Adam at ``lr`` decayed linearly to 0, ``batch``
    samples (or pairs) per step; report exact distances to pi_BoN and pi_BoN's own KL and win rate, next to their
    continuous-limit closed forms. ``ref``/``table`` replace the world of ``bon_world``."""
    from tilt.bon_target import BestOfNReward, bon_target
    from tilt.lab.world import TableReward
    from tilt.math.infalign import best_of_n_kl_closed_form, best_of_n_win_rate_closed_form
    from tilt.recipes import bonbon, bond, dpg, kl_rl

    if method not in DISTILL_METHODS:
        raise ValueError(f"method must be one of {', '.join(DISTILL_METHODS)}, got {method!r}")
    if ref is None or table is None:
        ref, table = bon_world(responses, levels, seed)
    reward, cdf, policy = TableReward(table, ref.vocab, ref.length), ExactCDF(ref, table), ref.copy()
    schedule = dict(steps=steps, lr=lr, lr_schedule="linear", seed=seed)
    if method == "vbon":  # KL-RL, unchanged, at beta = 1 on the best-of-N reward
        kl_rl.train(kl_rl.KLRLConfig(beta=1.0, prompts_per_step=1, samples_per_prompt=batch, **schedule), policy, ref,
                    BestOfNReward(reward, cdf, n), [0])
    elif method == "dpg":  # DPG toward pi_BoN as a tilted target
        dpg.train(dpg.DPGConfig(prompts_per_step=1, samples_per_prompt=batch, diagnostics_interval=0, **schedule), policy,
                  bon_target(ref, reward, cdf, n), [0])
    elif method == "bond":
        bond.train(bond.BONDConfig(n=n, jeffreys_weight=jeffreys_weight, prompts_per_step=batch, samples_per_prompt=2, **schedule),
                   policy, ref, reward, [0], cdf=cdf)
    else:
        bonbon.train(bonbon.BoNBoNConfig(n=n, alpha=alpha, prompts_per_step=batch, **schedule), policy, ref, reward, [0])
    target = bon_log_probs(ref, table, n)
    report = distance_report(policy, target, ref, table)
    report.update(start_kl_target_policy=exact.kl(target, ref.support_logprobs().detach()).item(),
                  kl_closed_form=best_of_n_kl_closed_form(n), win_rate_closed_form=best_of_n_win_rate_closed_form(n), n=n)
    return report


def run_regression_lab(method: str, *, vocab: int = 3, length: int = 2, contexts: int = 2, levels: int = 0, beta: float = 0.5,
                       steps: int = 300, batch: int = 32, lr: float = 0.05, seed: int = 1, sampling: str = "reference",
                       value_samples: int = 0) -> dict[str, float]:
    """A*-PO (with beta_1 = beta_2 = beta; V* exact, or from ``value_samples`` reference samples) or QRPO (exact CDF,
    sampling from the reference or the policy) from pi_ref; exact distances to the method's pi*. Rewards U[0, 1) per
    sequence (``levels`` > 0: floor(levels * U), with ties). ``batch`` is split evenly over the contexts."""
    from tilt.lab.tabular import random_tabular_policy
    from tilt.lab.world import TableReward, reward_table
    from tilt.recipes import apo, qrpo
    from tilt.target import TiltedTarget

    if method not in REGRESSION_METHODS:
        raise ValueError(f"method must be apo or qrpo, got {method!r}")
    if batch % contexts:
        raise ValueError(f"batch {batch} must be a multiple of contexts {contexts}")
    ref = random_tabular_policy(vocab, length, contexts, seed=seed)
    table = reward_table("random", vocab, length, contexts, reward_seed=seed + 1)
    table = (table * levels).floor() if levels > 0 else table
    reward, policy, prompts = TableReward(table, vocab, length), ref.copy(), list(range(contexts))
    batching = dict(steps=steps, prompts_per_step=contexts, samples_per_prompt=batch // contexts, lr=lr, seed=seed)
    history: list[dict] = []
    if method == "apo":
        exact_target = TiltedTarget(ref, reward, beta).exact(ref.enumerate())
        target = exact_target.log_probs
        values = None if value_samples else (lambda p: beta * exact_target.log_z[torch.as_tensor(list(p))])
        cfg = apo.APOConfig(beta=beta, value_beta=beta, value_samples=max(value_samples, 1), value_seed=seed, **batching)
        apo.train(cfg, policy, ref, reward, prompts, values=values, on_step=lambda s, m: history.append(m))
    else:
        target = quantile_target_log_probs(ref, table, beta)
        cfg = qrpo.QRPOConfig(beta=beta, sampling=sampling, **batching)
        qrpo.train(cfg, policy, ref, reward, prompts, cdf=ExactCDF(ref, table), on_step=lambda s, m: history.append(m))
    report = distance_report(policy, target, ref, table)
    report.update(start_kl_target_policy=exact.kl(target, ref.support_logprobs().detach()).item(),
                  residual_abs_first=history[0]["residual_abs"], residual_abs_last=history[-1]["residual_abs"])
    return report
