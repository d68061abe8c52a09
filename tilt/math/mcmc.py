"""Markov chain and sequential Monte Carlo math for sampling the tilted target pi* ∝ pi_ref exp(Phi(r)/beta).

Suffix-resampling Metropolis–Hastings (QUEST, Faria & Smith 2024; QAlign, Faria & Smith 2025, §3): from the
current completion y of n = |y| tokens (its EOS included), draw a cut i uniformly from {0, ..., n-1}, keep y_<i and
draw a new suffix from pi_ref(. | x, y_<i), giving y'. The cut is part of the move, and the reverse move from y'
uses the same cut with probability 1/|y'|, so MH's ratio for the pair of moves is

    pi*(y') (1/|y'|) pi_ref(y_>=i | y_<i)          exp(Phi(r(y'))/beta)   |y|
    -------------------------------------    =    -------------------- · ----
    pi*(y)  (1/|y|)  pi_ref(y'_>=i | y_<i)          exp(Phi(r(y))/beta)    |y'|

(the reference factors cancel because pi_ref(y) = pi_ref(y_<i) pi_ref(y_>=i | y_<i)). Each cut's kernel is then in
detailed balance with pi*, and so is their mixture. Dropping |y|/|y'| (treating a uniform cut as symmetric) leaves a
chain whose stationary law is not pi* as soon as lengths differ; ``suffix_mh_transition_matrix`` shows both.

Sequential Monte Carlo (Del Moral, Doucet, Jasra 2006; for LMs, Lew et al. 2023 and Zhao et al. 2024, "Probabilistic
inference in language models via twisted SMC"): particles extended block by block from pi_ref, weighted by the
ratio of successive potentials exp(psi_t - psi_{t-1}), resampled when the effective sample size falls; the product of
the mean incremental weights is an unbiased estimate of Z (not of log Z).

Everything here is pure tensor math; the samplers on policies are in ``tilt.samplers``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


# --- suffix-resampling Metropolis–Hastings ------------------------------------------------------------------------
def suffix_mh_log_acceptance(
    new_transformed_rewards: Tensor,
    old_transformed_rewards: Tensor,
    new_lengths: Tensor,
    old_lengths: Tensor,
    *,
    beta: float,
    length_correction: bool = True,
) -> Tensor:
    """log alpha = min(0, (Phi(r(y')) - Phi(r(y)))/beta + log|y| - log|y'|), elementwise.

    The acceptance probability of suffix resampling from pi_ref with a cut uniform over the current length
    (module docstring). ``length_correction=False`` drops log|y| - log|y'|: the wrong kernel, kept to show in the
    lab that it misses pi*. Lengths count the completion's tokens, EOS included (>= 1).
    """
    if not beta > 0:
        raise ValueError(f"the tilted target needs beta > 0, got {beta}")
    log_ratio = (new_transformed_rewards - old_transformed_rewards) / beta
    if length_correction:
        log_ratio = log_ratio + torch.log(old_lengths.to(log_ratio.dtype)) - torch.log(new_lengths.to(log_ratio.dtype))
    return torch.clamp(log_ratio, max=0.0)


def common_prefix_lengths(tokens: Tensor, lengths: Tensor) -> Tensor:
    """(N, N) number of leading tokens two sequences share. tokens (N, L) right-padded; lengths (N,)."""
    n, width = tokens.shape
    present = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(-1)  # (N, L) True on real tokens
    same = (tokens.unsqueeze(1) == tokens.unsqueeze(0)) & present.unsqueeze(1) & present.unsqueeze(0)  # (N, N, L)
    return same.long().cumprod(-1).sum(-1)


def suffix_mh_transition_matrix(
    tokens: Tensor,
    lengths: Tensor,
    prefix_logprobs: Tensor,
    transformed_rewards: Tensor,
    *,
    beta: float,
    length_correction: bool = True,
) -> Tensor:
    """The exact (N, N) transition matrix M[a, b] = P(next = b | current = a) of suffix-resampling MH over an
    enumerated support of one context.

    tokens (N, L) right-padded, lengths (N,), prefix_logprobs (N, L + 1): log pi_ref(y_<j) for j = 0..L (column j
    of a sequence beyond its length is never read); transformed_rewards (N,): Phi(r). For a cut i < |a| with
    a_<i = b_<i, the move a -> b is proposed with probability (1/|a|) pi_ref(b) / pi_ref(b_<i) and accepted with
    ``suffix_mh_log_acceptance``; rejected mass stays on the diagonal. Rows sum to 1.
    """
    n, width = tokens.shape
    dtype = prefix_logprobs.dtype
    common = common_prefix_lengths(tokens, lengths)  # (N, N)
    log_ref = prefix_logprobs.gather(-1, lengths.unsqueeze(-1)).squeeze(-1)  # (N,) log pi_ref(y)
    cuts = torch.arange(width).view(1, 1, -1)  # (1, 1, L)
    valid = (cuts <= common.unsqueeze(-1)) & (cuts < lengths.view(-1, 1, 1))  # (N, N, L): cut i allowed for a -> b
    log_suffix = log_ref.view(1, -1, 1) - prefix_logprobs[:, :width].unsqueeze(0)  # (1, N, L) log pi_ref(b_>=i | b_<i)
    log_propose = log_suffix - torch.log(lengths.to(dtype)).view(-1, 1, 1)  # (N, N, L)
    log_accept = suffix_mh_log_acceptance(transformed_rewards.view(1, -1), transformed_rewards.view(-1, 1), lengths.view(1, -1),
                                          lengths.view(-1, 1), beta=beta, length_correction=length_correction)  # (N, N)
    moves = torch.where(valid, torch.exp(log_propose + log_accept.unsqueeze(-1)), torch.zeros((), dtype=dtype)).sum(-1)  # (N, N)
    return moves + torch.diag(1.0 - moves.sum(-1))


def chain_marginals(initial_probs: Tensor, transition: Tensor, steps: int) -> Tensor:
    """(steps + 1, N) the law of the chain's state after 0..steps transitions: initial_probs (N,) times M^t."""
    rows = [initial_probs]
    for _ in range(steps):
        rows.append(rows[-1] @ transition)
    return torch.stack(rows)


# --- chain diagnostics ---------------------------------------------------------------------------------------------
def autocorrelation(values: Tensor) -> Tensor:
    """(T,) autocorrelation rho_k, k = 0..T-1, of chains ``values`` (C, T): the autocovariance of each chain about its
    own mean (biased, 1/T, via FFT), averaged over chains, divided by the lag-0 value. All-constant chains give rho = 1
    at lag 0 and 0 elsewhere."""
    c, t = values.shape
    x = (values - values.mean(-1, keepdim=True)).double()
    size = 1 << (2 * t - 1).bit_length()
    spectrum = torch.fft.rfft(x, n=size)
    acov = torch.fft.irfft(spectrum * spectrum.conj(), n=size)[:, :t].mean(0) / t  # (T,)
    if acov[0] <= 0:
        out = torch.zeros(t, dtype=torch.float64)
        out[0] = 1.0
        return out
    return acov / acov[0]


def effective_sample_size(values: Tensor) -> float:
    """Autocorrelation-based ESS of chains ``values`` (C, T): C T / tau, tau = -1 + 2 sum_k (rho_2k + rho_2k+1) over
    the initial positive sequence, made monotone (Geyer 1992, §3.3; the pairing of Stan's ESS). Between about 0 and
    C T; C T for independent draws, C T (1 - phi)/(1 + phi) for an AR(1) chain of coefficient phi."""
    c, t = values.shape
    rho = autocorrelation(values)
    pairs = rho[: 2 * (t // 2)].view(-1, 2).sum(-1)  # Gamma_m = rho_2m + rho_2m+1
    total, bound = 0.0, math.inf
    for gamma in pairs.tolist():
        if gamma <= 0:
            break
        bound = min(bound, gamma)  # initial monotone sequence
        total += bound
    tau = max(-1.0 + 2.0 * total, 1.0 / (c * t))
    return c * t / tau


# --- sequential Monte Carlo ---------------------------------------------------------------------------------------
def log_mean_incremental_weight(log_normalised_weights: Tensor, log_increments: Tensor) -> Tensor:
    """log sum_i W_i g_i per group, the factor of Ẑ contributed by one SMC step: W (..., N) the normalised weights
    carried into the step (uniform after a resampling), g the incremental weights. (..., N) -> (...)."""
    return torch.logsumexp(log_normalised_weights + log_increments, -1)


def normalise_log_weights(log_weights: Tensor) -> Tensor:
    """log W_i = log w_i - log sum_j w_j over the last axis."""
    return log_weights - torch.logsumexp(log_weights, -1, keepdim=True)


def systematic_resample(log_weights: Tensor, uniforms: Tensor) -> Tensor:
    """Systematic resampling (Kitagawa 1996): particle j of a group takes the ancestor whose cumulative weight first
    exceeds (u + j)/N. log_weights (G, N), uniforms (G,) in [0, 1). Returns (G, N) long ancestor indices; each
    ancestor i is copied floor or ceil of N W_i times, and N W_i in expectation (unbiased, so Ẑ stays unbiased)."""
    g, n = log_weights.shape
    cdf = torch.softmax(log_weights.double(), -1).cumsum(-1)  # (G, N)
    cdf[:, -1] = 1.0
    points = (uniforms.double().unsqueeze(-1) + torch.arange(n, dtype=torch.float64)) / n  # (G, N)
    return torch.searchsorted(cdf, points, right=True).clamp(max=n - 1)
