"""QRPO: regression onto the posterior of the quantile reward, whose normaliser is known in closed form.

Objective (Matrenok et al. 2025, "Quantile reward policy optimization"; loss and Eq. 11 as in the authors' released
snippet [V-code], the rest from recall): with R(x, y) the quantile reward (the reward's CDF under pi_ref at r(y), made
tie-aware: ``tilt.math.bon_target.quantile_reward``), the target pi* ∝ pi_ref exp(R/beta) has

    log Z = log E_ref[exp(R/beta)] = log(beta (exp(1/beta) - 1))     for every prompt, ties or not

so the regression (beta log(pi(y)/pi_ref(y)) - (R(y) - beta log Z))^2 (``regression_loss`` with V = beta log Z) needs no
value estimate. Its fixed point is pi* whatever the distribution of the regressed completions; the lab reaches it to
1e-6 (tests/test_apo.py). This is A*-PO's loss with a V* that is exact by construction.

Estimator, per step: P prompts, K completions each, from the reference (``sampling="reference"``: offline, the paper's
setting, reference completions as training data) or from the policy (``"policy"``: on-policy, like A*-PO); their
quantile reward from the CDF source (``SampleCDF`` over ``calibration_samples`` scored reference completions per prompt
by default); the squared loss averaged over the step's sequences.

Departures: (i) the paper's quantile is the plain empirical CDF mean(z <= r), and its log Z drops the -1 (log beta +
1/beta); here the CDF counts the completion as an (m+1)-th draw and spreads a tie class uniformly, which makes
E_ref[exp(R/beta)] = beta (exp(1/beta) - 1) exact for discrete rewards too (module docstring of
``tilt.math.bon_target``), and log Z keeps the -1. (ii) The paper trains on a fixed offline data set; ``"reference"``
draws fresh reference completions each step (the same distribution). One process only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from tilt.bon_target import CDF, SampleCDF
from tilt.infalign import build_calibration, distinct_prompts
from tilt.math.bon_target import quantile_log_normaliser, quantile_reward
from tilt.recipes.apo import check_schedule, regression_step, require_one_process, step_batch
from tilt.recipes.common import build_optimizer
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy

SAMPLING = ("reference", "policy")


@dataclass(frozen=True)
class QRPOConfig:
    """Configuration of QRPO. Batch semantics: each step draws ``prompts_per_step`` prompts and ``samples_per_prompt``
    completions of each from the sampler ``sampling`` names."""

    beta: float = field(default=0.1, metadata={"help": "KL coefficient; 0.1 is TRL's DPO default (the paper sweeps beta; its values were not retrieved)"})
    sampling: str = field(default="reference", metadata={"help": "'reference' (offline, the paper's setting) or 'policy' (on-policy) completions to regress on"})
    calibration_samples: int = field(default=32, metadata={"help": "m, scored reference completions per prompt for the quantile; 32 as CTRL's default "
                                                           "(tilt.infalign.CalibrationConfig; the paper uses more, not retrieved)"})
    calibration_seed: int = field(default=0, metadata={"help": "seed of the one generator the calibration samples are drawn from"})
    steps: int = field(default=100, metadata={"help": "number of optimisation steps (one fresh batch each)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts drawn per step"})
    samples_per_prompt: int = field(default=1, metadata={"help": "completions per prompt per step (a pointwise loss: 1 suffices)"})
    lr: float = field(default=5e-7, metadata={"help": "learning rate; 5e-7 as TRL's DPO examples for full fine-tuning (the paper's values were not retrieved)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant' or 'linear' (decay to 0 at the last step)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from 0 to lr"})
    micro_batch_size: int = field(default=0, metadata={"help": "sequences per forward/backward pass; 0 = the whole step at once"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order and sampling"})

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be 'reference' or 'policy', got {self.sampling!r}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        check_schedule(self)


def num_steps(config: QRPOConfig) -> int:
    """The number of optimisation steps the config means."""
    return config.steps


def build_cdf(config: QRPOConfig, ref: Policy, reward_fn: RewardFn, prompts: Sequence[Any]) -> SampleCDF:
    """The quantile's CDF source: ``calibration_samples`` reference completions of every distinct prompt, scored once."""
    return SampleCDF(build_calibration(ref, reward_fn, distinct_prompts(prompts), config.calibration_samples, seed=config.calibration_seed))


def train(
    config: QRPOConfig,
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
    """Run ``config.steps`` steps of QRPO toward pi* ∝ pi_ref exp(R/beta), R the quantile reward of ``reward_fn``.
    ``cdf(prompts, rewards) -> (F(r-), F(r))``: None builds ``SampleCDF`` from ``calibration_samples`` reference
    completions (deterministic in ``calibration_seed``, so a resumed run rebuilds the same one). Metrics: docs/apo.md,
    plus ``quantile`` (mean R of the step's completions) and ``log_z``. Returns the optimizer."""
    if len(prompts) == 0:
        raise ValueError("no prompts to train on")
    require_one_process("QRPO")
    if cdf is None:
        cdf = build_cdf(config, ref, reward_fn, prompts)
    log_z = quantile_log_normaliser(config.beta)
    sampler = ref if config.sampling == "reference" else policy
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    for step in range(start_step, config.steps):
        batch, seeds = step_batch(config, optimizer, prompts, step)
        rollout = sampler.sample(batch, config.samples_per_prompt, prompt_seeds=seeds, exact=True)  # kl_ref below reads them as pi's
        raw = score_rewards(reward_fn, rollout.prompts, rollout.completions)  # (B,)
        below, at = cdf(rollout.prompts, raw)
        quantiles = quantile_reward(below, at, beta=config.beta)  # (B,)
        values = torch.full_like(quantiles, config.beta * log_z)  # V = beta log Z, the same for every prompt
        metrics = regression_step(policy, ref, rollout, quantiles, values, optimizer, beta=config.beta,
                                  micro_batch_size=config.micro_batch_size, max_grad_norm=config.max_grad_norm)
        metrics.update(quantile=metrics.pop("reward"), raw_reward=raw.mean().item(), log_z=log_z)
        if config.sampling == "policy":
            metrics["kl_ref"] = metrics["log_ratio"]
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {metrics['loss']}; lower the learning rate")
        if on_step is not None:
            on_step(step, metrics)
    return optimizer


def config_dict(config: QRPOConfig) -> dict:
    return asdict(config)
