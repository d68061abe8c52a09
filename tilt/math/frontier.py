"""The KL–win-rate frontier as tensor math: policies that reweight a reference distribution over a finite set of
atoms, and their KL, win rate and mean reward, exactly.

A prompt's reference distribution is a set of K atoms (responses) with rewards r_i and probabilities p_i: the
enumerated support of a lab world (exact p), or m samples of pi_ref with p_i = 1/m (the empirical distribution;
repeated rewards are ties). A policy q on the same atoms has

    KL(q || p)       = sum_i q_i log(q_i / p_i)
    W(q > p)         = sum_i q_i C_i,   C_i = F(<r_i) + 1/2 (F(<=r_i) - F(<r_i))      (ties count 1/2)
    mean reward      = sum_i q_i r_i

with F the reference CDF: W(q > p) = E_q[C] is linear in q (InfAlign, digest §5(a)), so the tilted policy
q ∝ p exp(C/beta) maximises the win rate at its own KL, for every beta: its curve is the frontier WR*(KL). The
tilt by the raw reward, q ∝ p exp(r/beta), maximises the mean reward at each KL instead. Best-of-N of p, with ties
(a tie class S takes F(<=S)^N - F(<S)^N, shared in proportion to p within S; digest §5(b)), is

    q_i = p_i (F(<=r_i)^N - F(<r_i)^N) / (F(<=r_i) - F(<r_i))

whose KL on a continuous reward is log N - (N - 1)/N, and smaller with ties or atoms (Beirami et al. 2024); here
it is computed exactly, never from that formula.

On the empirical distribution of m samples every one of these is the self-normalised importance-sampling (SNIS)
estimate of the same quantity for pi_ref itself, weights w_i = exp(Phi_i/beta) (or the best-of-N weights): a plug-in
estimate, consistent as m grows, biased for finite m. It cannot represent a KL above log m (all mass on one
sample); ``reach_kl`` gives the KL beyond which the estimates are flagged.

All functions are pure and import torch only. Shapes: K atoms on the last axis, ``...`` any leading dims (prompts,
bootstrap resamples); a grid of G values (N or 1/beta) becomes a new leading axis.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform_probs(rewards: Tensor) -> Tensor:
    """(..., m) the empirical distribution of m samples: 1/m each."""
    return torch.full_like(rewards, 1.0 / rewards.shape[-1], dtype=torch.float64)


def reference_cdfs(rewards: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """(F(<r_i), F(<=r_i)) under the atoms' distribution, for each atom i. rewards, probs: (..., K) -> two (..., K).
    Sort and cumulative sum: O(K log K) per row, ties handled by searching both sides of each value."""
    rewards = rewards.double()
    sorted_r, order = rewards.sort(dim=-1)
    cum = probs.double().gather(-1, order).cumsum(-1)
    cum = torch.cat([torch.zeros_like(cum[..., :1]), cum], dim=-1)  # (..., K + 1), cum[j] = mass of the j smallest
    sorted_r, rewards = sorted_r.contiguous(), rewards.contiguous()
    below = cum.gather(-1, torch.searchsorted(sorted_r, rewards, right=False))
    at_or_below = cum.gather(-1, torch.searchsorted(sorted_r, rewards, right=True))
    return below, at_or_below


def calibrated(below: Tensor, at_or_below: Tensor) -> Tensor:
    """C_i = F(<r_i) + 1/2 P(r = r_i): the win rate of atom i against the reference (ties 1/2). (..., K)."""
    return 0.5 * (below + at_or_below)


def best_of_n_policy(probs: Tensor, below: Tensor, at_or_below: Tensor, n: Tensor) -> Tensor:
    """Best-of-N of the atoms' distribution, exactly, ties included (module docstring). N may be any real >= 1.

    probs, below, at_or_below: (..., K); n: (G,). Returns (G, ..., K), each row summing to 1."""
    n = n.double().view(-1, *([1] * probs.dim()))  # (G, 1.., 1)
    class_mass = at_or_below - below  # (..., K) >= p_i
    safe = torch.where(class_mass > 0, class_mass, torch.ones_like(class_mass))
    share = torch.where(class_mass > 0, probs / safe, torch.zeros_like(probs))
    return share * (at_or_below.pow(n) - below.pow(n))


def tilted_policy(probs: Tensor, phi: Tensor, inv_beta: Tensor) -> Tensor:
    """q ∝ p exp(Phi/beta) (digest §1.1), for each 1/beta of the grid. probs, phi: (..., K); inv_beta: (G,) >= 0.
    Returns (G, ..., K). On m samples (p = 1/m) these are the SNIS weights of the tilted target."""
    inv_beta = inv_beta.double().view(-1, *([1] * probs.dim()))
    log_p = torch.log(probs.double())
    return torch.softmax(log_p + inv_beta * phi.double(), dim=-1)


def policy_stats(q: Tensor, probs: Tensor, rewards: Tensor, c: Tensor) -> dict[str, Tensor]:
    """KL(q || p), W(q > p) = E_q[C], E_q[r] and the Kish ESS 1/sum_i q_i^2 (the effective number of atoms; with
    p = 1/m, the ESS of the SNIS weights). q: (G, ..., K); probs, rewards, c: (..., K). Each (G, ...), per row."""
    log_ratio = torch.log(torch.where(q > 0, q, torch.ones_like(q))) - torch.log(probs.double())
    kl = torch.where(q > 0, q * log_ratio, torch.zeros_like(q)).sum(-1)
    return {"kl": kl.clamp(min=0.0), "win_rate": (q * c).sum(-1), "reward": (q * rewards.double()).sum(-1),
            "ess": 1.0 / q.square().sum(-1)}


def frontier_curves(rewards: Tensor, n_grid: Tensor, inv_beta_reward: Tensor, inv_beta_calibrated: Tensor,
                    probs: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    """The three curves of a set of prompts, each point averaged over the prompts (one N or one beta shared by all
    prompts: for the tilts this is the optimum of the mean over prompts at the mean KL, by the same Lagrangian).

    rewards: (P, K); probs: (P, K) exact atom probabilities, or None for the empirical distribution of K samples.
    n_grid: (G1,) values of N; inv_beta_*: (G2,), (G3,) values of 1/beta for r and for C. Returns
    {"best_of_n" | "tilt_reward" | "tilt_calibrated": {"param", "kl", "win_rate", "reward", "ess"}}, each (G,),
    the mean over prompts (ESS: the mean of the prompts' ESS)."""
    rewards = rewards.double()
    probs = uniform_probs(rewards) if probs is None else probs.double()
    below, at_or_below = reference_cdfs(rewards, probs)
    c = calibrated(below, at_or_below)
    policies = {
        "best_of_n": (n_grid, best_of_n_policy(probs, below, at_or_below, n_grid)),
        "tilt_reward": (inv_beta_reward, tilted_policy(probs, rewards, inv_beta_reward)),
        "tilt_calibrated": (inv_beta_calibrated, tilted_policy(probs, c, inv_beta_calibrated)),
    }
    out = {}
    for name, (param, q) in policies.items():
        stats = policy_stats(q, probs, rewards, c)
        out[name] = {"param": param.double(), **{k: v.mean(-1) for k, v in stats.items()}}
    return out


def interpolate(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear f(x) through the points (xp, fp), xp increasing (..., G); NaN outside [xp_0, xp_-1].
    x: (X,); xp, fp: (..., G). Returns (..., X)."""
    xp, fp = xp.double(), fp.double()
    x = x.double().expand(*xp.shape[:-1], -1).contiguous()
    hi = torch.searchsorted(xp.contiguous(), x, right=False).clamp(1, xp.shape[-1] - 1)
    lo = hi - 1
    x0, x1, f0, f1 = xp.gather(-1, lo), xp.gather(-1, hi), fp.gather(-1, lo), fp.gather(-1, hi)
    span = x1 - x0
    t = torch.where(span > 0, (x - x0) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    out = f0 + t * (f1 - f0)
    inside = (x >= xp[..., :1]) & (x <= xp[..., -1:])
    return torch.where(inside, out, torch.full_like(out, math.nan))


def on_kl_grid(curve: dict[str, Tensor], kl_grid: Tensor, keys=("win_rate", "reward", "ess")) -> dict[str, Tensor]:
    """A curve's values at the KL grid points, by linear interpolation in KL (KL increases along every curve's
    parameter; the running maximum guards against rounding). (KL 0 is every curve's first point.)"""
    kl = curve["kl"].cummax(-1).values
    return {k: interpolate(kl_grid, kl, curve[k]) for k in keys}


def reach_kl(samples_per_prompt: int) -> float:
    """The KL beyond which frontier estimates from m reference samples are flagged: log m - 1, the KL of best-of-m
    on a continuous reward. Past it the estimate is dominated by each prompt's few highest samples (the empirical
    distribution cannot hold a KL above log m at all), and in the lab the estimates' bias grows past their
    intervals there (tests/test_frontier.py)."""
    return math.log(samples_per_prompt) - 1.0


def bootstrap_frontier(rewards: Tensor, kl_grid: Tensor, n_grid: Tensor, inv_beta_reward: Tensor, inv_beta_calibrated: Tensor,
                       *, generator: torch.Generator, num_resamples: int = 500, level: float = 0.95
                       ) -> dict[str, dict[str, Tensor]]:
    """Bias-corrected estimates and basic bootstrap intervals of every curve's win rate and reward at each KL of
    the grid. Each resample draws the prompts with replacement and, within each drawn prompt, its m samples with
    replacement (the two-level scheme of ``tilt.math.infalign.bootstrap_win_rate``), recomputes the curves and
    reads them at the grid's KLs.

    Why not the percentile interval: the plug-in on m samples is biased (the empirical distribution is coarser than
    pi_ref, so at a given KL it under-states the win rate a little), and a resample, with its repeated samples, is
    coarser still: in the lab the percentile interval sat wholly below the exact value. The bootstrap's own shift
    estimates that bias (Efron & Tibshirani 1993, §10.2), so the estimate is corrected to 2 theta - mean(theta*) and
    the interval is the basic one, [2 theta - q_hi(theta*), 2 theta - q_lo(theta*)] (ibid. §13.3). With a
    continuous reward the win rate at a given KL hardly depends on the samples at all (it depends on ranks only), so
    the bootstrap sees almost no spread, while the empirical C still moves on a grid of 1/(2m): the win-rate
    interval is widened by half that grid step, 1/(4m), on each side. So built, the best-of-N and calibrated-tilt
    intervals covered the exact values in the lab up to ``reach_kl`` (tests/test_frontier.py).

    rewards: (P, m) reference samples. Returns {curve: {"win_rate_bc", "win_rate_low", "win_rate_high",
    "reward_bc", "reward_low", "reward_high", "reached"}}, each (X,) for X grid points; ``reached`` is the
    fraction of resamples whose curve reaches that KL (the statistics are over those only)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    p, m = rewards.shape
    tail = (1 - level) / 2
    point = {name: on_kl_grid(curve, kl_grid, keys=("win_rate", "reward"))
             for name, curve in frontier_curves(rewards, n_grid, inv_beta_reward, inv_beta_calibrated).items()}
    draws = {name: {"win_rate": [], "reward": []} for name in point}
    for _ in range(num_resamples):
        prompt_idx = torch.randint(p, (p, 1), generator=generator)
        sample_idx = torch.randint(m, (p, m), generator=generator)
        resampled = rewards[prompt_idx, sample_idx]  # (P, m)
        curves = frontier_curves(resampled, n_grid, inv_beta_reward, inv_beta_calibrated)
        for name, curve in curves.items():
            values = on_kl_grid(curve, kl_grid, keys=("win_rate", "reward"))
            for k in ("win_rate", "reward"):
                draws[name][k].append(values[k])
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    out = {}
    for name, d in draws.items():
        res = {}
        for k, rows in d.items():
            stack = torch.stack(rows)  # (R, X)
            bounds = torch.nanquantile(stack, q, dim=0)  # (2, X)
            theta = point[name][k]  # (X,)
            res[f"{k}_bc"] = 2 * theta - stack.nanmean(0)
            pad = 1.0 / (4 * m) if k == "win_rate" else 0.0
            res[f"{k}_low"], res[f"{k}_high"] = 2 * theta - bounds[1] - pad, 2 * theta - bounds[0] + pad
            res["reached"] = (~stack.isnan()).double().mean(0)
        out[name] = res
    return out


def efficiency(win_rate, frontier_win_rate):
    """(W - 1/2) / (W*(KL) - 1/2): the share of the best achievable gain in win rate over pi_ref, at the policy's own
    KL, that the policy achieves (1 on the frontier, 0 for pi_ref itself, negative below pi_ref). Floats or
    tensors; NaN where the frontier's gain is not positive (KL 0)."""
    gain = frontier_win_rate - 0.5
    if isinstance(gain, Tensor):
        return torch.where(gain > 0, (win_rate - 0.5) / torch.where(gain > 0, gain, torch.ones_like(gain)),
                           torch.full_like(gain, math.nan))
    return (win_rate - 0.5) / gain if gain > 0 else math.nan
