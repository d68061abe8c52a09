"""An enumerable world of variable-length completions: a tabular policy whose token ``eos`` ends a completion.

Completions are token tuples of length 1..L: everything up to and including the first EOS, or L tokens without one
(truncated), as a language model's completions are. Their lengths differ, which is what suffix-resampling MH must
account for (``tilt.math.mcmc``). The world samples continuations of given prefixes, so the samplers of
``tilt.samplers`` run on it as on a Hugging Face model, and it enumerates its support, so their laws are exact.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.math.sampling import inverse_cdf_sample


class StoppingPolicy:
    """``TabularPolicy`` (V tokens, length L, C contexts) read with an EOS convention. Prompts are context ids;
    completions are token tuples that end at the first ``eos`` (inclusive) or after L tokens."""

    def __init__(self, table: TabularPolicy, eos: int):
        if not 0 <= eos < table.vocab:
            raise ValueError(f"eos {eos} is outside the vocabulary 0..{table.vocab - 1}")
        self.table, self.eos = table, eos
        self.eos_ids = [eos]
        self.max_length = table.length

    # --- what the samplers need ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_continuations(self, prompts: Sequence[int], prefixes: Sequence[Sequence[int]], max_new_tokens: Sequence[int], *,
                             generator: torch.Generator | None = None) -> list[tuple[int, ...]]:
        """Each prefix extended by tokens drawn from the policy until an EOS (kept) or ``max_new_tokens[b]`` new tokens."""
        b, length, vocab = len(prompts), self.table.length, self.table.vocab
        uniforms = torch.rand(b, length, generator=generator, dtype=torch.float64)
        rows = [list(p) for p in prefixes]
        limits = [len(p) + int(m) for p, m in zip(prefixes, max_new_tokens)]
        contexts = torch.tensor(list(prompts), dtype=torch.long)
        codes = torch.zeros(b, dtype=torch.long)
        ended = [False] * b
        for t in range(length):
            active = [i for i in range(b) if t >= len(prefixes[i]) and t < limits[i] and not ended[i]]
            if active:
                idx = torch.tensor(active)
                logits = self.table.logits[contexts[idx], self.table.level_offsets[t] + codes[idx]]
                tokens = inverse_cdf_sample(torch.softmax(logits, -1), uniforms[idx, t]).tolist()
                for i, tok in zip(active, tokens):
                    rows[i].append(tok)
                    ended[i] = tok == self.eos
            codes = torch.tensor([codes[i].item() * vocab + (rows[i][t] if t < len(rows[i]) else 0) for i in range(b)])
        return [tuple(r) for r in rows]

    def decode_tokens(self, rows: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        """Completions as the reward sees them: the token tuples themselves."""
        return [tuple(r) for r in rows]

    # --- enumeration -----------------------------------------------------------------------------------------
    def support(self) -> list[tuple[int, ...]]:
        """Every completion: all EOS-free tuples of length < L followed by EOS, and every EOS-free tuple of length L;
        shorter first, then in lexicographic order."""
        words = [()]
        out = []
        for t in range(self.table.length):
            out += [w + (self.eos,) for w in words]
            if t + 1 == self.table.length:
                out += [w + (v,) for w in words for v in range(self.table.vocab) if v != self.eos]
            words = [w + (v,) for w in words for v in range(self.table.vocab) if v != self.eos]
        return sorted(out, key=lambda w: (len(w), w))

    def support_tensors(self) -> tuple[Tensor, Tensor]:
        """``(tokens (N, L) long, right-padded with 0; lengths (N,) long)`` of ``support()``."""
        rows = self.support()
        tokens = torch.zeros(len(rows), self.table.length, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        return tokens, torch.tensor([len(r) for r in rows])

    @torch.no_grad()
    def prefix_logprobs(self, context: int = 0) -> Tensor:
        """(N, L + 1) log pi(y_<j | x) for j = 0..L of each support completion (padding positions count 0)."""
        tokens, lengths = self.support_tensors()
        step_logits = self.table.logits[context, self.table.prefix_index(tokens)]  # (N, L, V)
        token_logp = torch.log_softmax(step_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, L)
        token_logp = torch.where(torch.arange(tokens.shape[1]) < lengths.unsqueeze(-1), token_logp, 0.0)
        return torch.cat([torch.zeros(tokens.shape[0], 1, dtype=token_logp.dtype), token_logp.cumsum(-1)], -1)

    def support_logprobs(self, context: int = 0) -> Tensor:
        """(N,) log pi(y | x) of each support completion."""
        _, lengths = self.support_tensors()
        return self.prefix_logprobs(context).gather(-1, lengths.unsqueeze(-1)).squeeze(-1)


class SupportReward:
    """A reward given as one value per support completion (``values`` (N,) in ``support()`` order), called like any
    reward: ``reward(prompts, completions) -> (B,) float64``; also scores prefixes (``prefix_value``)."""

    def __init__(self, world: StoppingPolicy, values: Tensor):
        self.index = {w: i for i, w in enumerate(world.support())}
        if values.shape != (len(self.index),):
            raise ValueError(f"need one reward per completion of the support ({len(self.index)}), got shape {tuple(values.shape)}")
        self.values = values.to(torch.float64)

    def __call__(self, prompts: Sequence[int], completions: Sequence[Sequence[int]], **_columns) -> Tensor:
        try:
            return self.values[[self.index[tuple(c)] for c in completions]]
        except KeyError as e:
            raise ValueError(f"completion {e.args[0]} is not in the world's support") from None


def stopping_world(vocab: int = 3, length: int = 4, *, seed: int = 0, eos: int = 0, scale: float = 1.0) -> StoppingPolicy:
    """A random stopping policy: ``random_tabular_policy`` logits N(0, scale^2), token ``eos`` ends a completion."""
    return StoppingPolicy(random_tabular_policy(vocab, length, seed=seed, scale=scale), eos)
