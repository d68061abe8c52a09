"""Importance-sampled diagnostics: how far a policy pi is from the target pi* = P/Z, from samples of a proposal q.

Inputs, per sample y_i ~ q (i = 1..K, the last axis; any leading axes are independent groups, e.g. prompts):
    target_log_weights  log P(y) = log pi_ref(y) + Phi(r(y))/beta  (may be -inf: a 0/1 filter)
    proposal_logprobs   log q(y)
    policy_logprobs     log pi(y)           (q = pi on-policy)
With w = P/q and v = pi/q, and Ẑ = mean_i w_i, u_i = w_i/Ẑ (self-normalised target weights):

    log Z           ≈ log mean_i w_i                                       (unbiased in Z; disco's moving Z [V-code])
    KL(pi* || pi)   ≈ mean_i u_i (log P_i - log Ẑ - log pi_i)              (SNIS; digest §2(b), disco metrics/kl.py)
    KL(pi || pi*)   ≈ mean_i v_i (log pi_i - log P_i + log Ẑ)              (IS in pi/q; plain mean on-policy)
    TV(pi, pi*)     ≈ mean_i ½|v_i - u_i|
    JS(pi, pi*)     ≈ mean_i ½[v_i log(2v_i/(v_i+u_i)) + u_i log(2u_i/(v_i+u_i))]
    ESS             = (sum w)² / sum w²                                    (Kish)

Each estimate is a plug-in mean of per-sample terms phi_i(Ẑ); its standard error is the delta-method one,
sd(psi)/sqrt(K) with influence psi_i = phi_i - mean(phi) + (d mean(phi)/d log Ẑ)(u_i - 1), which accounts for
the noise of Ẑ, and the 95% interval is value ± 1.96 se. These are consistent, not unbiased: with few samples
or heavy-tailed weights (a small ESS) the interval is too narrow; read the ESS first.

Pure functions over tensors; nothing here sees a model. Reduction: over the last axis only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its standard error, per group: ``value`` and ``stderr`` have the leading shape."""

    value: Tensor
    stderr: Tensor

    @property
    def lower(self) -> Tensor:
        """Lower end of the 95% normal interval."""
        return self.value - Z95 * self.stderr

    @property
    def upper(self) -> Tensor:
        return self.value + Z95 * self.stderr

    def covers(self, truth: Tensor | float) -> Tensor:
        """True where the 95% interval contains ``truth``."""
        return (self.lower <= truth) & (truth <= self.upper)


def mean_over_groups(estimate: Estimate) -> Estimate:
    """Average of independent group estimates (e.g. over prompts): se = sqrt(sum se²)/G."""
    g = estimate.value.numel()
    return Estimate(estimate.value.mean(), estimate.stderr.square().sum().sqrt() / g)


def _log_mean_exp(x: Tensor) -> Tensor:
    return torch.logsumexp(x, dim=-1, keepdim=True) - math.log(x.shape[-1])


def _times(x: Tensor, y: Tensor) -> Tensor:
    """x * y with 0 where x = 0, whatever y (even -inf), and a gradient free of NaN."""
    keep = x > 0
    return x * torch.where(keep, y, torch.zeros_like(y))


def _plugin(phi: Callable[[Tensor], Tensor], log_w: Tensor) -> Estimate:
    """mean_i phi_i(log Ẑ) with the delta-method standard error (module docstring). log_w: (..., K)."""
    k = log_w.shape[-1]
    if k < 2:
        raise ValueError("an importance-sampled estimate with a standard error needs at least 2 samples")
    log_z = _log_mean_exp(log_w.detach()).requires_grad_(True)  # (..., 1)
    with torch.enable_grad():
        terms = phi(log_z)  # (..., K)
        value = terms.mean(-1)  # (...)
        (dvalue_dlogz,) = torch.autograd.grad(value.sum(), log_z, allow_unused=True)
    if dvalue_dlogz is None:
        dvalue_dlogz = torch.zeros_like(log_z)
    u = torch.exp(log_w - log_z.detach())  # (..., K), mean 1
    influence = terms.detach() - value.detach().unsqueeze(-1) + dvalue_dlogz * (u - 1.0)
    # an infinite value is certain (a sample the policy can draw has P = 0: the divergence is infinite), so se = 0
    finite = torch.isfinite(value.detach())
    stderr = torch.where(finite, influence.std(-1) / math.sqrt(k), torch.zeros_like(value.detach()))
    return Estimate(value.detach(), stderr)


def log_importance_weights(target_log_weights: Tensor, proposal_logprobs: Tensor) -> Tensor:
    """log w = log P(y) - log q(y), elementwise."""
    return target_log_weights - proposal_logprobs


def log_normaliser(target_log_weights: Tensor, proposal_logprobs: Tensor) -> Estimate:
    """log Z ≈ log mean_i P(y_i)/q(y_i); se by the delta method, sd(w)/(sqrt(K) mean w). (..., K) -> (...)."""
    log_w = log_importance_weights(target_log_weights, proposal_logprobs)
    return _plugin(lambda log_z: log_z.expand_as(log_w), log_w)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """Kish's ESS (sum w)²/sum w², between 1 and K, from log-weights (..., K) -> (...)."""
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1))


def kl_target_policy(target_log_weights: Tensor, proposal_logprobs: Tensor, policy_logprobs: Tensor) -> Estimate:
    """KL(pi* || pi), the forward KL that DPG minimises, by self-normalised IS. (..., K) -> (...)."""
    log_w = log_importance_weights(target_log_weights, proposal_logprobs)

    def phi(log_z):
        u = torch.exp(log_w - log_z)
        return _times(u, target_log_weights - log_z - policy_logprobs)

    return _plugin(phi, log_w)


def kl_policy_target(target_log_weights: Tensor, proposal_logprobs: Tensor, policy_logprobs: Tensor) -> Estimate:
    """KL(pi || pi*), the reverse KL that KL-regularised RL minimises (J_KL = beta log Z - beta KL), IS in pi/q.
    +inf when a sample that pi can produce has P = 0. (..., K) -> (...)."""
    log_w = log_importance_weights(target_log_weights, proposal_logprobs)
    v = torch.exp(policy_logprobs - proposal_logprobs)

    def phi(log_z):
        return v * (policy_logprobs - target_log_weights + log_z)

    return _plugin(phi, log_w)


def total_variation(target_log_weights: Tensor, proposal_logprobs: Tensor, policy_logprobs: Tensor) -> Estimate:
    """TV(pi, pi*) = ½ E_q|pi/q - pi*/q|. (..., K) -> (...)."""
    log_w = log_importance_weights(target_log_weights, proposal_logprobs)
    v = torch.exp(policy_logprobs - proposal_logprobs)
    return _plugin(lambda log_z: 0.5 * (v - torch.exp(log_w - log_z)).abs(), log_w)


def jensen_shannon(target_log_weights: Tensor, proposal_logprobs: Tensor, policy_logprobs: Tensor) -> Estimate:
    """JS(pi, pi*) = ½KL(pi||m) + ½KL(pi*||m), m = (pi + pi*)/2, in [0, log 2]. (..., K) -> (...)."""
    log_w = log_importance_weights(target_log_weights, proposal_logprobs)
    v = torch.exp(policy_logprobs - proposal_logprobs)

    def phi(log_z):
        u = torch.exp(log_w - log_z)
        m = 0.5 * (u + v)
        log_m = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        log_u = torch.log(torch.where(u > 0, u, torch.ones_like(u)))  # guarded: log 0 would poison the gradient
        log_v = torch.log(torch.where(v > 0, v, torch.ones_like(v)))
        return 0.5 * (_times(v, log_v - log_m) + _times(u, log_u - log_m))

    return _plugin(phi, log_w)


@dataclass(frozen=True)
class RunningLogZ:
    """A running estimate of log Z from every weight seen so far: log sum w, log sum w², count.

    ``updated`` returns a new state (nothing is mutated), so a recipe owns and checkpoints it. Each w = P/q is
    unbiased for Z whatever q was when it was drawn, so weights from successive policies may be pooled.
    """

    log_sum_w: float = -math.inf
    log_sum_w2: float = -math.inf
    count: int = 0

    def updated(self, log_w: Tensor) -> "RunningLogZ":
        """The state after also seeing the log-weights ``log_w`` (any shape, one prompt)."""
        flat = log_w.detach().flatten().double()
        s1 = torch.logsumexp(torch.cat([flat, torch.tensor([self.log_sum_w], dtype=flat.dtype)]), 0).item()
        s2 = torch.logsumexp(torch.cat([2 * flat, torch.tensor([self.log_sum_w2], dtype=flat.dtype)]), 0).item()
        return RunningLogZ(s1, s2, self.count + flat.numel())

    @property
    def log_z(self) -> float:
        return self.log_sum_w - math.log(self.count) if self.count else math.nan

    @property
    def ess(self) -> float:
        return math.exp(2 * self.log_sum_w - self.log_sum_w2) if self.count and math.isfinite(self.log_sum_w) else 0.0

    def estimate(self) -> Estimate:
        """log Z with its delta-method standard error sqrt((n S2/S1² - 1)/(n - 1))."""
        n = self.count
        if n < 2 or not math.isfinite(self.log_sum_w):
            return Estimate(torch.tensor(self.log_z), torch.tensor(math.inf))
        rel_var = max(math.exp(math.log(n) + self.log_sum_w2 - 2 * self.log_sum_w) - 1.0, 0.0) / (n - 1)
        return Estimate(torch.tensor(self.log_z), torch.tensor(math.sqrt(rel_var)))


def target_metrics(target_log_weights: Tensor, proposal_logprobs: Tensor, policy_logprobs: Tensor) -> dict[str, float]:
    """``diagnostics`` keyed ``target_<name>`` (``target_kl_target_policy``, ``target_ess``, ...): the one name under
    which every recipe (KL-RL, DPG, online DPO/XPO) and the evaluation log how far the policy is from pi*."""
    return {f"target_{name}": value for name, value in diagnostics(target_log_weights, proposal_logprobs, policy_logprobs).items()}


def diagnostics(target_log_weights: Tensor, proposal_logprobs: Tensor, policy_logprobs: Tensor) -> dict[str, float]:
    """Every estimate above for grouped samples (P, K), averaged over the P groups, as floats for logging.

    Keys: ``log_z``, ``kl_target_policy``, ``kl_policy_target``, ``tv``, ``js`` (each with ``_stderr``, ``_lower``,
    ``_upper``), ``ess`` (mean over groups of the Kish ESS of w = P/q) and ``ess_fraction`` (ESS / K).
    """
    args = (target_log_weights, proposal_logprobs, policy_logprobs)
    out: dict[str, float] = {}
    named = {
        "log_z": log_normaliser(target_log_weights, proposal_logprobs),
        "kl_target_policy": kl_target_policy(*args),
        "kl_policy_target": kl_policy_target(*args),
        "tv": total_variation(*args),
        "js": jensen_shannon(*args),
    }
    for name, est in named.items():
        est = mean_over_groups(est)
        out[name] = est.value.item()
        out[f"{name}_stderr"] = est.stderr.item()
        out[f"{name}_lower"] = est.lower.item()
        out[f"{name}_upper"] = est.upper.item()
    ess = effective_sample_size(log_importance_weights(target_log_weights, proposal_logprobs))
    out["ess"] = ess.mean().item()
    out["ess_fraction"] = (ess / target_log_weights.shape[-1]).mean().item()
    return out
