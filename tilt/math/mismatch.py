"""Exact accounting for a sampler q that is not the policy pi (a reduced-precision copy, tilt.engine.fast_sampler).

Any expectation under pi is an expectation under q reweighted by the sequence ratio w(y) = pi(y|x)/q(y|x):

    E_pi[f(y)] = E_q[w(y) f(y)],   w = exp(log pi(y) - log q(y))   (importance sampling; Owen 2013, ch. 9)

so a recipe that weights each sequence's loss by w estimates the same gradient as on-policy sampling
(``tests/test_mismatch.py`` checks it by exact enumeration). Raw weights are unbounded; two bounded versions:

* ``truncated`` (default): w_c = min(w, cap), per sequence. Unbiased whenever no weight exceeds the cap; otherwise
  its bias is -E_q[(w - cap)_+ f(y)]: the part of pi's mass that q under-samples by more than the factor ``cap`` is
  under-counted. Truncated importance sampling with cap 2, as in Yao et al. 2025 ("Your efficient RL framework
  secretly brings you off-policy RL training", the correction behind TRL's ``vllm_importance_sampling_cap`` = 2
  and verl's TIS), where the sampler is a fast inference engine and the mismatch small, as here.
* ``self-normalised``: w_i * K / sum_j w_j within a prompt's K samples (Owen 2013, §9.2). Each weight is at most K,
  and the estimate is consistent, with a bias O(1/K) even when q = pi is nearly exact.
* ``none``: weight 1: the samples are treated as the policy's own. Biased; for comparison only.

Diagnostics, from the same samples: the mismatch KL(q || pi) = E_q[log q - log pi] ≈ mean(-log w) (a plug-in
estimate, >= 0 in expectation), and the Kish effective sample size of w (``tilt.math.importance``) as a fraction of K.

Pure functions over tensors. Shapes: (P, K) = K samples of each of P prompts; reductions over the last axis only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilt.math.fdiv import weighted_leave_one_out_baseline
from tilt.math.importance import effective_sample_size

WEIGHTINGS = ("truncated", "self-normalised", "none")
DEFAULT_CAP = 2.0  # truncation cap: Yao et al. 2025; TRL's vllm_importance_sampling_cap


def log_ratio(policy_seq_logprobs: Tensor, proposal_seq_logprobs: Tensor) -> Tensor:
    """log w = log pi(y) - log q(y), elementwise, detached inputs. (...) -> (...)."""
    return policy_seq_logprobs - proposal_seq_logprobs


def truncated_weights(log_w: Tensor, *, cap: float) -> Tensor:
    """min(pi/q, cap), elementwise (Yao et al. 2025, truncated importance sampling). (...) -> (...)."""
    return torch.exp(log_w).clamp(max=cap)


def self_normalised_weights(log_w: Tensor) -> Tensor:
    """K * w_i / sum_j w_j over the last axis (the K samples of one prompt): mean 1 per group. (P, K) -> (P, K)."""
    return log_w.shape[-1] * torch.softmax(log_w, dim=-1)


def sequence_weights(log_w: Tensor, *, weighting: str, cap: float) -> Tensor:
    """The weight of each sequence's loss under ``weighting`` ('truncated', 'self-normalised' or 'none'). (P, K) -> (P, K)."""
    if weighting == "truncated":
        return truncated_weights(log_w, cap=cap)
    if weighting == "self-normalised":
        return self_normalised_weights(log_w)
    if weighting == "none":
        return torch.ones_like(log_w)
    raise ValueError(f"importance weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def weighted_leave_one_out_advantage(group_values: Tensor, group_weights: Tensor) -> Tensor:
    """v_i minus the weighted mean of the *other* K-1 samples of its prompt (``tilt.math.fdiv.weighted_leave_one_out_baseline``).

    The baseline of sample i does not depend on y_i, so E_q[w_i (v_i - b_i) ∇log pi(y_i)] = E_pi[v ∇log pi]
    (the baseline's term vanishes because E_q[w ∇log pi] = E_pi[∇log pi] = 0). With all weights equal this is the
    RLOO advantage (``tilt.math.pg.leave_one_out_advantage``). (P, K), K >= 2 -> (P, K).
    """
    return group_values - weighted_leave_one_out_baseline(group_values, group_weights)


def kl_proposal_policy(log_w: Tensor) -> Tensor:
    """KL(q || pi) ≈ mean over the last axis of log q - log pi = -log w, from samples of q. (..., K) -> (...)."""
    return (-log_w).mean(-1)


def ess_fraction(log_w: Tensor) -> Tensor:
    """Kish's ESS of the raw weights pi/q over the last axis, divided by K (1 when q = pi). (..., K) -> (...)."""
    return effective_sample_size(log_w) / log_w.shape[-1]


def truncated_fraction(log_w: Tensor, *, cap: float) -> Tensor:
    """Fraction of the samples whose weight pi/q exceeds ``cap`` (where truncation biases the estimate). (..., K) -> (...)."""
    return (log_w > torch.log(torch.tensor(cap, dtype=log_w.dtype))).to(log_w.dtype).mean(-1)


def mismatch_metrics(log_w: Tensor, *, cap: float) -> dict[str, float]:
    """The ``sampler/*`` metrics of one step from its log-weights (P, K), averaged over prompts, as floats."""
    return {
        "sampler/kl_q_pi": kl_proposal_policy(log_w).mean().item(),
        "sampler/ess_fraction": ess_fraction(log_w).mean().item(),
        "sampler/truncated_fraction": truncated_fraction(log_w, cap=cap).mean().item(),
        "sampler/log_ratio_abs_max": log_w.abs().max().item(),
    }
