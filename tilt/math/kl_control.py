"""Adaptive KL coefficient: Ziegler et al. 2019's proportional controller, as a pure function.

Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano, Irving 2019, "Fine-Tuning Language Models from Human
Preferences", §2.2: to reach a chosen KL(pi || pi_ref) rather than guess beta,

    e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1  = beta_t * (1 + K_beta * e_t)

In the authors' code (lm-human-preferences ``AdaptiveKLController``, reproduced by TRL and OpenRLHF) the gain is
K_beta = n_steps / horizon, with n_steps the number of sequences of the step and horizon 10000. The update is
multiplicative, so it is a proportional controller on log beta; near the target, KL/target - 1 ≈ log(KL/target).
KL too high makes beta grow, which pulls the policy back toward pi_ref; the fixed point is a beta at which the
policy's KL equals the target, i.e. (for a policy that has converged to its pi*) the beta whose exact
pi* ∝ pi_ref exp(r/beta) has KL(pi* || pi_ref) = KL_target.
"""
from __future__ import annotations

KL_ERROR_CLIP = 0.2  # Ziegler et al. 2019, §2.2


def proportional_kl_error(kl: float, target: float, *, clip: float = KL_ERROR_CLIP) -> float:
    """e = clip(kl / target - 1, -clip, clip). target > 0."""
    if not target > 0:
        raise ValueError(f"the KL target must be > 0, got {target}")
    return min(max(kl / target - 1.0, -clip), clip)


def adaptive_kl_beta(beta: float, kl: float, *, target: float, horizon: float, n_steps: int, clip: float = KL_ERROR_CLIP) -> float:
    """beta * (1 + e * n_steps / horizon), e = ``proportional_kl_error(kl, target)``: the next step's KL coefficient
    after a step of ``n_steps`` sequences whose KL(pi || pi_ref) estimate is ``kl``. Plain Python floats (float64), so
    the same inputs give the same bits on every process and after a resume."""
    if not horizon > 0 or n_steps < 1:
        raise ValueError(f"need horizon > 0 and n_steps >= 1, got {horizon} and {n_steps}")
    return beta * (1.0 + proportional_kl_error(kl, target, clip=clip) * n_steps / horizon)
