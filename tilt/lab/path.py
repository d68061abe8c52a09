"""The path a gradient method takes from pi_ref, exactly, against the frontier.

A policy-gradient method follows, in expectation, the gradient of J(theta) = E_pi[r] - beta KL(pi || pi_ref) in its
own parameters. The frontier (``tilt.math.frontier``) is the family of tilts pi_lam ∝ pi_ref exp(lam r): the most
reward, or with the calibrated reward C the most win rate, at each KL (digest §1.1). Which of the two a run follows
is a matter of the geometry of its step:

* the natural gradient F^{-1} g (F the Fisher of the sequence distribution) is invariant under reparameterisation. In
  the sequence's own logits s its flow is ds/dt = r - beta (s - s_ref) - const, so s(t) = s_ref + (1 - e^{-beta t})
  r / beta: it stays on the reward tilt at every t (exactly, up to the discretisation of the step);
* the plain gradient g (SGD) and Adam's per-coordinate steps do not. In the tabular autoregressive policy the
  gradient with respect to the logits of prefix h is occ(h, a) (A(h, a) - mean), weighted by how often the prefix
  is reached: rare prefixes hardly move, frequent ones move a lot, and the path leaves the frontier from its first
  step. At small KL its efficiency is the Fisher cosine g'delta / sqrt(delta'F delta g'F^{-1}g) (``small_kl_efficiency``).

The tabular Fisher is block-diagonal over prefixes, F_h = occ(h) (diag pi_h - pi_h pi_h'), and every gradient of a
function of pi with respect to a prefix's softmax logits lies in its range, so F^{-1} g is g / occ(h, a) exactly,
with occ(h, a) the probability of the prefix h followed by a (``prefix_occupancy``).

``samples`` > 0 replaces the exact gradient by the REINFORCE estimate of n samples per context (leave-one-out
baseline, k1 of the KL in the reward, as ``tilt.recipes.kl_rl``), so the same flow can be read with the noise of a
real run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import reward_table
from tilt.math import exact
from tilt.math.frontier import efficiency, frontier_curves, on_kl_grid
from tilt.math.infalign import exact_calibrated_reward
from tilt.math.pg import kl_shaped_reward, leave_one_out_advantage, reinforce_loss
from tilt.math.target import kl_regularised_value

OPTIMIZERS = ("sgd", "adam", "natural")
READ_KLS = (0.01, 0.1, 0.5, 1.0, 2.0)
"""The KLs a path is read off at: the benchmark's 0.5, 1 and 2 nats (docs/frontier.md), 0.1, and 0.01 where a path
is still its first step's direction (``small_kl_efficiency``)."""


@dataclass(frozen=True)
class PathConfig:
    """A tabular world and one optimizer's path through it.

    The reference's logits are N(0, scale^2) per (context, prefix, token) (``random_tabular_policy``): scale 2 gives
    next-token entropies of 1.2 nats on average at V = 8 (1.7 at scale 1, 0.85 at 3; log 8 = 2.1), where the embedded
    language model's are about 3.3 of log 49152. lr is per step on the logits: SGD's and the natural gradient's steps
    are lr times the (natural) gradient, Adam's about lr per coordinate (torch.optim.Adam, betas 0.9, 0.999). The
    defaults make every path pass 2 nats within a few thousand steps of a few milliseconds each."""

    vocab: int = 8
    length: int = 3
    contexts: int = 4
    scale: float = 2.0
    reward: str = "random"
    reward_seed: int = 0
    seed: int = 0
    optimizer: str = "sgd"
    lr: float = 0.0
    """0: the optimizer's default, ``DEFAULT_PATH_LR``."""
    beta: float = 0.0
    """The KL coefficient of J; 0 reads the path of pure reward ascent (the frontier is traced either way)."""
    samples: int = 0
    """0: the exact expected gradient; n > 1: the REINFORCE estimate of n samples per context."""
    max_kl: float = 2.0
    max_steps: int = 20000


DEFAULT_PATH_LR = {"sgd": 2.0, "adam": 0.002, "natural": 0.05}
"""Small enough that a step moves the KL by well under a hundredth of a nat (the flow, not the step, is what is read),
large enough to pass 2 nats in a few thousand steps of the default world."""


def prefix_occupancy(seq_probs: Tensor, vocab: int, length: int) -> Tensor:
    """occ[c, h, a] = pi(prefix h followed by token a | context c), in ``TabularPolicy.logits`` layout (C, prefixes, V).

    seq_probs: (C, V^L) in code order. Level t's rows are the masses of the length-(t + 1) prefixes."""
    contexts = seq_probs.shape[0]
    rows = [seq_probs.reshape(contexts, vocab ** (t + 1), -1).sum(-1).reshape(contexts, vocab**t, vocab) for t in range(length)]
    return torch.cat(rows, dim=1)


def fisher_vector_product(seq_probs: Tensor, token_probs: Tensor, v: Tensor, vocab: int, length: int) -> Tensor:
    """F v for the block-diagonal tabular Fisher F_h = occ(h) (diag pi_h - pi_h pi_h'), per context.

    token_probs: (C, prefixes, V) pi(a | h); v: same shape. occ(h) = sum_a occ(h, a)."""
    prefix_mass = prefix_occupancy(seq_probs, vocab, length).sum(-1, keepdim=True)  # (C, H, 1)
    centred = v - (token_probs * v).sum(-1, keepdim=True)
    return prefix_mass * token_probs * centred


def small_kl_efficiency(grad: Tensor, step: Tensor, fisher_step: Tensor, natural_grad: Tensor) -> float:
    """The reward efficiency of an infinitesimal step delta from pi_ref: the gain g'delta per unit of sqrt(2 KL), with
    KL ≈ delta'F delta / 2, over the most any step achieves, sqrt(g'F^{-1}g) (Cauchy-Schwarz in the Fisher metric):
    g'delta / sqrt(delta'F delta * g'F^{-1}g). 1 for the natural gradient delta ∝ F^{-1} g."""
    gain = (grad * step).sum()
    return (gain / torch.sqrt((step * fisher_step).sum() * (grad * natural_grad).sum())).item()


def _objective_grad(policy: TabularPolicy, ref_logp: Tensor, rewards: Tensor, config: PathConfig,
                    generator: torch.Generator) -> Tensor:
    """The gradient of J (exact over the support) or its REINFORCE estimate, with respect to the logits."""
    policy.logits.grad = None
    if config.samples == 0:
        kl_regularised_value(policy.support_logprobs(), ref_logp, rewards, beta=config.beta).backward()
    else:
        n = config.samples
        rollout = policy.sample(list(range(config.contexts)), n, generator=generator)
        code = policy.sequence_code(rollout.completion_ids)  # (C n,)
        ctx = rollout.prompt_ids[:, 0]
        token_logp = policy.token_logprobs(rollout)  # (C n, L)
        shaped = kl_shaped_reward(rewards[ctx, code], token_logp.detach().sum(-1), ref_logp[ctx, code], beta=config.beta)
        advantage = leave_one_out_advantage(shaped.view(config.contexts, n)).view(-1)
        reinforce_loss(token_logp, advantage, rollout.completion_mask).mean().neg().backward()  # ascend J
    return policy.logits.grad.detach().clone()


def exact_path(config: PathConfig) -> dict:
    """Follow ``config.optimizer`` from pi_ref until KL(pi || pi_ref) passes ``max_kl`` (mean over contexts), and read
    the path against the exact frontier of the same world.

    Returns {"kl", "win_rate", "reward"}: (S,) along the path (win rate E_pi[C], C the calibrated reward of pi_ref);
    "read_off": {kl: {"win_rate", "frontier_win_rate", "efficiency", "reward", "frontier_reward",
    "reward_efficiency"}} at ``READ_KLS`` (NaN past the path's end); "small_kl_efficiency" (the Fisher cosine of the
    first step; for Adam, whose first step is lr sign(g), of that step); "steps"; "reference_reward"; "lr";
    "diverged_at": the step whose logits overflowed (the path ends before it; a noisy natural gradient divides by the
    occupancy of rare prefixes), or None."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {config.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if config.samples == 1 or config.samples < 0:
        raise ValueError(f"samples {config.samples}: use 0 (the exact gradient) or at least 2 (a leave-one-out baseline needs two)")
    lr = config.lr or DEFAULT_PATH_LR[config.optimizer]
    ref = random_tabular_policy(config.vocab, config.length, config.contexts, seed=config.seed, scale=config.scale)
    rewards = reward_table(config.reward, config.vocab, config.length, config.contexts, reward_seed=config.reward_seed)
    ref_logp = ref.support_logprobs().detach()  # (C, N)
    ref_probs = ref_logp.exp()
    calibrated = exact_calibrated_reward(rewards, ref_probs)  # (C, N): W(y > pi_ref)
    policy = ref.copy()
    adam = torch.optim.Adam([policy.logits], lr=lr) if config.optimizer == "adam" else None
    generator = torch.Generator().manual_seed(config.seed)
    occupancy_scale = 1.0 / config.contexts  # J averages the contexts, so its Fisher does too

    kls, win_rates, mean_rewards, first, diverged = [], [], [], None, None
    for _ in range(config.max_steps + 1):
        with torch.no_grad():
            logp = policy.support_logprobs()
            p = logp.exp()
            kls.append(exact.kl(logp, ref_logp).item())
            win_rates.append(exact.expectation(logp, calibrated).item())
            mean_rewards.append(exact.expectation(logp, rewards).item())
        if not all(map(math.isfinite, (kls[-1], win_rates[-1], mean_rewards[-1]))):  # a step overflowed the logits
            diverged = len(kls) - 1
            del kls[-1], win_rates[-1], mean_rewards[-1]
            break
        if kls[-1] > config.max_kl:
            break
        grad = _objective_grad(policy, ref_logp, rewards, config, generator)
        occupancy = prefix_occupancy(p, config.vocab, config.length) * occupancy_scale
        natural = grad / occupancy
        if first is None:  # the first step's efficiency, against the exact gradient at pi_ref
            g0 = _objective_grad(policy, ref_logp, rewards, replace(config, samples=0), generator)
            token_probs = torch.softmax(policy.logits.detach(), -1)
            step0 = {"sgd": grad, "natural": natural, "adam": grad.sign()}[config.optimizer]
            fisher_step = fisher_vector_product(p, token_probs, step0, config.vocab, config.length) * occupancy_scale
            first = small_kl_efficiency(g0, step0, fisher_step, g0 / occupancy)
        with torch.no_grad():
            if adam is not None:
                policy.logits.grad = -grad  # Adam minimises
                adam.step()
            else:
                policy.logits += lr * (natural if config.optimizer == "natural" else grad)

    kl_path, wr_path, r_path = (torch.tensor(x, dtype=torch.float64) for x in (kls, win_rates, mean_rewards))
    inv_beta = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-2, 3, 3000, dtype=torch.float64)])
    curves = frontier_curves(rewards, torch.ones(1), inv_beta, inv_beta, probs=ref_probs)
    grid = torch.tensor(READ_KLS, dtype=torch.float64)
    on_path = on_kl_grid({"kl": kl_path, "win_rate": wr_path, "reward": r_path}, grid, keys=("win_rate", "reward"))
    wr_at, r_at = on_path["win_rate"], on_path["reward"]
    wr_star = on_kl_grid(curves["tilt_calibrated"], grid)["win_rate"]
    r_star = on_kl_grid(curves["tilt_reward"], grid)["reward"]
    r_ref = exact.expectation(ref_logp, rewards)
    reward_eff = (r_at - r_ref) / (r_star - r_ref)
    wr_eff = efficiency(wr_at, wr_star)
    read_off = {kl: {"win_rate": wr_at[i].item(), "frontier_win_rate": wr_star[i].item(), "efficiency": wr_eff[i].item(),
                     "reward": r_at[i].item(), "frontier_reward": r_star[i].item(), "reward_efficiency": reward_eff[i].item()}
                for i, kl in enumerate(READ_KLS)}
    return {"kl": kl_path, "win_rate": wr_path, "reward": r_path, "read_off": read_off, "small_kl_efficiency": first,
            "steps": len(kls) - 1, "reference_reward": r_ref.item(), "lr": lr, "diverged_at": diverged}
