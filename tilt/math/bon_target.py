"""Best-of-N as a tilted target, the quantile reward with a known normaliser, and the losses that distil or regress
onto them. Pure functions over tensors; torch only.

Best-of-N as a target (derivation in docs/bon_distillation.md). Draw N completions of x from pi_ref, keep the one with
the highest reward, break ties uniformly at random among the tied draws (``tilt.bon`` keeps the first of them, which
gives the same law: the draws are exchangeable). With F(r) = P_ref(r(z) <= r) and F(r-) = P_ref(r(z) < r),

    P(best-of-N = y) = pi_ref(y) / P_ref(r = r(y)) * [F(r(y))^N - F(r(y)-)^N]          (exact, ties included)

and, for a continuous reward (no ties), pi_BoN(y) = N F(r(y))^(N-1) pi_ref(y): the tilted target with
Phi(c) = (N - 1) log c on the calibrated reward c = F(r), plus the constant log N, at beta = 1 (Beirami et al. 2024;
Amini et al. 2024, "Variational best-of-N", §3; Sessa et al. 2024, "BOND", Theorem 1, whose tie-aware form is this
one written as a sum; both from recall, checked here against enumeration of every N-tuple in tests/test_bon_distill.py).

One identity covers both the tie-aware form and the quantile reward. Let g >= 0 be a weight on [0, 1] with
antiderivative G. Give y the randomised calibrated reward c_U = F(r-) + U P(r = r(y)), U ~ Uniform(0, 1) (exactly
uniform under pi_ref, ties or not), and weigh y by the mean of g(c_U) over U:

    w(y) = [G(F(r)) - G(F(r-))] / [F(r) - F(r-)],      sum_y pi_ref(y) w(y) = G(1) - G(0)   (the classes telescope)

  * g(c) = N c^(N-1), G(c) = c^N: w = pi_BoN / pi_ref, normalised (``bon_log_ratio``);
  * g(c) = exp(c / beta), G(c) = beta exp(c / beta): w = exp(R / beta) with the *quantile reward* R, whose normaliser
    E_ref[exp(R / beta)] = beta (exp(1/beta) - 1) is known exactly (QRPO, Matrenok et al. 2025, Eq. 11 [V-code] for a
    continuous reward, where R = F(r); ``quantile_reward``, ``quantile_log_normaliser``).

From samples: with m reference rewards z_1..z_m of the prompt, count y as one more exchangeable draw, so
F(r-) ~ #{z < r}/(m + 1) and F(r) ~ (#{z <= r} + 1)/(m + 1) (``sample_cdf_bounds``). Averaged over the calibration
draws and y ~ pi_ref, w then has mean exactly G(1) - G(0) for any m (the same telescoping over the m + 1 values), and
no completion gets weight 0 (log F = -inf) for lying below every reference sample.

Shapes: ``...`` any leading dims; K support points or B completions last.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tilt.math.preference import ipo_loss

# --- CDF bounds ---------------------------------------------------------------------------------------------------


def cdf_bounds(rewards: Tensor, ref_probs: Tensor) -> tuple[Tensor, Tensor]:
    """(F(r(y)-), F(r(y))) under pi_ref for every y of an enumerated support: P_ref(r(z) < r(y)), P_ref(r(z) <= r(y)).
    rewards, ref_probs: (..., K). Returns two (..., K) float64."""
    below_mask = rewards.unsqueeze(-2) < rewards.unsqueeze(-1)  # (..., K, K): [y, z] = r(z) < r(y)
    at_mask = rewards.unsqueeze(-2) <= rewards.unsqueeze(-1)
    p = ref_probs.to(torch.float64).unsqueeze(-2)
    return (p * below_mask).sum(-1), (p * at_mask).sum(-1)


def sample_cdf_bounds(rewards: Tensor, ref_rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(F(r-), F(r)) estimated from m reference rewards, counting the completion itself as an (m+1)-th draw:
    (#{z < r} / (m + 1), (#{z <= r} + 1) / (m + 1)). Always 0 <= F(r-) < F(r) <= 1.

    rewards: (..., B); ref_rewards: (..., m), same leading dims. Returns two (..., B) float64."""
    ref_sorted = ref_rewards.to(torch.float64).sort(dim=-1).values.contiguous()
    r = rewards.to(torch.float64).contiguous()
    below = torch.searchsorted(ref_sorted, r, right=False).to(torch.float64)  # (..., B) #{z < r}
    at_or_below = torch.searchsorted(ref_sorted, r, right=True).to(torch.float64)  # #{z <= r}
    m1 = ref_rewards.shape[-1] + 1
    return below / m1, (at_or_below + 1) / m1


# --- best-of-N as a target ----------------------------------------------------------------------------------------


def bon_log_ratio(below: Tensor, at_or_below: Tensor, *, n: int) -> Tensor:
    """log pi_BoN(y)/pi_ref(y) = log[(F^N - F-^N) / (F - F-)], F = ``at_or_below``, F- = ``below`` (module docstring);
    N F^(N-1) in the limit F- -> F (a continuous reward). Written as (N-1) log F + log sum_{i<N} (F-/F)^i, so it is
    accurate when the tie class is small. -inf where F = 0 (a reward no reference draw can reach), for N >= 2.
    below, at_or_below: (...,), 0 <= below <= at_or_below <= 1. Returns (...,) float64."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    a, b = at_or_below.to(torch.float64), below.to(torch.float64)
    if n == 1:
        return torch.zeros_like(a)
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    log_rho = torch.log(b / safe_a)  # (...,) <= 0, -inf where b = 0
    # sum_{i<N} rho^i = expm1(N log rho) / expm1(log rho), N where rho = 1
    lr = torch.where(log_rho < 0, log_rho, -torch.ones_like(a))  # placeholder where rho = 1 (a tie-free point)
    geometric = torch.where(log_rho < 0, torch.expm1(n * lr) / torch.expm1(lr), torch.full_like(a, float(n)))
    out = (n - 1) * torch.log(safe_a) + torch.log(geometric)
    return torch.where(a > 0, out, torch.full_like(a, -math.inf))


def bon_reward(below: Tensor, at_or_below: Tensor, *, n: int) -> Tensor:
    """The best-of-N reward R_N = log pi_BoN/pi_ref (``bon_log_ratio``): pi_ref exp(R_N / beta) at beta = 1 is pi_BoN,
    with log Z = 0. vBoN's objective E_pi[log F] - KL(pi || pi_ref)/(N - 1) (Amini et al. 2024, §3, from recall) is
    this one divided by N - 1, up to the constant log N, for a continuous reward."""
    return bon_log_ratio(below, at_or_below, n=n)


def best_of_n_class_kl(class_probs: Tensor, *, n: int) -> Tensor:
    """KL(pi_BoN || pi_ref) from the reward's tie classes: sum_S d_S log(d_S / p_S), d_S = F_S^N - F_{S-}^N, with the
    class masses p_S sorted by increasing reward (within a class pi_BoN / pi_ref is constant, so only the classes
    matter). Equals log N - (N-1)/N in the continuous limit and is below it otherwise.
    class_probs: (..., S), summing to 1. Returns (...,)."""
    p = class_probs.to(torch.float64)
    upper = torch.cumsum(p, -1).clamp(max=1.0)
    lower = upper - p
    d = upper.pow(n) - lower.pow(n)
    return torch.where(d > 0, d * (torch.log(d) - torch.log(p)), torch.zeros_like(d)).sum(-1)


def best_of_n_class_win_rate(class_probs: Tensor, *, n: int) -> Tensor:
    """W(best-of-N(pi_ref) > pi_ref), ties counting 1/2, from the tie classes sorted by increasing reward:
    sum_S (F_S^N - F_{S-}^N) (F_S + F_{S-}) / 2. Equals N/(N+1) in the continuous limit and is below it otherwise.
    class_probs: (..., S). Returns (...,)."""
    p = class_probs.to(torch.float64)
    upper = torch.cumsum(p, -1).clamp(max=1.0)
    lower = upper - p
    return ((upper.pow(n) - lower.pow(n)) * (upper + lower) / 2).sum(-1)


# --- the quantile reward and its known normaliser -------------------------------------------------------------------


def quantile_reward(below: Tensor, at_or_below: Tensor, *, beta: float) -> Tensor:
    """R = beta log E_U[exp(c_U / beta)] = beta log[beta (exp(F/beta) - exp(F-/beta)) / (F - F-)], in [F-, F]; F itself
    for a continuous reward (QRPO's quantile reward, Matrenok et al. 2025). Its normaliser under pi_ref is exactly
    ``quantile_log_normaliser(beta)``, ties or not (module docstring). below, at_or_below: (...,). Returns (...,)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    a, b = at_or_below.to(torch.float64), below.to(torch.float64)
    x = (a - b) / beta  # (...,) >= 0
    safe_x = torch.where(x > 0, x, torch.ones_like(x))
    # log[(1 - exp(-x)) / x] -> 0 as x -> 0
    shrink = torch.where(x > 0, torch.log(-torch.expm1(-safe_x) / safe_x), torch.zeros_like(x))
    return a + beta * shrink


def quantile_log_normaliser(beta: float) -> float:
    """log Z = log E_ref[exp(R / beta)] = log(beta (exp(1/beta) - 1)) for the quantile reward R (QRPO, Matrenok et al.
    2025, Eq. 11 [V-code], which keeps log beta + 1/beta, dropping the -1; kept here: exact at every beta)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return math.log(beta) + 1.0 / beta + math.log(-math.expm1(-1.0 / beta))


def soft_value(ref_rewards: Tensor, *, beta: float) -> Tensor:
    """V*(x) = beta log mean_j exp(r_j / beta) over m reference rewards of x (A*-PO stage 1, Brantley et al. 2025; the
    form TRL's A2PO documents [V-docs]). The plug-in estimate of beta log E_ref[exp(r/beta)] = beta log Z(x): biased
    low by Jensen, the bias shrinking as 1/m. ref_rewards: (..., m). Returns (...,)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r = ref_rewards.to(torch.float64)
    return beta * (torch.logsumexp(r / beta, dim=-1) - math.log(r.shape[-1]))


# --- losses (minimised, per example; the caller reduces) -------------------------------------------------------------


def regression_loss(seq_logprobs: Tensor, ref_seq_logprobs: Tensor, rewards: Tensor, values: Tensor, *, beta: float) -> Tensor:
    """(beta log(pi(y)/pi_ref(y)) - (r(y) - V(x)))^2, the least-squares regression of the implicit reward onto the
    optimal advantage (A*-PO, Brantley et al. 2025, stage 2; QRPO, Matrenok et al. 2025, with V = beta log Z).

    If V(x) = beta log E_ref[exp(r/beta)] exactly, the loss is 0 for every y at pi = pi* ∝ pi_ref exp(r/beta) and only
    there (a normalised pi with beta log pi/pi_ref = r - V for all y is pi*), so the fixed point is pi* whatever
    distribution the y come from, and the per-sample gradient vanishes there (no noise floor).
    seq_logprobs: (B,) with grad; ref_seq_logprobs, rewards, values: (B,) detached. Returns (B,)."""
    return (beta * (seq_logprobs - ref_seq_logprobs) - (rewards - values)) ** 2


def bonbon_ipo_beta(n: int) -> float:
    """beta*_N of BoNBoN's IPO term: 1 / (2 (N-1) H_{N-1}), H_k the k-th harmonic number (Gui et al. 2024, from recall,
    re-derived here). Under pi_BoN of a continuous reward, log pi_BoN/pi_ref = log N + (N-1) log F, and F of the best
    and worst of N reference draws are the top and bottom order statistics of N uniforms, whose logs differ in mean by
    H_{N-1}; so the mean log-ratio margin of (best, worst) pairs is (N-1) H_{N-1} = 1/(2 beta*_N), IPO's target."""
    if n < 2:
        raise ValueError(f"BoNBoN needs n >= 2 (a best and a worst sample), got {n}")
    return 1.0 / (2.0 * (n - 1) * sum(1.0 / k for k in range(1, n)))


def bonbon_loss(
    best_logprobs: Tensor, worst_logprobs: Tensor, ref_best_logprobs: Tensor, ref_worst_logprobs: Tensor, *, n: int, alpha: float
) -> Tensor:
    """BoNBoN (Gui et al. 2024): alpha * (-log pi(y_best)) + (1 - alpha) * (h - (N-1) H_{N-1})^2, the supervised
    fine-tuning loss on the best of N reference samples plus the IPO loss on the (best, worst) pair at beta*_N
    (``bonbon_ipo_beta``), h = log pi(y_b)/pi_ref(y_b) - log pi(y_w)/pi_ref(y_w). The paper's weighting of the two
    terms is recalled, not retrieved: docs/bon_distillation.md.
    All arguments (B,) sequence log-probs (policy ones with grad). Returns (B,)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ipo = ipo_loss(best_logprobs, worst_logprobs, ref_best_logprobs, ref_worst_logprobs, beta=bonbon_ipo_beta(n))
    return alpha * (-best_logprobs) + (1.0 - alpha) * ipo
