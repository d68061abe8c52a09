"""What every policy hands to every recipe: a batch of sampled completions, and the protocol a policy follows.

A recipe sees only this protocol, so the same recipe runs on a Hugging Face causal LM (``tilt.engine``)
and on a tabular policy of the exact lab (``tilt.lab``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rollout:
    """Completions sampled for a batch of prompts, K per prompt, grouped: sample ``p * K + k`` is the k-th
    completion of prompt p.

    Shapes: B = P * K sequences, Tp prompt tokens (left-padded), T completion tokens (right-padded).
    """

    prompts: list  # (B,) the prompt of each sample, repeated K times
    completions: list  # (B,) decoded completions (text for LMs, token tuples in the lab)
    prompt_ids: Tensor  # (B, Tp) long, left-padded
    prompt_mask: Tensor  # (B, Tp) bool, True on real prompt tokens
    completion_ids: Tensor  # (B, T) long, right-padded
    completion_mask: Tensor  # (B, T) bool, True up to and including the first EOS
    truncated: Tensor  # (B,) bool, True where no EOS came before the length limit
    sample_token_logprobs: Tensor  # (B, T) log-prob of each token under the *sampling* distribution, 0 off-mask
    samples_per_prompt: int  # K
    sampled_from_policy: bool = True  # True when the sampling distribution is the policy's own (temperature 1, no top-k/p)
    # which copy of the policy drew the completions: 'exact' (the policy itself, possibly tempered/truncated), a
    # reduced-precision proposal q ('int8', 'int8-smooth', 'fp16', 'bf16'; tilt.engine.fast_sampler), or 'autocast'
    # (the policy's own weights decoded under autocast, docs/runs.md "Precision"); recipes weight a proposal's
    # samples by pi/q
    sampler: str = "exact"
    sampler_refresh_seconds: float = 0.0  # seconds spent bringing the sampler copy up to date before this draw

    @property
    def from_proposal(self) -> bool:
        """True when a reduced-precision copy q of the policy drew the completions: ``sample_token_logprobs`` are
        log q, and recipes weight each sequence by pi/q (``tilt.math.mismatch``)."""
        return self.sampler != "exact"

    @property
    def of_the_model(self) -> bool:
        """True when the samples follow the model's own law: drawn from it exactly, or by its own weights under
        autocast (rounded otherwise than the scoring pass: ``sample_token_logprobs`` then differ from the scorer's by
        that rounding, 0.03 nats a sequence on SmolLM2-135M). Evaluation and the k1 diagnostics need this."""
        return self.sampled_from_policy or self.sampler == "autocast"

    @property
    def sample_seq_logprobs(self) -> Tensor:
        """(B,) sum of ``sample_token_logprobs`` over counted tokens."""
        return torch.where(self.completion_mask, self.sample_token_logprobs, 0.0).sum(-1)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) // self.samples_per_prompt

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index) -> "Rollout":
        """The sequences ``index`` (a slice, a sequence of ints or a long tensor), in that order, as a rollout of
        ungrouped sequences (``samples_per_prompt`` = 1): for micro-batching and scoring, not for grouped baselines."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        elif isinstance(index, Tensor):
            rows = index.tolist()
        else:
            rows = [int(i) for i in index]
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        return Rollout(
            prompts=[self.prompts[i] for i in rows],
            completions=[self.completions[i] for i in rows],
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            truncated=self.truncated[idx],
            sample_token_logprobs=self.sample_token_logprobs[idx],
            samples_per_prompt=1,
            sampled_from_policy=self.sampled_from_policy,
            sampler=self.sampler,
        )


class Policy(Protocol):
    """A policy tilt can train or use as a reference."""

    def sample(self, prompts: Sequence[Any], samples_per_prompt: int, *, generator: torch.Generator | None = None,
               prompt_seeds: Sequence[int] | None = None, exact: bool = False) -> Rollout:
        """Draw ``samples_per_prompt`` completions of each prompt, grouped by prompt. No gradient. Randomness comes
        from ``generator``, or, when ``prompt_seeds`` (one int per prompt) is given, from one generator per prompt,
        so that a prompt's completions do not depend on the rest of the batch. ``exact``: decode with the model
        itself even where a faster proposal (a fast sampler) is configured; the callers that need the model's own
        law and do not weight by pi/q (evaluation, best-of-N, calibration) pass True. A policy with one law only
        ignores it."""
        ...

    def token_logprobs(self, rollout: Rollout) -> Tensor:
        """(B, T) log pi(y_t | x, y_<t) of the rollout's completion tokens, 0 where the mask is False.
        Differentiable with respect to the policy's parameters unless called under ``torch.no_grad``."""
        ...

    def token_log_softmax(self, rollout: Rollout) -> Tensor:
        """(B, T, V) log pi(. | x, y_<t), the whole next-token distribution at each completion position. Needed
        only by the full-vocabulary KL penalty (KL-RL ``kl_penalty=full``); differentiable like ``token_logprobs``."""
        ...

    def parameters(self): ...
