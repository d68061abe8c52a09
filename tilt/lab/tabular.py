"""A tabular autoregressive policy: one vector of logits per (context, prefix), over a small vocabulary
and a fixed length. It follows the same ``Policy`` protocol as a Hugging Face model, so the recipes run on
it unchanged; what the lab adds is enumeration of the whole support, and so exact answers.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from tilt.math.sampling import inverse_cdf_sample, sampling_uniforms
from tilt.rollout import Rollout


class TabularPolicy(nn.Module):
    """pi(y | x) = prod_t softmax(logits[x, prefix(y_<t)])[y_t], y in {0..V-1}^L, x in {0..C-1}.

    Prefixes are numbered level by level: the empty prefix is 0, prefixes of length t start at
    (V^t - 1)/(V - 1). There are (V^L - 1)/(V - 1) prefixes in all (13 for V = L = 3).
    Prompts are context ids (ints); completions are tuples of token ids.
    """

    def __init__(self, vocab: int, length: int, contexts: int = 1, logits: Tensor | None = None):
        super().__init__()
        if vocab < 2 or length < 1 or contexts < 1:
            raise ValueError(f"need vocab >= 2, length >= 1, contexts >= 1; got {vocab}, {length}, {contexts}")
        self.vocab, self.length, self.contexts = vocab, length, contexts
        self.num_prefixes = sum(vocab**t for t in range(length))
        shape = (contexts, self.num_prefixes, vocab)
        if logits is None:
            logits = torch.zeros(shape, dtype=torch.float64)
        if tuple(logits.shape) != shape:
            raise ValueError(f"logits must have shape {shape}, got {tuple(logits.shape)}")
        self.logits = nn.Parameter(logits.clone().to(torch.float64))
        offsets = [sum(vocab**s for s in range(t)) for t in range(length)]
        self.register_buffer("level_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)

    # --- indexing -------------------------------------------------------------------------------------------
    def prefix_index(self, completion_ids: Tensor) -> Tensor:
        """(B, L) index of the prefix y_<t that each token y_t is drawn from."""
        b = completion_ids.shape[0]
        codes = torch.zeros(b, self.length, dtype=torch.long)
        for t in range(1, self.length):
            codes[:, t] = codes[:, t - 1] * self.vocab + completion_ids[:, t - 1]
        return codes + self.level_offsets

    def sequence_code(self, completion_ids: Tensor) -> Tensor:
        """(B,) the base-V number of each full sequence, its column in ``enumerate`` order."""
        code = torch.zeros(completion_ids.shape[0], dtype=torch.long)
        for t in range(self.length):
            code = code * self.vocab + completion_ids[:, t]
        return code

    def all_sequences(self) -> Tensor:
        """(V^L, L) every sequence, in code order."""
        codes = torch.arange(self.vocab**self.length)
        digits = [(codes // self.vocab ** (self.length - 1 - t)) % self.vocab for t in range(self.length)]
        return torch.stack(digits, dim=-1)

    # --- the Policy protocol --------------------------------------------------------------------------------
    def token_logprobs(self, rollout: Rollout) -> Tensor:
        logp = self.token_log_softmax(rollout)  # (B, L, V)
        return logp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, L)

    def token_log_softmax(self, rollout: Rollout) -> Tensor:
        """(B, L, V) log pi(. | context, y_<t) at every position of the rollout's completions."""
        contexts = rollout.prompt_ids[:, 0]  # (B,)
        step_logits = self.logits[contexts.unsqueeze(-1), self.prefix_index(rollout.completion_ids)]  # (B, L, V)
        return torch.log_softmax(step_logits, dim=-1)

    @torch.no_grad()
    def sample(self, prompts: Sequence[int], samples_per_prompt: int, *, generator: torch.Generator | None = None,
               prompt_seeds: Sequence[int] | None = None, exact: bool = False) -> Rollout:
        """Inverse-CDF sampling from uniforms drawn from ``generator``, or per prompt from ``prompt_seeds``. Always the
        table's own law (``exact`` changes nothing)."""
        uniforms = sampling_uniforms(len(prompts), samples_per_prompt, self.length, generator=generator, prompt_seeds=prompt_seeds)
        contexts = torch.tensor(list(prompts), dtype=torch.long).repeat_interleave(samples_per_prompt)  # (B,)
        b = contexts.shape[0]
        tokens = torch.zeros(b, self.length, dtype=torch.long)
        token_logprobs = torch.zeros(b, self.length, dtype=torch.float64)
        code = torch.zeros(b, dtype=torch.long)
        for t in range(self.length):
            logp = torch.log_softmax(self.logits[contexts, self.level_offsets[t] + code], dim=-1)  # (B, V)
            y_t = inverse_cdf_sample(logp.exp(), uniforms[:, t])
            tokens[:, t] = y_t
            token_logprobs[:, t] = logp.gather(-1, y_t.unsqueeze(-1)).squeeze(-1)
            code = code * self.vocab + y_t
        return self._rollout(contexts, tokens, token_logprobs, samples_per_prompt)

    def _rollout(self, contexts: Tensor, tokens: Tensor, token_logprobs: Tensor, k: int) -> Rollout:
        b = contexts.shape[0]
        return Rollout(
            prompts=contexts.tolist(),
            completions=[tuple(row) for row in tokens.tolist()],
            prompt_ids=contexts.unsqueeze(-1),
            prompt_mask=torch.ones(b, 1, dtype=torch.bool),
            completion_ids=tokens,
            completion_mask=torch.ones(b, self.length, dtype=torch.bool),
            truncated=torch.zeros(b, dtype=torch.bool),
            sample_token_logprobs=token_logprobs,
            samples_per_prompt=k,
        )

    # --- enumeration ----------------------------------------------------------------------------------------
    def enumerate(self) -> Rollout:
        """Every (context, sequence) pair as one rollout of C * V^L samples, context-major, code order."""
        seqs = self.all_sequences()
        n = seqs.shape[0]
        contexts = torch.arange(self.contexts).repeat_interleave(n)
        tokens = seqs.repeat(self.contexts, 1)
        rollout = self._rollout(contexts, tokens, torch.zeros(tokens.shape, dtype=torch.float64), n)
        return rollout

    def support_logprobs(self) -> Tensor:
        """(C, V^L) log pi(y | x) of every sequence. Differentiable."""
        rollout = self.enumerate()
        return self.token_logprobs(rollout).sum(-1).view(self.contexts, -1)

    @classmethod
    def from_sequence_logprobs(cls, vocab: int, length: int, seq_logprobs: Tensor) -> "TabularPolicy":
        """The tabular policy whose sequence distribution is ``seq_logprobs`` (C, V^L) (code order), e.g. an exact
        target: each prefix's logits are the log-masses of its one-token extensions. Zero-mass prefixes get
        uniform logits (they are never reached); zero-mass tokens get a logit of -1e4."""
        contexts = seq_logprobs.shape[0]
        masses = seq_logprobs.to(torch.float64)
        rows = []
        for t in range(length):
            # log-mass of every prefix of length t + 1, grouped by its first t tokens: (C, V^t, V)
            ext = masses.view(contexts, vocab ** (t + 1), -1).logsumexp(-1).view(contexts, vocab**t, vocab)
            rows.append(ext)
        logits = torch.cat(rows, dim=1).clamp(min=-1e4)
        return cls(vocab, length, contexts, logits)

    def copy(self) -> "TabularPolicy":
        return TabularPolicy(self.vocab, self.length, self.contexts, self.logits.detach())


def random_tabular_policy(vocab: int, length: int, contexts: int = 1, *, seed: int, scale: float = 1.0) -> TabularPolicy:
    """Logits drawn N(0, scale^2) per (context, prefix, token), as in digest §2(e) E1.2."""
    g = torch.Generator().manual_seed(seed)
    num_prefixes = sum(vocab**t for t in range(length))
    logits = scale * torch.randn(contexts, num_prefixes, vocab, generator=g, dtype=torch.float64)
    return TabularPolicy(vocab, length, contexts, logits)
