"""BOND with the Jeffreys divergence: distil best-of-N of the reference by a mix of forward and backward KL.

Objective (Sessa et al. 2024, "BOND: aligning LLMs with best-of-N distillation", §4-5; from recall):

    minimise  (1 - w) KL(pi_BoN || pi) + w KL(pi || pi_BoN),   w = ``jeffreys_weight``

both parts zero exactly at pi = pi_BoN, the best-of-N distribution of pi_ref (``tilt.math.bon_target``).

Estimator, per step: P prompts.
  * forward part: N completions of each prompt from pi_ref, keep the best by the raw reward (the first on ties), and
    minimise -log pi(y_best): an unbiased estimate of the forward KL's gradient needing no CDF (best-of-N samples of
    pi_ref are the proposal, with importance weight pi_BoN/q = 1: DPG with q = pi_BoN);
  * backward part: K completions of each prompt from pi, the best-of-N reward R_N = log pi_BoN/pi_ref
    (``tilt.bon_target.BestOfNReward``, from the CDF source), the shaped reward R_N - (log pi - log pi_ref) (KL-RL at
    beta = 1, whose target is pi_BoN: vBoN), a leave-one-out baseline over the K samples and the REINFORCE loss;
  * loss = (1 - w) * mean over the P best samples + w * mean over the P*K policy samples.
w = 0 is BOND's forward part alone (supervised fine-tuning on best-of-N); w = 1 is vBoN / BOND's backward part (the same
update as ``tilt.recipes.kl_rl`` at beta = 1 on ``BestOfNReward``, which is the composition to use for it).

Departures: the paper's practical algorithm (J-BOND) distils best-of-2 of a moving anchor (an exponential moving
average of the policy) over many iterations, and estimates the quantile from the anchor's samples; here the target is
best-of-N of the fixed pi_ref, so the fixed point is pi_BoN exactly, checked in the lab (tests/test_bon_distill.py).
The backward part's quantile comes from ``calibration_samples`` scored reference completions per prompt (by default;
``cdf`` replaces it); that estimate makes R_N, and so the backward part's target, approximate, while the forward
part is exact. One process only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from tilt.bon_target import CDF, BestOfNReward, SampleCDF
from tilt.infalign import build_calibration, distinct_prompts
from tilt.math.bc import bc_loss
from tilt.math.infalign import best_of_n_index
from tilt.math.masking import masked_sum
from tilt.math.pg import kl_shaped_reward, leave_one_out_advantage, reinforce_loss
from tilt.recipes.apo import check_schedule, require_one_process, step_batch
from tilt.recipes.common import build_optimizer, derive_seed
from tilt.recipes.kl_rl import score_tokens
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy


@dataclass(frozen=True)
class BONDConfig:
    """Configuration of Jeffreys BOND. Batch semantics: each step draws ``prompts_per_step`` prompts; for each, ``n``
    reference completions (one best kept) and ``samples_per_prompt`` policy completions."""

    n: int = field(default=4, metadata={"help": "N of best-of-N (>= 1); 4 as tilt's CTRL experiments (docs/infalign.md); the paper distils N up to 256 (from recall)"})
    jeffreys_weight: float = field(default=0.5, metadata={"help": "w, the weight of the backward KL (1 - w on the forward KL); 0.5 as in Sessa et al. 2024 (from recall)"})
    steps: int = field(default=100, metadata={"help": "number of optimisation steps (one fresh batch each)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts drawn per step"})
    samples_per_prompt: int = field(default=4, metadata={"help": "policy completions per prompt for the backward part (K >= 2 for the leave-one-out baseline); 4 as in KL-RL"})
    calibration_samples: int = field(default=32, metadata={"help": "m, scored reference completions per prompt for the backward part's quantile; 32 as CTRL's default"})
    calibration_seed: int = field(default=0, metadata={"help": "seed of the one generator the calibration samples are drawn from"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate; 1e-5 as KL-RL's default (the paper's value was not retrieved)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant' or 'linear' (decay to 0 at the last step)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from 0 to lr"})
    micro_batch_size: int = field(default=0, metadata={"help": "must be 0 (the whole step at once): micro-batching is not implemented for the two-part loss"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order and sampling"})

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 0.0 <= self.jeffreys_weight <= 1.0:
            raise ValueError(f"jeffreys_weight must be in [0, 1] (0 = forward KL only, 1 = backward KL only), got {self.jeffreys_weight}")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2: the leave-one-out baseline needs two samples of a prompt")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.micro_batch_size != 0:
            raise ValueError("micro_batch_size must be 0 for BOND (the whole step at once); lower prompts_per_step instead")
        check_schedule(self)


def num_steps(config: BONDConfig) -> int:
    """The number of optimisation steps the config means."""
    return config.steps


def bond_step(config: BONDConfig, policy: Policy, ref: Policy, reward: BestOfNReward, prompts: Sequence[Any],
              optimizer: torch.optim.Optimizer, prompt_seeds: Sequence[int], ref_seeds: Sequence[int]) -> dict[str, float]:
    """One step of the Jeffreys mix. ``reward`` is the best-of-N reward (its ``raw`` picks the best of N reference
    samples). Returns the step's metrics (docs/bon_distillation.md)."""
    w, k, p = config.jeffreys_weight, config.samples_per_prompt, len(prompts)
    with torch.no_grad():  # forward part's data: best of N reference samples per prompt
        ref_rollout = ref.sample(list(prompts), config.n, prompt_seeds=ref_seeds, exact=True)
        ref_raw = score_rewards(reward.raw, ref_rollout.prompts, ref_rollout.completions).view(p, config.n)  # (P, N)
        best_rows = torch.arange(p) * config.n + best_of_n_index(ref_raw)
        best = ref_rollout.take(best_rows)
        rollout = policy.sample(list(prompts), k, prompt_seeds=prompt_seeds, exact=True)  # backward part: on-policy samples
        bon_rewards = reward(rollout.prompts, rollout.completions)  # (B,) R_N
        mask = rollout.completion_mask
        old_seq = rollout.sample_seq_logprobs if rollout.sampled_from_policy else masked_sum(score_tokens(policy, rollout, 0), mask)
        ref_seq = masked_sum(score_tokens(ref, rollout, 0), mask)  # (B,)
        bon_rewards = bon_rewards.to(old_seq.dtype)
        shaped = kl_shaped_reward(bon_rewards, old_seq, ref_seq, beta=1.0)  # (B,) = -(log pi/pi_BoN) per sample
        advantages = leave_one_out_advantage(shaped.view(-1, k)).view(-1)  # (B,)

    optimizer.zero_grad(set_to_none=True)
    forward = bc_loss(policy.token_logprobs(best), best.completion_mask).sum() / p  # mean over the P best samples
    backward = reinforce_loss(policy.token_logprobs(rollout), advantages, mask).sum() / len(rollout)  # mean over P*K samples
    loss = (1 - w) * forward + w * backward
    loss.backward()
    grad_norm = 0.0
    if config.max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], config.max_grad_norm))
    optimizer.step()
    return {
        "loss": loss.item(),
        "forward_nll": forward.item(),
        "backward_loss": backward.item(),
        "kl_bon": (-shaped).mean().item(),
        "bon_reward": bon_rewards.mean().item(),
        "kl_ref": (old_seq - ref_seq).mean().item(),
        "best_reward": ref_raw.amax(-1).mean().item(),
        "completion_length": mask.sum(-1).float().mean().item(),
        "grad_norm": grad_norm,
    }


def train(
    config: BONDConfig,
    policy: Policy,
    ref: Policy,
    reward_fn: RewardFn,
    prompts: Sequence[Any],
    *,
    cdf: CDF | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.optim.Optimizer:
    """Run ``config.steps`` steps of Jeffreys BOND of ``policy`` toward best-of-N of ``ref`` under ``reward_fn``.
    ``cdf(prompts, rewards) -> (F(r-), F(r))``: None builds ``SampleCDF`` from ``calibration_samples`` reference
    completions (deterministic in ``calibration_seed``; not drawn when ``jeffreys_weight`` = 0, which needs no CDF).
    Returns the optimizer."""
    if len(prompts) == 0:
        raise ValueError("no prompts to train on")
    require_one_process("BOND")
    if cdf is None:
        if config.jeffreys_weight > 0:
            calibration = build_calibration(ref, reward_fn, distinct_prompts(prompts), config.calibration_samples, seed=config.calibration_seed)
            cdf = SampleCDF(calibration)
        else:
            cdf = _no_cdf
    reward = BestOfNReward(reward_fn, cdf, config.n)
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    for step in range(start_step, config.steps):
        batch, seeds = step_batch(config, optimizer, prompts, step)
        ref_seeds = [derive_seed(s, "best-of-n") for s in seeds]
        metrics = bond_step(config, policy, ref, reward, batch, optimizer, seeds, ref_seeds)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {metrics['loss']}; lower the learning rate")
        if on_step is not None:
            on_step(step, metrics)
    return optimizer


def _no_cdf(prompts: Sequence[Any], rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CDF source for jeffreys_weight = 0, where R_N is only logged: F(r-) = F(r) = 1 (R_N = log N)."""
    ones = torch.ones(len(prompts), dtype=torch.float64)
    return ones, ones


def config_dict(config: BONDConfig) -> dict:
    return asdict(config)
