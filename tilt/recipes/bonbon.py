"""BoNBoN: supervised fine-tuning on best-of-N samples of the reference plus an IPO loss on (best, worst)-of-N pairs.

Objective (Gui, Gârbacea, Veitch 2024, "BoNBoN alignment for large language models and the sweetness of best-of-n
sampling"; the form below is recalled, with beta*_N re-derived in ``tilt.math.bon_target.bonbon_ipo_beta``):

    minimise  alpha * E[-log pi(y_best)] + (1 - alpha) * E[(h(y_best, y_worst) - (N-1) H_{N-1})^2]
    h = log pi(y_b)/pi_ref(y_b) - log pi(y_w)/pi_ref(y_w),   y_best, y_worst the best and worst of N draws of pi_ref

The first term alone is the forward KL KL(pi_BoN || pi) up to a constant, minimised exactly at pi = pi_BoN (the lab
reaches it: tests/test_bon_distill.py). The second regresses the log-ratio margin of the pair onto its mean under
pi_BoN for a continuous reward; its minimiser is not pi_BoN in general (a least-squares fit of the pair margins), so
alpha < 1 trades exactness for the pair signal, as the paper intends. The lab reports how far.

Estimator, per step: P prompts, N completions of each from pi_ref (``policy.sample`` of the reference, per-prompt
seeds), scored with the raw reward; best and worst by ``tilt.math.infalign.best_of_n_index``/``worst_of_n_index`` (the
first on ties: the law of a uniform tie break). When all N rewards tie, best = worst = the same completion and the IPO
term is the constant (N-1)^2 H_{N-1}^2 with no gradient. Loss: ``bonbon_loss`` per pair, mean over the step's pairs.

Departures: the paper builds a fixed data set of best-of-N samples once; here each step draws fresh ones (the same
distribution, an unbounded data set). alpha's default is not the paper's (not retrieved): see the field. One process.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from tilt.math.bon_target import bonbon_ipo_beta, bonbon_loss
from tilt.math.infalign import best_of_n_index, worst_of_n_index
from tilt.math.masking import masked_sum
from tilt.recipes.apo import check_schedule, require_one_process, step_batch
from tilt.recipes.common import build_optimizer, micro_batches
from tilt.recipes.kl_rl import score_tokens
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy, Rollout


@dataclass(frozen=True)
class BoNBoNConfig:
    """Configuration of BoNBoN. Batch semantics: each step draws ``prompts_per_step`` prompts and ``n`` reference
    completions of each, and trains on one (best, worst) pair per prompt."""

    n: int = field(default=8, metadata={"help": "N of best-of-N (>= 2); 8 as in Gui et al. 2024's experiments (from recall)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the SFT term, 1 - alpha on the IPO term; 1 = pure SFT on best-of-N (exact target pi_BoN). "
                                                "0.5 weighs them equally; the paper tunes it and its value was not retrieved"})
    steps: int = field(default=100, metadata={"help": "number of optimisation steps (fresh best-of-N samples each)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts (so pairs) per step"})
    lr: float = field(default=5e-7, metadata={"help": "learning rate; 5e-7 as TRL's DPO examples for full fine-tuning (the paper's value was not retrieved)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant' or 'linear' (decay to 0 at the last step)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from 0 to lr"})
    micro_batch_size: int = field(default=0, metadata={"help": "pairs per forward/backward pass; 0 = the whole step at once"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order and sampling"})

    def __post_init__(self):
        if self.n < 2:
            raise ValueError(f"n must be >= 2 (BoNBoN needs a best and a worst of N), got {self.n}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (1 = pure SFT on best-of-N), got {self.alpha}")
        check_schedule(self)


def num_steps(config: BoNBoNConfig) -> int:
    """The number of optimisation steps the config means."""
    return config.steps


@torch.no_grad()
def best_worst_pairs(ref: Policy, reward_fn: RewardFn, prompts: Sequence[Any], n: int, prompt_seeds: Sequence[int]) -> tuple[Rollout, torch.Tensor]:
    """N reference completions of each of P prompts; returns the 2P sequences [best of each prompt..., worst of each
    prompt...] as one rollout, and their raw rewards (2P,)."""
    rollout = ref.sample(list(prompts), n, prompt_seeds=prompt_seeds, exact=True)
    rewards = score_rewards(reward_fn, rollout.prompts, rollout.completions).view(-1, n)  # (P, N)
    offsets = torch.arange(rewards.shape[0]) * n
    rows = torch.cat([offsets + best_of_n_index(rewards), offsets + worst_of_n_index(rewards)])  # (2P,)
    return rollout.take(rows), rewards.view(-1)[rows]


def bonbon_step(config: BoNBoNConfig, policy: Policy, ref: Policy, reward_fn: RewardFn, prompts: Sequence[Any],
                optimizer: torch.optim.Optimizer, prompt_seeds: Sequence[int]) -> dict[str, float]:
    """One step: best-of-N and worst-of-N of the reference per prompt, then the BoNBoN loss. Returns the metrics."""
    pairs, rewards = best_worst_pairs(ref, reward_fn, prompts, config.n, prompt_seeds)
    p = len(prompts)
    ref_seq = masked_sum(score_tokens(ref, pairs, 0), pairs.completion_mask)  # (2P,)
    optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "sft_loss": 0.0, "ipo_loss": 0.0, "margin": 0.0}
    for part in micro_batches(p, config.micro_batch_size):
        idx = list(range(p))[part]
        rows = idx + [p + i for i in idx]  # the part's best sequences, then its worst ones
        sub = pairs.take(rows)
        seq = masked_sum(policy.token_logprobs(sub), sub.completion_mask)  # (2b,) with grad
        best, worst = seq[: len(idx)], seq[len(idx):]
        ref_best, ref_worst = ref_seq[idx], ref_seq[[p + i for i in idx]]
        loss = bonbon_loss(best, worst, ref_best, ref_worst, n=config.n, alpha=config.alpha).sum() / p  # mean over the step's pairs
        loss.backward()
        margin = ((best - ref_best) - (worst - ref_worst)).detach()  # (b,)
        totals["loss"] += loss.item()
        totals["sft_loss"] += -best.detach().sum().item() / p
        totals["ipo_loss"] += ((margin - 1 / (2 * bonbon_ipo_beta(config.n))) ** 2).sum().item() / p
        totals["margin"] += margin.sum().item() / p
    grad_norm = 0.0
    if config.max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], config.max_grad_norm))
    optimizer.step()
    return {
        **totals,
        "target_margin": 1 / (2 * bonbon_ipo_beta(config.n)),
        "best_reward": rewards[:p].mean().item(),
        "worst_reward": rewards[p:].mean().item(),
        "tied_fraction": (rewards[:p] == rewards[p:]).float().mean().item(),
        "grad_norm": grad_norm,
    }


def train(
    config: BoNBoNConfig,
    policy: Policy,
    ref: Policy,
    reward_fn: RewardFn,
    prompts: Sequence[Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.optim.Optimizer:
    """Run ``config.steps`` steps of BoNBoN of ``policy`` toward best-of-N of ``ref`` under ``reward_fn``.
    ``on_step(step, metrics)`` is called after each step (metrics: docs/bon_distillation.md). Returns the optimizer."""
    if len(prompts) == 0:
        raise ValueError("no prompts to train on")
    require_one_process("BoNBoN")
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    for step in range(start_step, config.steps):
        batch, seeds = step_batch(config, optimizer, prompts, step)
        metrics = bonbon_step(config, policy, ref, reward_fn, batch, optimizer, seeds)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {metrics['loss']}; lower the learning rate")
        if on_step is not None:
            on_step(step, metrics)
    return optimizer


def config_dict(config: BoNBoNConfig) -> dict:
    return asdict(config)
