"""KL estimators k1, k2, k3 (Schulman 2020, "Approximating KL divergence"), per token and per sequence.

All estimate KL(pi || pi_ref) from samples y ~ pi, through the log-ratio ``log pi(y) - log pi_ref(y)``.
With ``rho = pi_ref / pi`` (so ``log rho = -log_ratio``):

    k1 = -log rho = log_ratio
    k2 = (log rho)^2 / 2
    k3 = (rho - 1) - log rho

Value (is E_pi[k] equal to KL(pi||pi_ref)?):
  * k1: unbiased, high variance, can be negative on one sample.
  * k2: biased (it is a second-order approximation), never negative, low variance.
  * k3: unbiased and never negative; low variance when pi is close to pi_ref.

Gradient, when the estimate is used as a *penalty inside the reward* (detached, multiplied by the score
function ∇log pi(y)):
  * k1 in the reward gives the exact gradient of KL(pi||pi_ref): E_pi[k1 ∇log pi] = ∇KL, because the extra
    term E_pi[∇k1] = E_pi[∇log pi] is zero. This is the classical KL-shaped reward r - beta*log(pi/pi_ref).
  * k2 or k3 in the reward: the value is right on average (k3) or nearly (k2), but the score-function
    gradient is not the gradient of KL(pi||pi_ref).

Gradient, when the estimate is *added to the loss* and differentiated through log pi (pathwise, samples fixed):
  * k1 in the loss: E_pi[∇k1] = E_pi[∇log pi] = 0. Useless as a penalty.
  * k2 in the loss, per sequence: E_pi[log_ratio ∇log pi] = ∇KL(pi||pi_ref), the exact gradient.
    Per token and summed, it drops the effect of early tokens on later tokens' KL and is biased.
  * k3 in the loss, per sequence: E_pi[(1 - rho) ∇log pi] = ∇KL(pi_ref||pi), the gradient of the *forward*
    KL, not of the reverse KL being estimated. Per token, likewise per position (GRPO's choice).

``tests/test_math.py`` checks these statements by exact enumeration in the lab (``test_kl_estimators_by_hand``,
``test_kl_estimator_gradients_by_enumeration``): the values of k1, k2, k3 and of per-token k3; k1 in the reward;
k1, sequence k2 and sequence k3 in the loss; the bias of per-token k2. ``tests/test_math_claims.py`` checks that
k2 and k3 in the reward do not give the KL gradient.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def k1(log_ratio: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref, elementwise. ``log_ratio``: any shape. Unbiased for the value."""
    return log_ratio


def k2(log_ratio: Tensor) -> Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2, elementwise. Biased value; its pathwise gradient is ∇KL(pi||pi_ref)
    when applied to the sequence log-ratio."""
    return 0.5 * log_ratio.square()


def k3(log_ratio: Tensor) -> Tensor:
    """k3 = exp(-log_ratio) - 1 + log_ratio, elementwise. Unbiased and non-negative."""
    return torch.expm1(-log_ratio) + log_ratio


def token_kl(estimator, token_logprobs: Tensor, ref_token_logprobs: Tensor, completion_mask: Tensor) -> Tensor:
    """Per-token KL estimates summed over the counted tokens of each sequence.

    token_logprobs, ref_token_logprobs: (B, T); completion_mask: (B, T) bool, True where a token counts.
    Returns (B,), not reduced over the batch. For k1 this equals ``sequence_kl(k1, ...)``.
    """
    log_ratio = token_logprobs - ref_token_logprobs  # (B, T)
    return torch.where(completion_mask, estimator(log_ratio), 0.0).sum(-1)


def sequence_kl(estimator, seq_logprobs: Tensor, ref_seq_logprobs: Tensor) -> Tensor:
    """The estimator applied once to the sequence log-ratio log pi(y) - log pi_ref(y).

    seq_logprobs, ref_seq_logprobs: (B,). Returns (B,), not reduced.
    """
    return estimator(seq_logprobs - ref_seq_logprobs)


def full_token_kl(token_log_probs: Tensor, ref_token_log_probs: Tensor, completion_mask: Tensor) -> Tensor:
    """Sum over the counted positions t of the exact next-token KL, sum_v pi(v | y_<t) (log pi(v | y_<t) -
    log pi_ref(v | y_<t)), over the whole vocabulary.

    token_log_probs, ref_token_log_probs: (B, T, V) log-softmaxes of the policy and the reference at each
    completion position; completion_mask: (B, T) bool, True where a token counts. Returns (B,), not reduced.

    Value: KL(pi||pi_ref) = E_y[sum_t KL_t(y_<t)] (the chain rule of KL), so this is k1 with each token's log-ratio
    replaced by its conditional expectation given the prefix (Rao-Blackwellised): unbiased, lower variance.
    Gradient: ∇KL = E_y[∇log pi(y) sum_t KL_t] + E_y[sum_t ∇KL_t], the score-function term through the prefixes
    and the pathwise term of each position's distribution (KL-RL ``kl_penalty=full`` uses both; the pathwise term
    alone is the per-token penalty of full-distribution methods, biased like per-token k2).
    """
    kl_t = (token_log_probs.exp() * (token_log_probs - ref_token_log_probs)).sum(-1)  # (B, T)
    return torch.where(completion_mask, kl_t, 0.0).sum(-1)


def entropy(log_probs: Tensor) -> Tensor:
    """(...,) entropy -sum_v p(v) log p(v) of the distributions whose log-probabilities are the last dimension
    (outcomes of probability 0, log-probability -inf, count 0)."""
    p = log_probs.exp()
    return -torch.where(p > 0, p * log_probs, torch.zeros_like(p)).sum(-1)


def entropy_floor_kl(ref_log_probs: Tensor, target_entropy: Tensor, *, iterations: int = 40) -> tuple[Tensor, Tensor]:
    """(KL floor, lam): the least KL(p || q) of any distribution p over the vocabulary with entropy H(p) equal to
    ``target_entropy``, and the inverse temperature lam of the distribution that attains it.

    ref_log_probs: (..., V) log q; target_entropy: (...). KL(p || q) = -H(p) - E_p[log q], so at fixed H(p) the
    least KL maximises the linear E_p[log q] over {H(p) >= h} (convex, as H is concave), whose maximiser lies on
    H = h and is, by its Lagrangian, the tempered q_lam ∝ q^lam: lam > 1 where h < H(q) (sharper), lam < 1 where
    h > H(q). H(q_lam) falls with lam (dH/dlam = -lam Var_{q_lam}(log q)), so lam is found by bisection in log lam
    over [1e-2, 1e3]; targets outside the entropies reachable there are clamped to its ends. The floor is what a
    policy's change of entropy alone costs at that position, whatever else it changes: KL(pi_t || q_t) minus the
    floor is the part of the KL spent other than on the entropy change. Computed in float64."""
    log_q = ref_log_probs.double()
    h = target_entropy.double()
    lo = torch.full_like(h, math.log(1e-2))
    hi = torch.full_like(h, math.log(1e3))
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        too_sharp = entropy(torch.log_softmax(mid.exp()[..., None] * log_q, -1)) < h  # lam too large: lower it
        hi = torch.where(too_sharp, mid, hi)
        lo = torch.where(too_sharp, lo, mid)
    lam = (0.5 * (lo + hi)).exp()
    log_p = torch.log_softmax(lam[..., None] * log_q, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0), lam


KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}
"""Names a config may give; the map is read once, at the top of a recipe."""
