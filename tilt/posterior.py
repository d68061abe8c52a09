"""Sampling-based inference for the tilted target pi* = P/Z (Korbak et al. 2022, §2(a).7: "decoding-time methods").

Three samplers, each drawing candidates from a proposal q (pi_ref by default) and keeping some of them:

* exact rejection sampling: accept y with probability P(y)/(M q(y)), where M >= max P/q is known. For the tilted
  target with q = pi_ref, P/q = exp(Phi(r)/beta) <= exp(max Phi(r)/beta). The accepted samples follow pi* exactly;
  the acceptance rate is Z/M.
* quasi-rejection sampling, QRS (Eikema, Kruszewski, Dance, Aziz, Dymetman 2022 [R]; disco
  ``QuasiRejectionSampler`` [V-code], digest §2(c)): accept with probability min(1, P/(beta_q q)) for any
  beta_q > 0. The accepted samples follow p_beta ∝ min(P, beta_q q); the acceptance rate is Z_beta/beta_q with
  Z_beta = E_q[min(P/q, beta_q)]; p_beta -> pi* as beta_q grows, and p_beta = pi* once beta_q >= max P/q.
  ``beta_q`` is QRS's own parameter, not the KL coefficient of the target.
* sampling-importance-resampling, SIR (Rubin 1988): draw N candidates, return m of them drawn with replacement
  with probability proportional to P/q. Exact only as N -> infinity; N = 1 returns q.

Best-of-N, the fourth sampler of this family, lives in ``tilt.bon``.

The functions at the top are pure tensor math over an enumerated support (exact QRS quantities) or over samples
(their estimates); the samplers below take a ``TiltedTarget`` and a ``Policy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from tilt.math import exact
from tilt.math.masking import masked_sum
from tilt.math.target import tilted_log_weight
from tilt.rewards import score_rewards
from tilt.rollout import Policy, Rollout
from tilt.target import TiltedTarget


# --- QRS, exact over a support (C, N) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class QRSExact:
    """Exact QRS quantities for one beta_q, averaged over contexts: acceptance rate, TV(pi*, p_beta),
    KL(pi* || p_beta), KL(p_beta || pi*), and ``log_probs`` (C, N) of p_beta."""

    acceptance_rate: float
    tv: float
    kl_target_sampler: float
    kl_sampler_target: float
    log_probs: Tensor


def qrs_log_probs(target_log_weights: Tensor, proposal_logp: Tensor, *, log_qrs_beta: float) -> tuple[Tensor, Tensor]:
    """log p_beta = log min(P, beta_q q) - log Z_beta over a support, and log Z_beta. (C, N) -> ((C, N), (C,))."""
    log_m = torch.minimum(target_log_weights, proposal_logp + log_qrs_beta)
    log_z_beta = torch.logsumexp(log_m, -1)
    return log_m - log_z_beta.unsqueeze(-1), log_z_beta


def qrs_exact(target_log_weights: Tensor, proposal_logp: Tensor, *, qrs_beta: float) -> QRSExact:
    """Every exact QRS quantity for the unnormalised target P and proposal q over an enumerated support (C, N)."""
    if not qrs_beta > 0:
        raise ValueError(f"the QRS parameter must be > 0, got {qrs_beta}")
    log_beta = math.log(qrs_beta)
    log_p = target_log_weights - torch.logsumexp(target_log_weights, -1, keepdim=True)
    log_pb, log_zb = qrs_log_probs(target_log_weights, proposal_logp, log_qrs_beta=log_beta)
    return QRSExact(
        acceptance_rate=torch.exp(log_zb - log_beta).mean().item(),
        tv=exact.total_variation(log_p, log_pb).item(),
        kl_target_sampler=exact.kl(log_p, log_pb).item(),
        kl_sampler_target=exact.kl(log_pb, log_p).item(),
        log_probs=log_pb,
    )


# --- QRS, estimated from samples of q (..., K) ---------------------------------------------------------------------
def qrs_acceptance_log_prob(log_weights: Tensor, *, log_qrs_beta: float) -> Tensor:
    """log min(1, w/beta_q) per sample, w = P/q. Elementwise."""
    return torch.clamp(log_weights - log_qrs_beta, max=0.0)


def qrs_estimates(log_weights: Tensor, *, qrs_beta: float) -> dict[str, Tensor]:
    """Plug-in estimates from K samples of q (last axis), log w = log P - log q (may be -inf):

    acceptance_rate = mean min(1, w/beta_q);  with Ẑ = mean w, Ẑ_beta = mean min(w, beta_q):
    tv = ½ mean |w/Ẑ - min(w, beta_q)/Ẑ_beta|;  kl_target_sampler = sum_i (w_i/sum w) log(w_i/min(w_i, beta_q)) + log(Ẑ_beta/Ẑ).
    Each is (...); ``acceptance_rate_stderr`` is sd(min(1, w/beta_q))/sqrt(K).
    """
    log_beta = math.log(qrs_beta)
    k = log_weights.shape[-1]
    accept = torch.exp(qrs_acceptance_log_prob(log_weights, log_qrs_beta=log_beta))  # (..., K)
    w = torch.exp(log_weights)
    m = torch.minimum(w, torch.full_like(w, qrs_beta))
    z, z_beta = w.mean(-1, keepdim=True), m.mean(-1, keepdim=True)
    u = w / w.sum(-1, keepdim=True)
    log_ratio = torch.where(w > 0, torch.clamp(log_weights - log_beta, min=0.0), torch.zeros_like(w))  # log(w/min(w, beta))
    return {
        "acceptance_rate": accept.mean(-1),
        "acceptance_rate_stderr": accept.std(-1) / math.sqrt(k),
        "tv": 0.5 * (w / z - m / z_beta).abs().mean(-1),
        "kl_target_sampler": (u * log_ratio).sum(-1) + torch.log(z_beta / z).squeeze(-1),
    }


# --- samplers on a Policy ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidates:
    """Candidates drawn from the proposal, K per prompt (grouped as in a ``Rollout``), with their log-weights
    log w = log P - log q (B,) and which were kept: ``keep`` (B,) bool for rejection samplers, or ``indices`` (M,)
    into the rollout for resampling (SIR; an index may repeat)."""

    rollout: Rollout
    log_weights: Tensor
    keep: Tensor | None = None
    indices: Tensor | None = None

    def kept(self) -> list[tuple[Any, Any]]:
        """The kept (prompt, completion) pairs, in order."""
        idx = self.indices if self.indices is not None else self.keep.nonzero().flatten()
        return [(self.rollout.prompts[i], self.rollout.completions[i]) for i in idx.tolist()]


@torch.no_grad()
def draw_candidates(target: TiltedTarget, prompts: Sequence[Any], n: int, *, generator: torch.Generator, proposal: Policy | None = None) -> tuple[Rollout, Tensor]:
    """n candidates per prompt from ``proposal`` (target.ref by default) and their log w = log P - log q, (B,)."""
    proposal = proposal or target.ref
    rollout = proposal.sample(list(prompts), n, generator=generator)
    mask = rollout.completion_mask
    log_q = rollout.sample_seq_logprobs.double()  # the distribution actually sampled from (tempered, if so configured)
    log_ref = log_q if proposal is target.ref and rollout.sampled_from_policy else masked_sum(target.ref.token_logprobs(rollout), mask).double()
    phi = target.transform(score_rewards(target.reward, rollout.prompts, rollout.completions).to(log_q.dtype))
    return rollout, tilted_log_weight(log_ref, phi, beta=target.beta) - log_q


def rejection_sample(
    target: TiltedTarget,
    prompts: Sequence[Any],
    n: int,
    *,
    log_bound: float,
    generator: torch.Generator,
    proposal: Policy | None = None,
) -> Candidates:
    """Exact rejection sampling: accept each candidate with probability P/(M q), log M = ``log_bound``.

    Raises if a candidate violates the bound (the samples would not be exact). With q = pi_ref and a reward bounded
    by r_max, ``log_bound = Phi(r_max)/beta``.
    """
    rollout, log_w = draw_candidates(target, prompts, n, generator=generator, proposal=proposal)
    if (log_w > log_bound + 1e-9).any():
        raise ValueError(f"a candidate has log P/q = {log_w.max().item():.4g} above the bound {log_bound:.4g}; rejection sampling needs P <= M q everywhere")
    u = torch.rand(log_w.shape, generator=generator, dtype=torch.float64)
    return Candidates(rollout, log_w, keep=torch.log(u) < log_w - log_bound)


def quasi_rejection_sample(
    target: TiltedTarget,
    prompts: Sequence[Any],
    n: int,
    *,
    qrs_beta: float,
    generator: torch.Generator,
    proposal: Policy | None = None,
) -> Candidates:
    """QRS: accept each candidate with probability min(1, P/(beta_q q)); the kept samples follow p_beta ∝ min(P, beta_q q).
    Use ``qrs_estimates(log_weights.view(P, n), qrs_beta=...)`` for its acceptance rate and divergences."""
    if not qrs_beta > 0:
        raise ValueError(f"the QRS parameter must be > 0, got {qrs_beta}")
    rollout, log_w = draw_candidates(target, prompts, n, generator=generator, proposal=proposal)
    u = torch.rand(log_w.shape, generator=generator, dtype=torch.float64)
    return Candidates(rollout, log_w, keep=torch.log(u) < qrs_acceptance_log_prob(log_w, log_qrs_beta=math.log(qrs_beta)))


def sir_sample(
    target: TiltedTarget,
    prompts: Sequence[Any],
    n_candidates: int,
    n_out: int,
    *,
    generator: torch.Generator,
    proposal: Policy | None = None,
) -> Candidates:
    """Sampling-importance-resampling: per prompt, draw ``n_candidates`` and return ``n_out`` indices drawn with
    replacement with probability w/sum w. Raises if a prompt's candidates all have weight 0."""
    rollout, log_w = draw_candidates(target, prompts, n_candidates, generator=generator, proposal=proposal)
    groups = log_w.view(-1, n_candidates)  # (P, N)
    if torch.isneginf(groups).all(-1).any():
        raise ValueError("every candidate of a prompt has target weight 0; draw more candidates")
    probs = torch.softmax(groups, -1)
    picks = torch.multinomial(probs, n_out, replacement=True, generator=generator)  # (P, n_out)
    offsets = torch.arange(groups.shape[0]).unsqueeze(-1) * n_candidates
    return Candidates(rollout, log_w, indices=(picks + offsets).flatten())
