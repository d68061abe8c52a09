"""Bradley-Terry reward modelling from preference pairs (prompt, chosen, rejected).

Objective (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1; digest §1.4): minimise over the pairs

    -log sigma( r(x, y+) - r(x, y-) )

with r a scalar head on a causal-LM backbone (``AutoModelForSequenceClassification`` with one label, reading
the last token of prompt + completion). The trained model is saved with ``save_pretrained`` and used as a
reward anywhere by its folder (``tilt.reward_fns.reward_from_spec``).

Batch semantics: a step takes ``pairs_per_step`` pairs; an epoch is one pass over a seeded permutation.
Loss reduction: mean over the step's pairs. Accuracy counts a tie (equal rewards) as one half.

Several processes (``torchrun``; docs/distributed.md): rank r scores the r-th contiguous shard of each step's pairs
(``pairs_per_step`` must be a multiple of the world size); the loss is divided by the step's pairs over all ranks and
gradients are summed, so the update equals the one-process update (a model with dropout draws its masks from each
rank's own generator, so it matches the one-process run in distribution, not bit for bit).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from tilt import distributed
from tilt.math.preference import bradley_terry_loss
from tilt.math.winrate import win_probability
from tilt.recipes.common import build_optimizer, grad_norm_and_clip, learning_rate, lr_factor, prompt_indices, set_lr
from tilt.reward_fns import SequenceClassifierReward


@dataclass(frozen=True)
class RewardModelConfig:
    """Configuration of Bradley-Terry reward modelling."""

    epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs (1 as in Ouyang et al. 2022, who found more overfit)"})
    pairs_per_step: int = field(default=8, metadata={"help": "preference pairs per optimisation step"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate (AdamW)"})
    lr_schedule: str = field(default="linear", metadata={"help": "'constant' or 'linear' decay to 0"})
    seed: int = field(default=0, metadata={"help": "seed of the pair order"})

    def __post_init__(self):
        if self.epochs <= 0 or self.pairs_per_step < 1 or self.lr <= 0:
            raise ValueError("epochs > 0, pairs_per_step >= 1 and lr > 0 are required")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")


def pair_texts(pairs: Sequence[Mapping[str, str]]) -> tuple[list[str], list[str]]:
    """(chosen texts, rejected texts): prompt + completion, as the reward sees them."""
    return [p["prompt"] + p["chosen"] for p in pairs], [p["prompt"] + p["rejected"] for p in pairs]


@torch.no_grad()
def accuracy(reward: SequenceClassifierReward, pairs: Sequence[Mapping[str, str]], batch_size: int = 32) -> float:
    """Share of pairs where r(chosen) > r(rejected); a tie counts one half."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    chosen, rejected = pair_texts(pairs)
    total = 0.0
    for s in range(0, len(pairs), batch_size):
        rc, rr = reward.scores(chosen[s:s + batch_size]), reward.scores(rejected[s:s + batch_size])
        total += win_probability(rc.double(), rr.double()).sum().item()  # a tie counts one half
    return total / len(pairs)


def num_steps(config: RewardModelConfig, num_pairs: int) -> int:
    """How many optimisation steps ``train`` takes on ``num_pairs`` training pairs (at least 1)."""
    return max(1, math.ceil(config.epochs * num_pairs / config.pairs_per_step))


def train(
    config: RewardModelConfig,
    reward: SequenceClassifierReward,
    pairs: Sequence[Mapping[str, str]],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.optim.Optimizer:
    """Fit ``reward`` (its model trains in place) to the pairs' labels by the Bradley-Terry likelihood."""
    if len(pairs) == 0:
        raise ValueError("no preference pairs to train on")
    steps = num_steps(config, len(pairs))
    optimizer = optimizer or build_optimizer("adamw", reward.model.parameters(), config.lr)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    positions = distributed.shard_positions(config.pairs_per_step)  # this rank's positions (all of them in one process)
    reward.model.train()
    for step in range(start_step, steps):
        set_lr(optimizer, config.lr * lr_factor(step, steps, config.lr_schedule))
        step_pairs = prompt_indices(len(pairs), step, config.pairs_per_step, config.seed)  # global, all ranks
        chosen, rejected = pair_texts([pairs[step_pairs[p]] for p in positions])
        rc, rr = reward.scores(chosen), reward.scores(rejected)  # (b,), (b,)
        loss = bradley_terry_loss(rc, rr).sum() / len(step_pairs)  # the one reduction: mean over the step's pairs (all ranks)
        optimizer.zero_grad(set_to_none=True)
        with distributed.accumulate(reward.model, sync=True):
            loss.backward()
        distributed.reduce_gradients(reward.model, params)  # sum over ranks; nothing in one process
        grad_norm = distributed.as_float(grad_norm_and_clip(params, 0.0))  # measured, never clipped
        optimizer.step()
        margin = (rc - rr).detach()
        wins = win_probability(margin.double(), torch.zeros(())).sum().item()  # a tie counts one half
        total_loss, wins, margin_sum = distributed.all_sum([loss.item(), wins, margin.sum().item()])  # every rank joins
        if on_step is not None:
            on_step(step, {"loss": total_loss, "accuracy": wins / len(step_pairs), "margin": margin_sum / len(step_pairs),
                           "grad_norm": grad_norm, "learning_rate": learning_rate(optimizer)})
    reward.model.eval()
    return optimizer


def config_dict(config: RewardModelConfig) -> dict:
    return asdict(config)
