"""Kronecker-factored natural gradient (K-FAC) for one linear layer: pure functions over tensors.

For a linear layer s = W a (W: d_out x d_in) inside a model of log pi(y), the Fisher block of vec(W) is

    F_W = E[ vec(g a^T) vec(g a^T)^T ] = E[ (a a^T) ⊗ (g g^T) ]  ≈  A ⊗ G,    A = E[a a^T],  G = E[g g^T],

with g = d log pi(y) / d s and y drawn from the model itself (the true Fisher, not the empirical one); the
approximation is the independence of a and g (Martens & Grosse 2015, "Optimizing Neural Networks with
Kronecker-factored Approximate Curvature", arXiv 1503.05671, §3; over the positions of a sequence, each position one
term: Eschenhagen et al. 2023's K-FAC-expand, arXiv 2311.00636). Then (A ⊗ G)^{-1} vec(grad) = vec(G^{-1} grad A^{-1}).

The natural gradient is the direction of steepest ascent per unit KL: to second order KL(pi_theta || pi_{theta + d})
= 1/2 d^T F d. The KL to pi_ref that a tilted policy spends is the KL along that metric; so the natural gradient at
the reference asks for no KL the objective does not pay for, to second order and within the span of the model's
tangent directions (Amari 1998; Kakade 2001; the tilt pi_ref exp(s r / beta) is the mirror-descent path in KL).
"""
from __future__ import annotations

import torch
from torch import Tensor


def covariance_factor(rows: Tensor, weights: Tensor | None = None) -> Tensor:
    """(d, d) sum of outer products of the rows, sum_n w_n x_n x_n^T; a factor is this sum over batches divided by
    the number of positions (or sequences) it counts.

    ``rows``: (N, d), any float dtype, computed in float32. ``weights``: (N,) (a 0/1 mask of the positions that count),
    or None for all ones."""
    x = rows.float()
    with torch.autocast(device_type=x.device.type, enabled=False):  # called from hooks inside an autocast forward pass
        if weights is None:
            return x.T @ x
        return (x * weights.float()[:, None]).T @ x


def damped_inverse(factor: Tensor, damping: float) -> Tensor:
    """(F + damping * mean(diag F) * I)^{-1} of a symmetric positive semi-definite (d, d) factor, by its eigenvalues
    (clamped at 0: rounding can make the smallest slightly negative), in the factor's own dtype. The damping is relative to the factor's mean
    eigenvalue, so it does not depend on the scale of a or g (Tikhonov damping of each factor, Martens & Grosse §6.3,
    in its simplest form)."""
    if damping <= 0:
        raise ValueError(f"damping must be > 0 (an undamped factor of few samples is singular), got {damping}")
    sym = 0.5 * (factor + factor.T)
    eigenvalues, vectors = torch.linalg.eigh(sym)
    eigenvalues = eigenvalues.clamp(min=0.0)
    shift = damping * float(eigenvalues.mean())
    if shift <= 0:
        raise ValueError("the factor is zero: no position carried a signal (check the mask of the Fisher pass)")
    return (vectors / (eigenvalues + shift)) @ vectors.T


def precondition(grad: Tensor, g_inverse: Tensor, a_inverse: Tensor) -> Tensor:
    """(d_out, d_in) G^{-1} grad A^{-1}: vec of it is (A ⊗ G)^{-1} vec(grad) (column-major vec), the K-FAC natural
    gradient of one linear layer's weight, in the factors' dtype."""
    with torch.autocast(device_type=grad.device.type, enabled=False):
        return g_inverse @ grad.to(g_inverse.dtype) @ a_inverse


def trust_region_scale(quadratic: float, kl_per_step: float) -> float:
    """The step length eta such that the predicted KL of the step eta * d, 1/2 eta^2 d^T F d, equals ``kl_per_step``,
    where ``quadratic`` is g^T F^{-1} g = d^T F d for d = F^{-1} g (TRPO's step size: Schulman et al. 2015, arXiv
    1502.05477, Appendix C). With damped factors the quadratic over-states d^T F d, so the undamped predicted KL is at
    most ``kl_per_step``."""
    if kl_per_step < 0:
        raise ValueError(f"kl_per_step must be >= 0, got {kl_per_step}")
    if not quadratic > 0:
        return 0.0
    return (2.0 * kl_per_step / quadratic) ** 0.5
