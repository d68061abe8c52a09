"""Rewards and exact reports for the tabular lab."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tilt.lab.tabular import TabularPolicy
from tilt.math import exact
from tilt.math.target import kl_regularised_value
from tilt.target import TiltedTarget


class TableReward:
    """A reward given as a table over the support: ``table[x, code(y)]``. Called like any reward:
    ``reward(prompts, completions)`` with context ids and token tuples; returns a float64 tensor (B,)."""

    def __init__(self, table: Tensor, vocab: int, length: int):
        self.table = table.to(torch.float64)
        self.vocab, self.length = vocab, length
        self._place = torch.tensor([vocab ** (length - 1 - t) for t in range(length)], dtype=torch.long)

    def __call__(self, prompts: Sequence[int], completions: Sequence[Sequence[int]], **_columns) -> Tensor:
        ids = torch.as_tensor(list(completions), dtype=torch.long).view(-1, self.length)
        codes = (ids * self._place).sum(-1)
        return self.table[torch.as_tensor(list(prompts), dtype=torch.long), codes]


def reward_table(spec: str, vocab: int, length: int, contexts: int = 1, *, reward_seed: int = 0) -> Tensor:
    """(C, V^L) reward of every sequence, from a spec:

    * ``count:K``: fraction of positions holding token K (digest §2(e) E1.2 uses ``count:2``);
    * ``contains:K``: 1 if token K appears, else 0 (a pointwise filter, digest E1.7);
    * ``random``: uniform on [0, 1) per (context, sequence), drawn with ``reward_seed``.
    """
    n = vocab**length
    seqs = TabularPolicy(vocab, length).all_sequences()  # (N, L)
    kind, _, arg = spec.partition(":")
    if kind in ("count", "contains"):
        try:
            token = int(arg)
        except ValueError:
            raise ValueError(f"reward {spec!r}: write {kind}:K with K a token id in 0..{vocab - 1}") from None
        if not 0 <= token < vocab:
            raise ValueError(f"reward {spec!r}: token {token} is outside the vocabulary 0..{vocab - 1}")
        hits = (seqs == token).to(torch.float64)
        row = hits.mean(-1) if kind == "count" else hits.amax(-1)
        return row.unsqueeze(0).repeat(contexts, 1)
    if kind == "random" and not arg:
        g = torch.Generator().manual_seed(reward_seed)
        return torch.rand(contexts, n, generator=g, dtype=torch.float64)
    raise ValueError(f"unknown lab reward {spec!r}: use count:K, contains:K or random")


@torch.no_grad()
def exact_report(policy: TabularPolicy, ref: TabularPolicy, rewards: Tensor, beta: float) -> dict[str, float | None]:
    """Exact quantities of ``policy`` against the reference and the tilted target (None where beta = 0).

    Keys: kl_target_policy = KL(pi*||pi), kl_policy_target = KL(pi||pi*), kl_ref = KL(pi||pi_ref), entropy = H(pi),
    target_entropy = H(pi*), expected_reward = E_pi[r], target_expected_reward = E_pi*[r], log_z (mean over contexts),
    value = J_KL(pi), max_prob (largest sequence probability), ref_entropy.
    """
    logp = policy.support_logprobs()  # (C, N)
    ref_logp = ref.support_logprobs()
    report: dict[str, float | None] = {
        "kl_ref": exact.kl(logp, ref_logp).item(),
        "entropy": exact.entropy(logp).item(),
        "ref_entropy": exact.entropy(ref_logp).item(),
        "expected_reward": exact.expectation(logp, rewards).item(),
        "max_prob": logp.exp().amax().item(),
        "value": kl_regularised_value(logp, ref_logp, rewards, beta=beta).item(),
    }
    if beta > 0:
        reward = TableReward(rewards, policy.vocab, policy.length)
        target = TiltedTarget(ref=ref, reward=reward, beta=beta).exact(ref.enumerate())
        report.update(
            kl_target_policy=exact.kl(target.log_probs, logp).item(),
            kl_policy_target=exact.kl(logp, target.log_probs).item(),
            target_entropy=exact.entropy(target.log_probs).item(),
            target_expected_reward=exact.expectation(target.log_probs, rewards).item(),
            log_z=target.log_z.mean().item(),
        )
    else:
        report.update(kl_target_policy=None, kl_policy_target=None, target_entropy=None, target_expected_reward=None, log_z=None)
    return report
