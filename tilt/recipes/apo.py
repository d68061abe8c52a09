"""A*-PO: regression of the implicit reward onto the optimal advantage, with V* estimated once from the reference.

Objective (Brantley et al. 2025, "Accelerating RL for LLM reasoning with optimal advantage regression"; stage names
and defaults as TRL's A2PO documents them [V-docs]; the rest from recall):

  stage 1 (offline, once): m = ``value_samples`` completions of each prompt from pi_ref, scored once;
      V*(x) = beta_1 log mean_j exp(r_j / beta_1)       (``tilt.math.bon_target.soft_value``)
  stage 2 (on-policy): each step, K = ``samples_per_prompt`` completions of each prompt from pi (1 in the paper);
      minimise mean over samples of (beta_2 log(pi(y)/pi_ref(y)) - (r(y) - V*(x)))^2   (``regression_loss``)

With beta_1 = beta_2 = beta and V* exact, the loss is zero exactly at pi* ∝ pi_ref exp(r/beta), whatever the sampling
distribution, and every sample's gradient vanishes there: training reaches pi* with no noise floor (shown in the lab to
1e-6, tests/test_apo.py). The paper takes beta_1 = 1/2 and beta_2 = 1e-3: then beta_2 log pi/pi_ref = r - V* has no
normalised solution, and the regression is a projection onto the policies, not the posterior at either beta; say
which one you want (``value_beta`` = ``beta`` gives the posterior).

Departures: V* is estimated from the calibration set of ``tilt.infalign`` (the same scored reference samples CTRL and
QRPO use; a run can share one), or given exactly (``values``); the squared loss is averaged over the step's sequences;
no filtering of prompts whose reference samples all fail (TRL's ``filter_all_incorrect``). One process only.

The recipe sees only the ``Policy`` protocol: it runs on Hugging Face models and in the lab.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tilt import distributed
from tilt.infalign import CalibrationSet, build_calibration, distinct_prompts
from tilt.math.bon_target import regression_loss, soft_value
from tilt.math.masking import masked_sum
from tilt.recipes.common import build_optimizer, lr_factor, micro_batches, prompt_indices, set_lr, step_prompt_seeds
from tilt.recipes.kl_rl import score_tokens
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy, Rollout

ValueFn = Callable[[Sequence[Any]], Tensor]
"""``values(prompts) -> (B,)`` the baseline V(x) of each prompt."""


@dataclass(frozen=True)
class APOConfig:
    """Configuration of A*-PO. Batch semantics: each step draws ``prompts_per_step`` prompts and ``samples_per_prompt``
    completions of each from the policy."""

    beta: float = field(default=1e-3, metadata={"help": "beta_2, the KL coefficient of the regression; 1e-3 as in Brantley et al. 2025 (TRL's A2PO beta2)"})
    value_beta: float = field(default=0.5, metadata={"help": "beta_1 of V* = beta_1 log mean exp(r/beta_1); 0.5 as in Brantley et al. 2025 (TRL's beta1); "
                                                     "set it equal to beta for a fixed point at the posterior pi*"})
    value_samples: int = field(default=8, metadata={"help": "m, reference completions per prompt for V* (stage 1); 8 as in Brantley et al. 2025 (TRL's num_value_samples)"})
    value_seed: int = field(default=0, metadata={"help": "seed of the one generator the stage-1 reference samples are drawn from"})
    steps: int = field(default=100, metadata={"help": "number of optimisation steps (one fresh batch each)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts drawn per step"})
    samples_per_prompt: int = field(default=1, metadata={"help": "completions per prompt per step; 1 as in the paper (no group baseline is needed)"})
    lr: float = field(default=1e-6, metadata={"help": "learning rate; 1e-6 is TRL's GRPO default (the paper's value was not retrieved)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant' or 'linear' (decay to 0 at the last step)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from 0 to lr"})
    micro_batch_size: int = field(default=0, metadata={"help": "sequences per forward/backward pass; 0 = the whole step at once"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order and sampling"})

    def __post_init__(self):
        if not self.beta > 0 or not self.value_beta > 0:
            raise ValueError(f"beta and value_beta must be > 0, got {self.beta} and {self.value_beta}")
        if self.value_samples < 1 or self.samples_per_prompt < 1:
            raise ValueError(f"value_samples and samples_per_prompt must be >= 1, got {self.value_samples} and {self.samples_per_prompt}")
        check_schedule(self)


def check_schedule(config) -> None:
    """The batch and schedule checks every regression and distillation recipe shares (fields of the same names)."""
    if config.prompts_per_step < 1 or config.steps < 0:
        raise ValueError(f"prompts_per_step must be >= 1 and steps >= 0, got {config.prompts_per_step} and {config.steps}")
    if config.lr_schedule not in ("constant", "linear") or config.warmup_steps < 0:
        raise ValueError(f"lr_schedule must be 'constant' or 'linear' and warmup_steps >= 0, got {config.lr_schedule!r}")
    if config.micro_batch_size < 0 or config.max_grad_norm < 0:
        raise ValueError("micro_batch_size (0 = whole step) and max_grad_norm (0 = no clipping) must be >= 0")
    if config.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")


def require_one_process(recipe: str) -> None:
    """These recipes do not shard a step across processes: stop under ``torchrun`` with several ranks, before any
    rank trains alone on the whole batch."""
    if distributed.world_size() > 1:
        raise RuntimeError(f"{recipe} runs in one process (it does not shard steps across ranks); launch it without torchrun "
                           "or with --nproc_per_node 1")


def step_batch(config, optimizer: torch.optim.Optimizer, prompts: Sequence[Any], step: int) -> tuple[list, list[int]]:
    """Set ``step``'s learning rate and return its prompts and one sampling seed per prompt (pure functions of the
    step, so a resumed run reads and samples exactly what the uninterrupted run would; one process)."""
    set_lr(optimizer, config.lr * lr_factor(step, config.steps, config.lr_schedule, config.warmup_steps))
    batch = [prompts[i] for i in prompt_indices(len(prompts), step, config.prompts_per_step, config.seed)]
    return batch, step_prompt_seeds(config.seed, step, range(len(batch)))


def num_steps(config: APOConfig) -> int:
    """The number of optimisation steps the config means."""
    return config.steps


class CalibrationValues:
    """V*(x) = beta log mean_j exp(r_j / beta) over the calibration samples of x (A*-PO stage 1)."""

    def __init__(self, calibration: CalibrationSet, beta: float):
        self.calibration, self.beta = calibration, beta

    def __call__(self, prompts: Sequence[Any]) -> Tensor:
        return soft_value(self.calibration.rows(prompts), beta=self.beta)  # (B,)


def estimate_values(config: APOConfig, ref: Policy, reward_fn: RewardFn, prompts: Sequence[Any]) -> CalibrationValues:
    """Stage 1: ``value_samples`` reference completions of every distinct prompt, scored once, and V* from them."""
    calibration = build_calibration(ref, reward_fn, distinct_prompts(prompts), config.value_samples, seed=config.value_seed)
    return CalibrationValues(calibration, config.value_beta)


def regression_step(
    policy: Policy,
    ref: Policy,
    rollout: Rollout,
    rewards: Tensor,
    values: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    beta: float,
    micro_batch_size: int,
    max_grad_norm: float,
) -> dict[str, float]:
    """One least-squares step of beta log(pi/pi_ref) onto r - V on ``rollout``'s sequences (from any sampler), with
    ``rewards`` and ``values`` (B,). The one reduction: mean over the rollout's sequences. Returns the step's metrics."""
    mask = rollout.completion_mask  # (B, T) True where a token counts
    n_seq = len(rollout)
    ref_seq = masked_sum(score_tokens(ref, rollout, micro_batch_size), mask)  # (B,)
    rewards, values = rewards.to(ref_seq.dtype), values.to(ref_seq.dtype)
    optimizer.zero_grad(set_to_none=True)
    total, log_ratios = 0.0, []
    for part in micro_batches(n_seq, micro_batch_size):
        sub = rollout.take(part)
        seq = masked_sum(policy.token_logprobs(sub), sub.completion_mask)  # (b,) with grad
        loss = regression_loss(seq, ref_seq[part], rewards[part], values[part], beta=beta).sum() / n_seq
        loss.backward()
        total += loss.item()
        log_ratios.append((seq.detach() - ref_seq[part]))
    grad_norm = 0.0
    if max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm))
    optimizer.step()
    log_ratio = torch.cat(log_ratios)  # (B,) log pi/pi_ref before the update
    residual = beta * log_ratio - (rewards - values)  # (B,)
    return {
        "loss": total,
        "reward": rewards.mean().item(),
        "value": values.mean().item(),
        "advantage": (rewards - values).mean().item(),
        "implicit_reward": (beta * log_ratio).mean().item(),
        "residual_abs": residual.abs().mean().item(),
        "log_ratio": log_ratio.mean().item(),
        "completion_length": mask.sum(-1).float().mean().item(),
        "truncated_fraction": rollout.truncated.float().mean().item(),
        "grad_norm": grad_norm,
    }


def train(
    config: APOConfig,
    policy: Policy,
    ref: Policy,
    reward_fn: RewardFn,
    prompts: Sequence[Any],
    *,
    values: ValueFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.optim.Optimizer:
    """Run ``config.steps`` steps of A*-PO. ``values(prompts) -> (B,)`` gives V*(x); None runs stage 1
    (``estimate_values``: deterministic in ``value_seed``, so a resumed run rebuilds the same V*).
    ``on_step(step, metrics)`` is called after each step (metrics: docs/apo.md, plus ``kl_ref``, the k1 estimate of
    KL(pi || pi_ref) on the step's own samples). Returns the optimizer."""
    if len(prompts) == 0:
        raise ValueError("no prompts to train on")
    require_one_process("A*-PO")
    if values is None:
        values = estimate_values(config, ref, reward_fn, prompts)
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    for step in range(start_step, config.steps):
        batch, seeds = step_batch(config, optimizer, prompts, step)
        rollout = policy.sample(batch, config.samples_per_prompt, prompt_seeds=seeds, exact=True)  # kl_ref below reads them as pi's
        rewards = score_rewards(reward_fn, rollout.prompts, rollout.completions)  # (B,)
        metrics = regression_step(policy, ref, rollout, rewards, values(rollout.prompts), optimizer, beta=config.beta,
                                  micro_batch_size=config.micro_batch_size, max_grad_norm=config.max_grad_norm)
        metrics["kl_ref"] = metrics["log_ratio"]  # on-policy samples: the mean log-ratio is the k1 estimate of KL(pi || pi_ref)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {metrics['loss']}; lower the learning rate or check the reward scale")
        if on_step is not None:
            on_step(step, metrics)
    return optimizer


def config_dict(config: APOConfig) -> dict:
    return asdict(config)
