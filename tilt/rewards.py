"""Calling a user's reward and checking what comes back.

A reward is any callable ``f(prompts, completions, **columns) -> sequence of floats``, one per completion
(the convention of TRL's reward functions). The checks here make a broken reward stop a run with the sample
that broke it, instead of silently training on garbage.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

RewardFn = Callable[..., Any]


class RewardError(RuntimeError):
    """A reward function raised, returned the wrong number of values, or returned NaN/inf."""


def _show(x: Any, limit: int = 200) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "...'"


def score_rewards(reward_fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
    """Call ``reward_fn`` on a batch and return its values as a float64 tensor (B,).

    Raises ``RewardError`` naming the first prompt and completion that broke it: an exception inside the
    reward (re-raised with the batch's first sample, since a batched reward does not say which one failed),
    a wrong number of values, or a non-finite value.
    """
    try:
        values = reward_fn(list(prompts), list(completions), **columns)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        i = _first_failing_sample(reward_fn, prompts, completions, columns)
        where = (
            f"sample {i} of {len(completions)}: prompt {_show(prompts[i])}, completion {_show(completions[i])}"
            if i is not None
            else f"a batch of {len(completions)} samples (each alone scores fine); first prompt {_show(prompts[0])}"
        )
        raise RewardError(
            f"the reward function raised {type(exc).__name__}: {exc}\n  on {where}.\n  Fix the reward function or the data."
        ) from exc
    try:
        values = torch.as_tensor(values if isinstance(values, Tensor) else list(values), dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RewardError(
            f"the reward function returned {_show(values)}, which is not a sequence of floats: it must return one float "
            "per completion."
        ) from exc
    if values.numel() != len(completions):
        raise RewardError(
            f"the reward function returned {values.numel()} values for {len(completions)} completions; "
            "it must return one float per completion."
        )
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise RewardError(
            f"the reward is {values[i].item()} (not finite) for sample {i}: prompt {_show(prompts[i])}, "
            f"completion {_show(completions[i])}. {bad.numel()} of {len(completions)} samples in this batch are "
            "not finite. Fix the reward, or let the run skip such samples where the recipe offers it."
        )
    return values


def _first_failing_sample(reward_fn: RewardFn, prompts, completions, columns) -> int | None:
    """Index of the first sample on which ``reward_fn`` raises when called alone, or None."""
    for i in range(len(completions)):
        one = {k: [v[i]] if isinstance(v, (list, tuple)) and len(v) == len(completions) else v for k, v in columns.items()}
        try:
            reward_fn([prompts[i]], [completions[i]], **one)
        except Exception:  # noqa: BLE001
            return i
    return None


def weighted_sum(rewards: Sequence[tuple[float, RewardFn]]) -> RewardFn:
    """sum_i w_i * f_i(prompts, completions, **columns), for a list of (weight, reward) pairs."""

    def combined(prompts, completions, **columns):
        total = torch.zeros(len(completions), dtype=torch.float64)
        for weight, fn in rewards:
            total += weight * score_rewards(fn, prompts, completions, **columns)
        return total

    return combined


def is_finite_float(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
