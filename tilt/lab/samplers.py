"""The samplers of ``tilt.samplers`` against the exact pi* of a variable-length world (``tilt.lab.sequences``).

``mh_report``: the exact law of the suffix-resampling MH chain after t steps (pi_ref times the exact transition
matrix to the power t) and its TV to pi*, for the kernel with the |y|/|y'| factor and for the one without it; and the
sampler's own chains, whose empirical law after a few steps is compared with the exact one.
``smc_report``: the SMC estimate of Z over many independent runs against the exact Z (unbiased in Z, not in log Z).
"""
from __future__ import annotations

import math

import torch

from tilt.lab.sequences import SupportReward, stopping_world
from tilt.math import mcmc
from tilt.samplers import smc, suffix_mh
from tilt.target import TiltedTarget


def _setup(vocab: int, length: int, beta: float, seed: int, reward_seed: int):
    world = stopping_world(vocab, length, seed=seed)
    values = torch.rand(len(world.support()), generator=torch.Generator().manual_seed(reward_seed), dtype=torch.float64)
    log_ref = world.support_logprobs()
    log_w = log_ref + values / beta
    return world, SupportReward(world, values), values, log_ref, torch.logsumexp(log_w, 0), log_w - torch.logsumexp(log_w, 0)


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def mh_report(*, vocab: int = 3, length: int = 4, beta: float = 0.25, seed: int = 0, reward_seed: int = 100,
              steps: int = 200, chains: int = 2000, sampled_steps: int = 5, sample_seed: int = 0) -> dict:
    """Exact and sampled MH quantities. Keys: ``support`` (number of completions), ``lengths`` (the distinct lengths),
    ``invariance_residual`` and ``invariance_residual_uncorrected`` (max |pi* M - pi*|), ``tv_by_step`` and
    ``tv_by_step_uncorrected`` ({t: TV(law after t steps, pi*)}), ``tv_stationary_uncorrected`` (TV between the wrong
    kernel's stationary law and pi*), ``sampled_tv`` (TV between the empirical law of ``chains`` sampled chains after
    ``sampled_steps`` steps and the exact law then), ``sampled_noise`` (its expected size from sampling alone, roughly),
    ``acceptance_rate`` and ``ess`` (of Phi(r), all chains) of those sampled chains."""
    world, reward, values, log_ref, _, log_target = _setup(vocab, length, beta, seed, reward_seed)
    tokens, lengths = world.support_tensors()
    prefix = world.prefix_logprobs()
    target = log_target.exp()
    right = mcmc.suffix_mh_transition_matrix(tokens, lengths, prefix, values, beta=beta)
    wrong = mcmc.suffix_mh_transition_matrix(tokens, lengths, prefix, values, beta=beta, length_correction=False)
    laws = {name: mcmc.chain_marginals(log_ref.exp(), m, steps) for name, m in (("right", right), ("wrong", wrong))}
    shown = sorted({t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= steps} | {steps})
    res = suffix_mh(TiltedTarget(ref=world, reward=reward, beta=beta), [0], steps=sampled_steps, chains=chains,
                    generator=torch.Generator().manual_seed(sample_seed))
    index = {w: i for i, w in enumerate(world.support())}
    counts = torch.bincount(torch.tensor([index[s] for s in res.final]), minlength=len(index)).double()
    exact_then = laws["right"][sampled_steps] if sampled_steps <= steps else mcmc.chain_marginals(log_ref.exp(), right, sampled_steps)[-1]
    return {
        "support": len(index),
        "lengths": sorted(set(lengths.tolist())),
        "beta": beta,
        "invariance_residual": (target @ right - target).abs().max().item(),
        "invariance_residual_uncorrected": (target @ wrong - target).abs().max().item(),
        "tv_by_step": {t: _tv(laws["right"][t], target) for t in shown},
        "tv_by_step_uncorrected": {t: _tv(laws["wrong"][t], target) for t in shown},
        "tv_stationary_uncorrected": _tv(mcmc.chain_marginals(target, wrong, 5000)[-1], target),
        "sampled_steps": sampled_steps,
        "chains": chains,
        "sampled_tv": _tv(counts / counts.sum(), exact_then),
        "sampled_noise": 0.5 * (2 * exact_then * (1 - exact_then) / (math.pi * chains)).sqrt().sum().item(),
        "acceptance_rate": res.acceptance_rate,
        "ess": res.effective_sample_size()[0],
    }


def prefix_count(token: int, length: int):
    """A prefix reward for the lab: the fraction of ``length`` positions holding ``token`` so far."""
    def reward(prompts, completions, **_columns):
        return torch.tensor([sum(t == token for t in c) / length for c in completions], dtype=torch.float64)
    return reward


def smc_report(*, vocab: int = 3, length: int = 4, beta: float = 0.25, seed: int = 0, reward_seed: int = 100, particles: int = 4,
               block_size: int = 1, prefix_token: int | None = 1, ess_threshold: float = 0.5, runs: int = 2000, sample_seed: int = 0) -> dict:
    """``runs`` independent SMC runs (batched as that many prompts). Keys: ``log_z`` (exact), ``z`` (exact),
    ``z_hat_mean`` and ``z_hat_stderr`` (mean of Ẑ and its standard error), ``log_z_hat_mean`` and ``log_z_hat_stderr``,
    ``z_error_in_stderr`` ((mean Ẑ - Z)/stderr: about N(0, 1) if Ẑ is unbiased), ``log_z_error_in_stderr`` (the same for
    log Ẑ: negative and growing with runs, Jensen's bias), ``resampled_fraction`` (blocks that resampled)."""
    world, reward, _, _, log_z, _ = _setup(vocab, length, beta, seed, reward_seed)
    prefix = prefix_count(prefix_token, length) if prefix_token is not None else None
    res = smc(TiltedTarget(ref=world, reward=reward, beta=beta), [0] * runs, particles=particles, block_size=block_size,
              prefix_reward=prefix, ess_threshold=ess_threshold, generator=torch.Generator().manual_seed(sample_seed))
    z_hat = res.log_z.exp()
    z_se = z_hat.std().item() / math.sqrt(runs)
    log_se = res.log_z.std().item() / math.sqrt(runs)
    return {
        "log_z": log_z.item(),
        "z": log_z.exp().item(),
        "particles": particles,
        "runs": runs,
        "block_size": block_size,
        "prefix_reward": prefix is not None,
        "z_hat_mean": z_hat.mean().item(),
        "z_hat_stderr": z_se,
        "z_error_in_stderr": (z_hat.mean().item() - log_z.exp().item()) / z_se,
        "log_z_hat_mean": res.log_z.mean().item(),
        "log_z_hat_stderr": log_se,
        "log_z_error_in_stderr": (res.log_z.mean().item() - log_z.item()) / log_se,
        "resampled_fraction": res.resampled.double().mean().item(),
    }
