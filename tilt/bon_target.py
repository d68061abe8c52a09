"""Best-of-N of pi_ref as a tilted target, and the quantile reward with a known normaliser, as reward wrappers.

Both rewards need the reward's CDF under pi_ref at each completion's reward, (F(r-), F(r)). A *CDF source* is any
callable ``cdf(prompts, rewards (B,)) -> (below (B,), at_or_below (B,))``:

  * ``SampleCDF(calibration)``: from m scored reference samples per prompt (``tilt.infalign.CalibrationSet``, built
    once with ``tilt.infalign.build_calibration``), counting the completion as an (m+1)-th draw
    (``tilt.math.bon_target.sample_cdf_bounds``);
  * ``tilt.lab.bon_distill.ExactCDF``: the exact CDF of an enumerable lab world.

Composition, no new loop (docs/bon_distillation.md):

  * vBoN / BOND's backward part: ``tilt.recipes.kl_rl.train(KLRLConfig(beta=1, ...), policy, ref, BestOfNReward(r, cdf, n), prompts)``;
  * BOND's forward part as a forward-KL target: ``tilt.recipes.dpg.train(DPGConfig(divergence="forward-kl"), policy,
    bon_target(ref, r, cdf, n), prompts)``;
  * QRPO's target: pi_ref exp(QuantileReward / beta) with log Z = ``quantile_log_normaliser(beta)``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor

from tilt.infalign import CalibrationSet
from tilt.math.bon_target import bon_reward, quantile_reward, sample_cdf_bounds
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy
from tilt.target import TiltedTarget

CDF = Callable[[Sequence[Any], Tensor], "tuple[Tensor, Tensor]"]


class SampleCDF:
    """(F(r-), F(r)) from a calibration set: #{z < r}/(m+1) and (#{z <= r} + 1)/(m+1) over the m reference rewards z of
    each prompt. Raises KeyError naming a prompt that was not calibrated."""

    def __init__(self, calibration: CalibrationSet):
        self.calibration = calibration

    def __call__(self, prompts: Sequence[Any], rewards: Tensor) -> tuple[Tensor, Tensor]:
        refs = self.calibration.rows(prompts)  # (B, m)
        below, at = sample_cdf_bounds(rewards.unsqueeze(-1), refs)  # (B, 1) each: one completion per row
        return below.squeeze(-1), at.squeeze(-1)


class BestOfNReward:
    """R_N(x, y) = log pi_BoN(y|x) / pi_ref(y|x) = log[(F^N - F-^N)/(F - F-)] (``tilt.math.bon_target.bon_reward``):
    pi_ref exp(R_N) is best-of-N of pi_ref, with Z = 1 (exactly for the exact CDF; in expectation over calibration
    draws for ``SampleCDF``). A reward like any other: ``f(prompts, completions, **columns) -> (B,) float64``.
    ``raw`` is the wrapped reward (use it to pick the best of N samples)."""

    def __init__(self, reward_fn: RewardFn, cdf: CDF, n: int):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.raw, self.cdf, self.n = reward_fn, cdf, n

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
        raw = score_rewards(self.raw, prompts, completions, **columns)  # (B,)
        below, at = self.cdf(list(prompts), raw)
        return bon_reward(below, at, n=self.n)


class QuantileReward:
    """R(x, y) = beta log E_U[exp(c_U/beta)] in [F(r-), F(r)], F(r) for a continuous reward (QRPO's quantile reward,
    ``tilt.math.bon_target.quantile_reward``), whose normaliser E_ref[exp(R/beta)] = beta (exp(1/beta) - 1) is known."""

    def __init__(self, reward_fn: RewardFn, cdf: CDF, beta: float):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.raw, self.cdf, self.beta = reward_fn, cdf, beta

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
        raw = score_rewards(self.raw, prompts, completions, **columns)  # (B,)
        below, at = self.cdf(list(prompts), raw)
        return quantile_reward(below, at, beta=self.beta)


def bon_target(ref: Policy, reward_fn: RewardFn, cdf: CDF, n: int) -> TiltedTarget:
    """pi_BoN as a ``TiltedTarget``: pi_ref exp(R_N / beta) at beta = 1 (Phi = identity on R_N)."""
    return TiltedTarget(ref=ref, reward=BestOfNReward(reward_fn, cdf, n), beta=1.0)

