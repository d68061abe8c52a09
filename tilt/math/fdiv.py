"""Distribution matching through f-divergences: one estimator, one f' per divergence (digest §2(b), §6.1).

A divergence D_f(pi || p) = E_{y~p}[ f(pi(y)/p(y)) ] with f convex and f(1) = 0. With t = pi/p its gradient is

    ∇_theta D_f(pi_theta || p) = sum_y p f'(pi/p) ∇pi / p = E_{y~pi}[ f'(t(y)) ∇log pi(y) ]
                                = E_{y~q}[ (pi(y)/q(y)) f'(t(y)) ∇log pi(y) ]          (any proposal q)

so every divergence is minimised by the same importance-weighted policy gradient with the *pseudo-reward*
-f'(t): loss(y) = -(pi(y)/q(y)) * (-f'(t(y)) - b) * log pi(y), with the weight detached and any baseline b that
does not depend on y (it adds b * E_pi[∇log pi] = 0). This is the estimator of naver/disco's
``f_divergence.py`` [V-code]; here the loss is per sequence and the caller reduces.

Each f below is normalised so that f'(1) = 0 (adding c(t - 1) to f changes neither D_f, since E_p[t - 1] = 0,
nor the expected gradient): at pi = p every pseudo-reward is exactly 0.

| name         | divergence                 | f(t)                                   | f'(t)                     |
|--------------|----------------------------|----------------------------------------|---------------------------|
| forward-kl   | KL(p || pi) (DPG / GDC)    | t - 1 - log t                          | 1 - 1/t                   |
| reverse-kl   | KL(pi || p) (KL-reg. RL)   | t log t - t + 1                        | log t                     |
| js           | JS(pi, p), in [0, log 2]   | ½[t log(2t/(1+t)) + log(2/(1+t))]      | ½(log 2 - softplus(-log t)) |
| tv           | TV(pi, p), in [0, 1]       | ½|t - 1|                               | ½ sign(t - 1)             |
| chi2         | chi²(p || pi)              | (t - 1)²/t                             | 1 - 1/t²                  |

Departures from disco: disco's JS f' is log 2 - softplus(-log t), i.e. the gradient of 2·JS; here JS carries its
½ so that its value lies in [0, log 2]. disco's KL f' is -1/t and its reverse-KL f' is log t + 1; they differ from
the ones above by a constant, which a baseline absorbs.

Forward KL: the pseudo-reward is p/pi - 1, the on-policy DPG weight P/(Z pi) with the GDC++ baseline Z
(Korbak et al. 2022b, Fact 1 [R]). Reverse KL: with p = pi_ref exp(r/beta)/Z, the pseudo-reward is
-log(pi/p) = (r - beta log(pi/pi_ref))/beta - log Z, the KL-shaped reward of ``tilt.math.pg`` divided by beta
plus a constant: reverse-KL matching *is* KL-regularised RL (Korbak et al. 2022, §2; tested).

Zeros of the target (a 0/1 filter, log P = -inf): log t = +inf there, and f'(+inf) is finite for forward-kl (1),
js (½ log 2), tv (½) and chi2 (1), so these match a filtered posterior directly; reverse-kl's f' is +inf there,
as KL(pi || p) is infinite whenever pi puts mass where p has none.

Shapes: ``log_t`` and everything per sequence is (B,) (or any shape, elementwise). Nothing here reduces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn.functional import softplus

from tilt.math.pg import reinforce_loss

LOG2 = math.log(2.0)


def log_density_ratio(seq_logprobs: Tensor, target_log_weights: Tensor, log_z: Tensor | float) -> Tensor:
    """log t = log pi(y) - log p(y) = log pi(y) - (log P(y) - log Z), elementwise, (B,).

    ``target_log_weights`` log P may be -inf (a filtered-out sequence): log t is then +inf, never NaN.
    """
    log_p = target_log_weights - log_z
    return torch.where(torch.isneginf(log_p), torch.full_like(seq_logprobs, math.inf), seq_logprobs - log_p)


# --- the five f and f' -----------------------------------------------------------------------------------------
def forward_kl_f(log_t: Tensor) -> Tensor:
    """f(t) = t - 1 - log t, so E_p f(pi/p) = KL(p || pi)."""
    return torch.expm1(log_t) - log_t


def forward_kl_fprime(log_t: Tensor) -> Tensor:
    """f'(t) = 1 - 1/t; -f' = p/pi - 1, the DPG weight with its GDC++ baseline. Finite (1) where p = 0."""
    return -torch.expm1(-log_t)


def reverse_kl_f(log_t: Tensor) -> Tensor:
    """f(t) = t log t - t + 1, so E_p f(pi/p) = KL(pi || p)."""
    t = log_t.exp()
    return t * log_t - t + 1.0


def reverse_kl_fprime(log_t: Tensor) -> Tensor:
    """f'(t) = log t; -f' = log p - log pi, the KL-shaped reward over beta up to -log Z. +inf where p = 0."""
    return log_t


def js_f(log_t: Tensor) -> Tensor:
    """f(t) = ½[t log(2t/(1+t)) + log(2/(1+t))], so E_p f(pi/p) = JS(pi, p) = ½KL(pi||m) + ½KL(p||m), m = (pi+p)/2."""
    t = log_t.exp()
    return 0.5 * (t * (LOG2 - softplus(-log_t)) + LOG2 - softplus(log_t))


def js_fprime(log_t: Tensor) -> Tensor:
    """f'(t) = ½ log(2t/(1+t)) = ½(log 2 - softplus(-log t)). ½ log 2 where p = 0."""
    return 0.5 * (LOG2 - softplus(-log_t))


def tv_f(log_t: Tensor) -> Tensor:
    """f(t) = ½|t - 1|, so E_p f(pi/p) = TV(pi, p) = ½ sum |pi - p|."""
    return 0.5 * torch.expm1(log_t).abs()


TV_DEAD_ZONE = 1e-9
"""|log t| below which TV's subgradient is taken as 0: at pi = p, round-off would otherwise give ±½."""


def tv_fprime(log_t: Tensor) -> Tensor:
    """f'(t) = ½ sign(t - 1), a subgradient: 0 where |log t| < ``TV_DEAD_ZONE``. ½ where p = 0."""
    return torch.where(log_t.abs() < TV_DEAD_ZONE, 0.0, 0.5 * torch.sign(log_t)).to(log_t.dtype)


def chi2_f(log_t: Tensor) -> Tensor:
    """f(t) = (t - 1)²/t, so E_p f(pi/p) = chi²(p || pi) = sum (p - pi)²/pi."""
    return torch.expm1(log_t).square() * torch.exp(-log_t)


def chi2_fprime(log_t: Tensor) -> Tensor:
    """f'(t) = 1 - 1/t² (disco's ChiSquaredLoss). 1 where p = 0."""
    return -torch.expm1(-2.0 * log_t)


@dataclass(frozen=True)
class FDivergence:
    """One member of the family: its name, f and f' as functions of log t = log(pi/p)."""

    name: str
    f: Callable[[Tensor], Tensor]
    fprime: Callable[[Tensor], Tensor]


DIVERGENCES = {
    "forward-kl": FDivergence("forward-kl", forward_kl_f, forward_kl_fprime),
    "reverse-kl": FDivergence("reverse-kl", reverse_kl_f, reverse_kl_fprime),
    "js": FDivergence("js", js_f, js_fprime),
    "tv": FDivergence("tv", tv_f, tv_fprime),
    "chi2": FDivergence("chi2", chi2_f, chi2_fprime),
}
"""Names a config may give; the map is read once, at the top of a recipe."""


# --- the one estimator --------------------------------------------------------------------------------------------
def pseudo_reward(fprime: Callable[[Tensor], Tensor], log_t: Tensor) -> Tensor:
    """-f'(t) per sequence, (B,): what the policy gradient maximises for this divergence."""
    return -fprime(log_t)


def importance_weights(seq_logprobs: Tensor, proposal_seq_logprobs: Tensor) -> Tensor:
    """pi(y)/q(y) per sequence, (B,), from detached log-probs; 1 on-policy."""
    return torch.exp(seq_logprobs - proposal_seq_logprobs)


def weighted_leave_one_out_baseline(group_values: Tensor, group_weights: Tensor) -> Tensor:
    """b_i = sum_{j != i} w_j v_j / sum_{j != i} w_j within each group (prompt), (P, K) -> (P, K).

    It does not depend on sample i, so it leaves the expected gradient unchanged (unbiased); with w ≡ 1 it is the
    leave-one-out mean of RLOO. Where the other weights sum to 0 the baseline is 0. Needs K >= 2.
    """
    if group_values.shape[-1] < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt (samples_per_prompt >= 2)")
    wv = group_weights * group_values
    num = wv.sum(-1, keepdim=True) - wv
    den = group_weights.sum(-1, keepdim=True) - group_weights
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def f_divergence_loss(token_logprobs: Tensor, advantages: Tensor, weights: Tensor, completion_mask: Tensor) -> Tensor:
    """-(pi/q) * A * log pi(y) per sequence, (B,), minimised; A = pseudo-reward - baseline (detached), weights pi/q
    (detached). Expected gradient over y ~ q: ∇D_f(pi || p) (module docstring). Not reduced: the caller reduces.

    token_logprobs: (B, T) with grad; advantages, weights: (B,); completion_mask: (B, T) bool, True where a token counts.
    """
    return reinforce_loss(token_logprobs, weights * advantages, completion_mask)


def f_divergence(fdiv: FDivergence, policy_logp: Tensor, target_logp: Tensor) -> Tensor:
    """Exact D_f(pi || p) = sum_y p(y) f(pi(y)/p(y)) over an enumerated support, averaged over contexts.

    policy_logp, target_logp: (C, N) normalised log-probs, target without zeros. Differentiable in policy_logp.
    """
    p = target_logp.exp()
    return (p * fdiv.f(policy_logp - target_logp)).sum(-1).mean()
