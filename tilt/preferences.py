"""Preference oracles: who labels a pair of completions.

An oracle is any callable

    oracle(prompts, completions_a, completions_b, *, generator) -> Tensor (B,) float64

returning, for each pair, the *probability mass given to A*: 1.0 when A is preferred, 0.0 when B is, and 0.5
for a tie. Three come with tilt:

* ``RewardComparison(reward)``: deterministic, A wins when r(A) > r(B). Ties (r(A) == r(B), e.g. identical
  completions) follow ``ties``: ``"tie"`` returns 0.5 (default); ``"first"`` gives the pair to A (TRL's online
  trainers use ``score_policy >= score_ref``, so the first, on-policy sample wins ties, digest §4(b));
  ``"random"`` flips a fair coin with the generator.
* ``BradleyTerry(reward, scale)``: A wins with probability sigma(scale * (r(A) - r(B))) (digest §1.4); never a tie
  (equal rewards give a fair coin). ``scale`` -> infinity recovers the comparison with random ties. Its labels
  come from a latent reward, so DPO on them has a finite target, pi* ∝ pi_ref exp(scale * r / beta) (class docstring);
  ``labels_and_rewards`` returns that reward with the labels.
* ``Judge(fn)``: any user callable ``fn(prompt, a, b)`` returning ``"a"``/``0`` (A preferred), ``"b"``/``1``
  (B preferred) or ``"tie"``/``None``; anything else raises.

What a recipe does with a tie (0.5) is the recipe's choice and is documented there: the preference recipes
drop tied pairs from the DPO loss (a tie carries no ordering to learn).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from tilt.math.preference import win_probability
from tilt.rewards import RewardFn, score_rewards

TIE = 0.5

TIE_RULES = ("tie", "first", "random")


class PreferenceOracle(Protocol):
    def __call__(self, prompts: Sequence[Any], completions_a: Sequence[Any], completions_b: Sequence[Any], *, generator: torch.Generator) -> Tensor:
        """(B,) float64: 1.0 A preferred, 0.0 B preferred, 0.5 tie."""
        ...


class RewardComparison:
    """A is preferred when r(A) > r(B); ties follow ``ties`` (see the module docstring)."""

    def __init__(self, reward: RewardFn, *, ties: str = "tie"):
        if ties not in TIE_RULES:
            raise ValueError(f"ties must be one of {', '.join(TIE_RULES)}, got {ties!r}")
        self.reward, self.ties = reward, ties

    def __call__(self, prompts, completions_a, completions_b, *, generator: torch.Generator) -> Tensor:
        r_a = score_rewards(self.reward, prompts, completions_a)  # (B,)
        r_b = score_rewards(self.reward, prompts, completions_b)
        labels = win_probability(r_a, r_b)  # 1, 0 or 0.5 on ties
        tied = r_a == r_b
        if self.ties == "first":
            labels = torch.where(tied, 1.0, labels)
        elif self.ties == "random":
            coin = (torch.rand(len(labels), generator=generator, dtype=torch.float64) < 0.5).to(torch.float64)
            labels = torch.where(tied, coin, labels)
        return labels


class BradleyTerry:
    """A is preferred with probability sigma(scale * (r(A) - r(B))), drawn with the generator.

    Scale convention: the label model is P(A > B) = sigma(s (r(A) - r(B))), s = ``scale``, i.e. the Bradley-Terry
    reward of digest §1.4 is s * r. DPO's loss -log sigma(beta h) is minimised, over pairs from any full-support
    sampler, where beta log(pi/pi_ref) = s * r + c(x) (digest §1.4: pi is the Gibbs solution of its implicit reward),
    so the optimum of DPO, online DPO and XPO on these labels is the tilted target pi* ∝ pi_ref exp(s * r / beta).
    """

    def __init__(self, reward: RewardFn, *, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"the Bradley-Terry scale must be > 0, got {scale}")
        self.reward, self.scale = reward, scale

    def __call__(self, prompts, completions_a, completions_b, *, generator: torch.Generator) -> Tensor:
        return self.labels_and_rewards(prompts, completions_a, completions_b, generator=generator)[0]

    def labels_and_rewards(self, prompts, completions_a, completions_b, *, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(labels, r(A), r(B)), each (B,) float64: the labels of ``__call__`` (the same draws from ``generator``) and
        the latent rewards they were drawn from (unscaled r, not s * r), so that a caller need not score twice."""
        r_a = score_rewards(self.reward, prompts, completions_a)
        r_b = score_rewards(self.reward, prompts, completions_b)
        p_a = win_probability(r_a, r_b, scale=self.scale)  # (B,)
        labels = (torch.rand(len(p_a), generator=generator, dtype=torch.float64) < p_a).to(torch.float64)
        return labels, r_a, r_b


_A, _B = ("a", 0), ("b", 1)


class Judge:
    """Wraps a pairwise judge ``fn(prompt, a, b)``: returns "a"/0, "b"/1, or "tie"/None (see the module docstring)."""

    def __init__(self, fn: Callable[[Any, Any, Any], Any]):
        self.fn = fn

    def __call__(self, prompts, completions_a, completions_b, *, generator: torch.Generator) -> Tensor:
        labels = []
        for prompt, a, b in zip(prompts, completions_a, completions_b):
            verdict = self.fn(prompt, a, b)
            if isinstance(verdict, str):
                verdict = verdict.lower()
            if verdict is None or verdict == "tie":
                labels.append(TIE)
            elif not isinstance(verdict, bool) and verdict in _A:
                labels.append(1.0)
            elif not isinstance(verdict, bool) and verdict in _B:
                labels.append(0.0)
            else:
                raise ValueError(
                    f"the judge returned {verdict!r} for prompt {str(prompt)[:80]!r}; it must return 'a' or 0 (first "
                    "preferred), 'b' or 1 (second preferred), or 'tie' or None"
                )
        return torch.tensor(labels, dtype=torch.float64)
