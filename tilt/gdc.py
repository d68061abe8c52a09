"""GDC targets: from constraints on a reference to the target a distribution-matching recipe approaches.

Distributional constraints (Khalifa, Elsahar, Dymetman 2021 [R]; Korbak et al. 2022, §2(a).5): features
phi_1..phi_F and desired moments mu_1..mu_F. The target is the information projection of pi_ref onto
{p : E_p[phi] = mu}, the exponential family

    P_lambda(y|x) = pi_ref(y|x) exp(lambda · phi(x, y)),     with lambda solving E_{P_lambda}[phi] = mu,

i.e. a tilted target with reward lambda · phi and beta = 1. lambda is fitted by self-normalised importance
sampling (digest §2(c), disco ``BaseDistribution.constrain`` [V-code]): draw n samples from a proposal q
(pi_ref by default), weigh them by w_i(lambda) = pi_ref(y_i) exp(lambda · phi_i) / q(y_i), and solve

    sum_i w_i(lambda) phi_i / sum_i w_i(lambda) = mu.

Departure: disco solves this by fixed-step descent, lambda <- lambda - 0.05 (Ê_lambda[phi] - mu), at most 1000
iterations to a max-abs moment error of 1e-5. Here the same sample equation is solved by Newton's method on its
convex dual log sum_i w_i(lambda) - lambda · mu (gradient Ê_lambda[phi] - mu, Hessian the weighted covariance of
phi), to the same tolerance 1e-5: the same root, in a few iterations. Its sampling error is that of the samples:
the delta-method standard error of lambda is reported; with 2^9 samples it is typically several times 1e-2.

Pointwise constraints (b(x, y) in {0, 1} with moment 1) need no fitting: the target is pi_ref * b, written as a
tilted target with transform log b (0 or -inf) and beta = 1 (``pointwise_target``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from tilt.math.masking import masked_sum
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy
from tilt.target import TiltedTarget

TOLERANCE = 1e-5
"""Max-abs moment error at which the fit stops; disco's default."""
MAX_ITERATIONS = 1000
"""disco's iteration cap (Newton needs far fewer)."""
N_SAMPLES = 2**9
"""Samples drawn to fit; disco's default n_samples."""


def log_indicator(values: Tensor) -> Tensor:
    """log b: 0 where b = 1 and -inf where b = 0. Raises unless every value is 0 or 1."""
    if not ((values == 0) | (values == 1)).all():
        raise ValueError("a pointwise constraint must return 0 or 1 for every sample")
    return torch.where(values == 1, 0.0, -math.inf).to(values.dtype)


def pointwise_target(ref: Policy, constraint: RewardFn) -> TiltedTarget:
    """pi*(y|x) ∝ pi_ref(y|x) b(x, y) for a 0/1 filter b: a tilted target whose log-weight is -inf off the filter
    (Korbak et al. 2022, §2(a).6: conditioning)."""
    return TiltedTarget(ref=ref, reward=constraint, beta=1.0, transform=log_indicator)


@dataclass(frozen=True)
class FeatureReward:
    """r(x, y) = sum_i lambda_i phi_i(x, y): the reward of a fitted GDC target (used with beta = 1)."""

    features: tuple
    coefficients: tuple

    def __call__(self, prompts, completions, **columns) -> Tensor:
        total = torch.zeros(len(completions), dtype=torch.float64)
        for lam, fn in zip(self.coefficients, self.features):
            total += lam * score_rewards(fn, prompts, completions, **columns)
        return total


@dataclass(frozen=True)
class GDCFit:
    """A fitted exponential family: coefficients (F,), the SNIS moments they reach on the fitting samples (F,),
    the delta-method standard error of each coefficient (F,), Newton iterations, and the final max-abs error."""

    coefficients: Tensor
    moments: Tensor
    stderr: Tensor
    iterations: int
    max_error: float


def _weighted_moments(log_base: Tensor, features: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per group SNIS weights (P, K), mean (F,) and covariance (F, F) of phi, averaged over groups."""
    log_w = log_base + features @ lam  # (P, K)
    w = torch.softmax(log_w, dim=-1)  # normalised within each group
    mean_g = torch.einsum("pk,pkf->pf", w, features)  # (P, F)
    centred = features - mean_g.unsqueeze(1)  # (P, K, F)
    cov = torch.einsum("pk,pkf,pkg->fg", w, centred, centred) / features.shape[0]
    return w, mean_g.mean(0), cov


def fit_coefficients(
    features: Tensor,
    log_base_weights: Tensor,
    moments: Tensor,
    *,
    tolerance: float = TOLERANCE,
    max_iterations: int = MAX_ITERATIONS,
) -> GDCFit:
    """Solve mean over groups of sum_k w_k(lambda) phi_k / sum_k w_k(lambda) = mu for lambda (module docstring).

    features: (P, K, F) phi of K samples of each of P prompts; log_base_weights: (P, K) log pi_ref - log q
    (0 when q = pi_ref; an enumerated support with log pi_ref gives the exact root); moments: (F,).
    """
    features, log_base = features.double(), log_base_weights.double()
    mu = torch.as_tensor(moments, dtype=torch.float64)
    lo, hi = features.amin(dim=(0, 1)), features.amax(dim=(0, 1))
    if ((mu <= lo) | (mu >= hi)).any():
        raise ValueError(
            f"moments {mu.tolist()} must lie strictly inside the range of the sampled features "
            f"[{lo.tolist()}, {hi.tolist()}]; otherwise no finite coefficient reaches them"
        )
    lam = torch.zeros(features.shape[-1], dtype=torch.float64)

    def dual(l: Tensor) -> Tensor:
        return (torch.logsumexp(log_base + features @ l, -1)).mean() - l @ mu

    iterations, err = 0, math.inf
    for iterations in range(1, max_iterations + 1):
        _, mean, cov = _weighted_moments(log_base, features, lam)
        grad = mean - mu
        err = grad.abs().max().item()
        if err < tolerance:
            break
        eye = 1e-12 * torch.eye(len(lam), dtype=torch.float64)
        step = torch.linalg.solve(cov + eye, grad)
        t, current = 1.0, dual(lam)
        while dual(lam - t * step) > current - 0.25 * t * (grad @ step) and t > 1e-8:
            t *= 0.5  # backtracking: the dual is convex, so a short enough Newton step always descends
        lam = lam - t * step
    w, mean, cov = _weighted_moments(log_base, features, lam)
    err = (mean - mu).abs().max().item()
    # delta method: var(lambda) = H^-1 Var(psi) H^-1 with psi the per-sample influence w_k (phi_k - mean) * K
    k = features.shape[1]
    centred = features - torch.einsum("pk,pkf->pf", w, features).unsqueeze(1)
    infl = (w.unsqueeze(-1) * centred * k).reshape(-1, features.shape[-1])  # (P*K, F)
    var_score = infl.T @ infl / infl.shape[0] / infl.shape[0]
    h_inv = torch.linalg.pinv(cov)
    stderr = torch.diagonal(h_inv @ var_score @ h_inv).clamp(min=0).sqrt()
    return GDCFit(coefficients=lam, moments=mean, stderr=stderr, iterations=iterations, max_error=err)


def feature_matrix(features: Sequence[RewardFn], prompts: Sequence[Any], completions: Sequence[Any]) -> Tensor:
    """(B, F) phi_i of each sample, through the same checks as a reward."""
    return torch.stack([score_rewards(fn, prompts, completions) for fn in features], dim=-1)


@torch.no_grad()
def fit_target(
    ref: Policy,
    features: Sequence[RewardFn],
    moments: Sequence[float],
    prompts: Sequence[Any],
    *,
    generator: torch.Generator,
    n_samples: int = N_SAMPLES,
    proposal: Policy | None = None,
    tolerance: float = TOLERANCE,
) -> tuple[TiltedTarget, GDCFit]:
    """Fit the I-projection of ``ref`` under E[phi_i] = mu_i from ``n_samples`` samples per prompt of ``proposal``
    (``ref`` by default), and return it as a tilted target (reward lambda · phi, beta = 1) with the fit."""
    if len(features) != len(moments) or not features:
        raise ValueError(f"give one moment per feature: {len(features)} features, {len(moments)} moments")
    proposal = proposal or ref
    rollout = proposal.sample(list(prompts), n_samples, generator=generator)
    log_q = rollout.sample_seq_logprobs.double()  # the distribution actually sampled from
    log_ref = log_q if proposal is ref and rollout.sampled_from_policy else masked_sum(ref.token_logprobs(rollout), rollout.completion_mask).double()
    phi = feature_matrix(features, rollout.prompts, rollout.completions).view(len(prompts), n_samples, -1)
    fit = fit_coefficients(phi, (log_ref - log_q).view(len(prompts), n_samples), torch.tensor(list(moments)), tolerance=tolerance)
    reward = FeatureReward(tuple(features), tuple(fit.coefficients.tolist()))
    return TiltedTarget(ref=ref, reward=reward, beta=1.0), fit
