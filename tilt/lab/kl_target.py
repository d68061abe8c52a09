"""Where an adaptive-beta KL-RL run lands relative to pi*, exactly: tabular KL-RL with Ziegler et al.'s controller
(``tilt.math.kl_control``) toward a KL target, compared with the exact pi* at the run's final beta and with the beta
whose exact pi* has the target KL."""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.lab.tabular import random_tabular_policy
from tilt.lab.world import TableReward, reward_table
from tilt.math import exact
from tilt.recipes import kl_rl
from tilt.recipes.common import KLControlState


def tilted_logprobs(ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """log pi* ∝ log pi_ref + r/beta over a support (C, N), normalised per context."""
    log_w = ref_logp + rewards / beta
    return log_w - log_w.logsumexp(-1, keepdim=True)


def beta_for_kl(ref_logp: Tensor, rewards: Tensor, kl: float, *, lo: float = 1e-3, hi: float = 1e3) -> float:
    """The beta whose exact pi* has KL(pi* || pi_ref) = ``kl`` (averaged over contexts), by bisection on log beta: the
    KL falls as beta grows. Raises if ``kl`` is out of reach in [lo, hi]."""
    def kl_at(b: float) -> float:
        return exact.kl(tilted_logprobs(ref_logp, rewards, b), ref_logp).item()

    if not kl_at(hi) < kl < kl_at(lo):
        raise ValueError(f"KL {kl} is not reachable with beta in [{lo}, {hi}] (KL there: {kl_at(hi):.4g} .. {kl_at(lo):.4g})")
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if kl_at(mid) > kl else (lo, mid)
    return (lo * hi) ** 0.5


def adaptive_beta_report(*, vocab: int = 3, length: int = 3, seed: int = 0, reward_seed: int = 1, kl_target: float = 0.5,
                         beta: float = 0.5, steps: int = 400, batch: int = 64, lr: float = 0.05, lr_schedule: str = "constant",
                         gain: float = 0.1) -> dict:
    """Train from the reference with KL-RL and an adaptive beta (controller gain ``gain`` = batch/horizon; 0.1 is
    Ziegler et al.'s K_beta, §2.2). Keys: final_beta, beta_for_target (exact), kl_ref (policy), target_kl_ref (KL of the
    exact pi* at the final beta), kl_policy_target and kl_target_policy (policy against that pi*), betas (every step's)."""
    ref = random_tabular_policy(vocab, length, 1, seed=seed)
    rewards = reward_table("random", vocab, length, 1, reward_seed=reward_seed)
    config = kl_rl.KLRLConfig(beta=beta, steps=steps, prompts_per_step=1, samples_per_prompt=batch, lr=lr, lr_schedule=lr_schedule,
                              kl_target=kl_target, kl_horizon=batch / gain, seed=seed)
    policy, state, betas = ref.copy(), KLControlState(beta=beta), []
    kl_rl.train(config, policy, ref, TableReward(rewards, vocab, length), [0], kl_state=state, on_step=lambda s, m: betas.append(m["beta"]))
    ref_logp, logp = ref.support_logprobs().detach(), policy.support_logprobs().detach()
    target = tilted_logprobs(ref_logp, rewards, state.beta)
    return {
        "kl_target": kl_target,
        "initial_beta": beta,
        "final_beta": state.beta,
        "beta_for_target": beta_for_kl(ref_logp, rewards, kl_target),
        "kl_ref": exact.kl(logp, ref_logp).item(),
        "target_kl_ref": exact.kl(target, ref_logp).item(),
        "kl_policy_target": exact.kl(logp, target).item(),
        "kl_target_policy": exact.kl(target, logp).item(),
        "betas": betas,
    }
