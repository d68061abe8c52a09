"""Offline DPO (sigmoid or IPO loss) on a fixed set of preference pairs.

Objective (Rafailov et al. 2023, eq. 7; digest §1.4): minimise over the pairs (x, y+, y-)

    -log sigma(beta * h),   h = [log pi(y+|x) - log pi_ref(y+|x)] - [log pi(y-|x) - log pi_ref(y-|x)],

the Bradley-Terry likelihood of the labels under the implicit reward beta * log(pi/pi_ref); its population
minimiser over all policies is the tilted target pi_ref * exp(r/beta) / Z of the reward behind the labels.
``loss_type="ipo"`` uses (h - 1/(2 beta))^2 (Azar et al. 2023).

The reference may differ from the initial policy (e.g. the SFT model as reference while training starts
elsewhere). Its log-probs on every pair are computed once, before training, and reused in every epoch;
``reference_logprobs`` can be called separately and its result passed to ``train``.

Batch semantics: a step takes ``pairs_per_step`` pairs; an epoch is one pass over a seeded permutation of the
pairs. Loss reduction: mean over the pairs of the step, whatever the micro-batch split.
The recipe sees only the ``Policy`` protocol.

Several processes (``torchrun``; docs/distributed.md): rank r takes the r-th contiguous shard of each step's
pairs; the loss is divided by the global number of pairs of the step and gradients are summed across ranks, so the
updates do not depend on the number of processes. Every rank computes the reference log-probs of all pairs once.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from tilt import distributed
from tilt.math.masking import masked_sum
from tilt.math.preference import dpo_margin, dpo_sigmoid_loss, implicit_reward, ipo_loss
from tilt.recipes.common import build_optimizer, grad_norm_and_clip, learning_rate, micro_batches, prompt_indices
from tilt.rollout import Policy, Rollout

LOSSES = {"sigmoid": dpo_sigmoid_loss, "ipo": ipo_loss}
PAIR_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class DPOConfig:
    """Configuration of offline DPO."""

    beta: float = field(default=0.1, metadata={"help": "KL coefficient; 0.1 as in Rafailov et al. 2023 and TRL's DPOConfig"})
    loss_type: str = field(default="sigmoid", metadata={"help": "'sigmoid' (DPO) or 'ipo' (Azar et al. 2023)"})
    epochs: int = field(default=1, metadata={"help": "passes over the pairs"})
    pairs_per_step: int = field(default=8, metadata={"help": "preference pairs per optimisation step"})
    micro_batch_size: int = field(default=0, metadata={"help": "pairs per forward/backward pass; 0 = the whole step at once"})
    lr: float = field(default=1e-6, metadata={"help": "learning rate; 1e-6 as in TRL's DPOConfig"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    eval_every: int = field(default=0, metadata={"help": "with held-out pairs: evaluate them every this many steps and after the last (eval/* metrics); 0 = after the last only"})
    seed: int = field(default=0, metadata={"help": "seed of the pair order"})

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSSES:
            raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")
        if self.epochs < 0 or self.pairs_per_step < 1 or self.micro_batch_size < 0:
            raise ValueError("epochs must be >= 0, pairs_per_step >= 1 and micro_batch_size >= 0")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = evaluate the held-out pairs after the last step only), got {self.eval_every}")


@dataclass(frozen=True)
class PreferencePairs:
    """Aligned rollouts: pair i is (chosen[i], rejected[i]) for the same prompt."""

    chosen: Rollout  # (N,)
    rejected: Rollout  # (N,)

    def __post_init__(self):
        if len(self.chosen) != len(self.rejected):
            raise ValueError(f"{len(self.chosen)} chosen but {len(self.rejected)} rejected completions; pairs must align")

    def __len__(self) -> int:
        return len(self.chosen)


@torch.no_grad()
def reference_logprobs(ref: Policy, pairs: PreferencePairs, micro_batch_size: int = 0) -> tuple[Tensor, Tensor]:
    """(N,), (N,): log pi_ref of every chosen and rejected completion, computed once."""
    out = []
    for rollout in (pairs.chosen, pairs.rejected):
        parts = []
        for part in micro_batches(len(rollout), micro_batch_size):
            sub = rollout.take(part)
            parts.append(masked_sum(ref.token_logprobs(sub), sub.completion_mask))
        out.append(torch.cat(parts))
    return out[0], out[1]


def num_steps(config: DPOConfig, num_pairs: int) -> int:
    """How many optimisation steps ``train`` takes on ``num_pairs`` pairs: ceil(epochs * pairs / pairs_per_step)."""
    return math.ceil(config.epochs * num_pairs / config.pairs_per_step)
def pair_sums(lp_chosen: Tensor, lp_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float) -> dict[str, float]:
    """Sums over the pairs (all (b,)) of TRL's per-pair DPO quantities: the implicit rewards r = beta * (log pi -
    log pi_ref) of the chosen and rejected completions, their difference, whether the chosen one's is higher, and
    the policy's sequence log-probs. Divide by the number of pairs for TRL's means."""
    r_c = implicit_reward(lp_chosen, ref_chosen, beta=beta).detach().double()  # (b,)
    r_r = implicit_reward(lp_rejected, ref_rejected, beta=beta).detach().double()
    return {"rewards/chosen": r_c.sum().item(), "rewards/rejected": r_r.sum().item(), "rewards/margins": (r_c - r_r).sum().item(),
            "rewards/accuracies": (r_c > r_r).double().sum().item(), "logps/chosen": lp_chosen.detach().double().sum().item(),
            "logps/rejected": lp_rejected.detach().double().sum().item()}


@torch.no_grad()
def evaluate_pairs(config: DPOConfig, policy: Policy, pairs: PreferencePairs, ref_logprobs: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Held-out metrics: the mean over ``pairs`` of the loss, accuracy (h > 0) and :func:`pair_sums`' quantities,
    each key prefixed ``eval/``. No gradient; micro-batched like training. Every process evaluates all the pairs."""
    n = len(pairs)
    sums: dict[str, float] = {}
    for part in micro_batches(n, config.micro_batch_size):
        chosen, rejected = pairs.chosen.take(part), pairs.rejected.take(part)
        lp_c = masked_sum(policy.token_logprobs(chosen), chosen.completion_mask)  # (b,)
        lp_r = masked_sum(policy.token_logprobs(rejected), rejected.completion_mask)
        ref_c, ref_r = ref_logprobs[0][part], ref_logprobs[1][part]
        values = {"loss": LOSSES[config.loss_type](lp_c, lp_r, ref_c, ref_r, beta=config.beta).double().sum().item(),
                  "accuracy": (dpo_margin(lp_c, lp_r, ref_c, ref_r) > 0).double().sum().item(),
                  **pair_sums(lp_c, lp_r, ref_c, ref_r, beta=config.beta)}
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
    return {f"eval/{key}": value / n for key, value in sums.items()}


def train(
    config: DPOConfig,
    policy: Policy,
    ref: Policy,
    pairs: PreferencePairs,
    *,
    ref_logprobs: tuple[Tensor, Tensor] | None = None,
    eval_pairs: PreferencePairs | None = None,
    eval_ref_logprobs: tuple[Tensor, Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    start_step: int = 0,
) -> torch.optim.Optimizer:
    """Train ``policy`` by DPO on ``pairs`` against ``ref`` (any policy; not necessarily the initial one).

    ``ref_logprobs`` = (chosen, rejected) reference log-probs, if already computed; otherwise computed once here.
    ``on_step(step, metrics)`` gets loss, reward_margin (mean beta*h), accuracy (fraction with h > 0), TRL's
    ``rewards/*`` and ``logps/*`` means (:func:`pair_sums`), ``grad_norm`` (before clipping), ``learning_rate`` and
    ``step_time`` (seconds), over the whole step (all ranks). ``eval_pairs`` (held out: never trained on), with their
    reference log-probs ``eval_ref_logprobs`` (computed here if None), are evaluated every ``config.eval_every`` steps
    and after the last step: :func:`evaluate_pairs`' ``eval/*`` keys join that step's metrics. ``start_step``
    resumes a run: steps before it are skipped (the pair order is a pure function of the step). Under several
    processes, ``pairs_per_step`` must be a multiple of the world size.
    """
    n = len(pairs)
    if n == 0:
        raise ValueError("no preference pairs to train on")
    distributed.check_same_config({"recipe": "dpo", **asdict(config), "pairs": distributed.config_hash(
        [pairs.chosen.prompts, pairs.chosen.completions, pairs.rejected.completions])})
    positions = list(distributed.shard_positions(config.pairs_per_step))  # all positions in one process
    ref_chosen, ref_rejected = ref_logprobs if ref_logprobs is not None else reference_logprobs(ref, pairs, config.micro_batch_size)
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    loss_fn = LOSSES[config.loss_type]
    steps = num_steps(config, n)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if eval_pairs is not None and eval_ref_logprobs is None:
        eval_ref_logprobs = reference_logprobs(ref, eval_pairs, config.micro_batch_size)
    for step in range(start_step, steps):
        started = time.perf_counter()
        step_pairs = prompt_indices(n, step, config.pairs_per_step, config.seed)  # epochs of a seeded permutation
        n_step = len(step_pairs)  # pairs of the step over all ranks
        index = torch.tensor([step_pairs[p] for p in positions])  # this rank's shard (all of them in one process)
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "reward_margin": 0.0, "accuracy": 0.0, **dict.fromkeys(PAIR_KEYS, 0.0)}
        parts = micro_batches(len(index), config.micro_batch_size)
        for i, part in enumerate(parts):
            sub = index[part]
            chosen, rejected = pairs.chosen.take(sub), pairs.rejected.take(sub)
            lp_c = masked_sum(policy.token_logprobs(chosen), chosen.completion_mask)  # (b,)
            lp_r = masked_sum(policy.token_logprobs(rejected), rejected.completion_mask)
            per_pair = loss_fn(lp_c, lp_r, ref_chosen[sub], ref_rejected[sub], beta=config.beta)  # (b,)
            loss = per_pair.sum() / n_step  # the one reduction: mean over the step's pairs (of all ranks)
            with distributed.accumulate(policy, sync=i == len(parts) - 1):
                loss.backward()
            h = dpo_margin(lp_c, lp_r, ref_chosen[sub], ref_rejected[sub]).detach()
            totals["loss"] += loss.item()
            totals["reward_margin"] += config.beta * h.sum().item() / n_step
            totals["accuracy"] += (h > 0).to(torch.float64).sum().item() / n_step
            for key, value in pair_sums(lp_c, lp_r, ref_chosen[sub], ref_rejected[sub], beta=config.beta).items():
                totals[key] += value / n_step
        distributed.reduce_gradients(policy, params)  # sum over ranks; nothing in one process
        grad_norm = distributed.as_float(grad_norm_and_clip(params, config.max_grad_norm))  # every step, clipped or not
        optimizer.step()
        totals = dict(zip(totals, distributed.all_sum(list(totals.values()))))
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {totals['loss']}; lower the learning rate")
        totals.update(grad_norm=grad_norm, learning_rate=learning_rate(optimizer), step_time=time.perf_counter() - started)
        if eval_pairs is not None and (step + 1 == steps or (config.eval_every and (step + 1) % config.eval_every == 0)):
            totals.update(evaluate_pairs(config, policy, eval_pairs, eval_ref_logprobs))
        if on_step is not None:
            on_step(step, totals)
    return optimizer


def config_dict(config: DPOConfig) -> dict:
    return asdict(config)
