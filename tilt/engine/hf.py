"""A Hugging Face causal LM as a tilt ``Policy``: batched sampling with a KV cache, and completion log-probs.

Masking convention, the same everywhere: prompts are left-padded (``prompt_mask`` True on real tokens);
completions are right-padded, and a completion token counts (``completion_mask`` True) up to and including
the first EOS, never after it. ``truncated`` flags samples that hit ``max_new_tokens`` without an EOS.

Sampling is from the model's own distribution by default (temperature 1, no top-k, no top-p). If a user
changes these, ``Rollout.sample_token_logprobs`` describes the distribution actually sampled from (the
tempered/truncated one), ``Rollout.sampled_from_policy`` is False, and recipes then score the policy's own
log-probs with a separate forward pass; on-policy estimators become off-policy and are biased.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tilt.math.masking import completion_mask_from_eos
from tilt.math.sampling import inverse_cdf_sample, sampling_uniforms
from tilt.rollout import Rollout


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = field(default=32, metadata={"help": "completion length limit (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "1.0 samples the policy itself; other values sample a tempered policy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = off (exact sampling)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off (exact sampling)"})

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}: need max_new_tokens >= 1, temperature > 0, top_k >= 0, 0 < top_p <= 1")

    @property
    def exact(self) -> bool:
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


def warp_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """(B, V) logits of the distribution actually sampled from: temperature, then top-k, then top-p."""
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config names none: set tokenizer.eos_token")
    return sorted(ids)


class HFPolicy:
    """Any ``AutoModelForCausalLM`` with its tokenizer, seen through the ``Policy`` protocol.

    The model is put in eval mode (no dropout), so that the log-prob of a sample at sampling time and when
    scored later agree; gradients still flow through ``token_logprobs``.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sampling: SamplingConfig = SamplingConfig()):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

    def parameters(self):
        return self.model.parameters()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- prompts ---------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded ``(prompt_ids (P, Tp), prompt_mask (P, Tp) bool)``."""
        rows = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"prompt {i} encodes to no tokens: {prompts[i]!r}")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = True
        return ids.to(self.device), mask.to(self.device)

    # --- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], samples_per_prompt: int, *, generator: torch.Generator | None = None,
               prompt_seeds: Sequence[int] | None = None) -> Rollout:
        """``samples_per_prompt`` completions of each prompt, with a KV cache; one forward pass per new token.

        Randomness: one uniform per (sample, position), drawn up front from ``generator``, or per prompt from
        ``prompt_seeds`` (then a prompt's completions do not depend on the rest of the batch), and turned into
        tokens by inverse-CDF sampling."""
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, 0)  # (B, Tp)
        prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, 0)
        b = prompt_ids.shape[0]
        uniforms = sampling_uniforms(len(prompts), samples_per_prompt, self.sampling.max_new_tokens, generator=generator,
                                     prompt_seeds=prompt_seeds).to(self.device)  # (B, max_new_tokens)
        eos = torch.tensor(self.eos_ids, device=self.device)
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, Tp)
        attention = prompt_mask.long()
        cache = DynamicCache()
        out = self.model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions,
                         cache=cache, use_cache=True, logits_to_keep=1)
        next_position = positions[:, -1:] + 1  # (B, 1)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        tokens, logps = [], []
        for t in range(self.sampling.max_new_tokens):
            logp = torch.log_softmax(warp_logits(out.logits[:, -1, :].float(), self.sampling), dim=-1)  # (B, V)
            y = inverse_cdf_sample(logp.exp(), uniforms[:, t])  # (B,)
            lp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            y = y.masked_fill(done, self.pad_id)
            tokens.append(y)
            logps.append(lp.masked_fill(done, 0.0))
            done = done | torch.isin(y, eos)
            if bool(done.all()) or len(tokens) == self.sampling.max_new_tokens:
                break
            attention = torch.cat([attention, attention.new_ones(b, 1)], dim=-1)
            out = self.model(input_ids=y.unsqueeze(-1), attention_mask=attention, position_ids=next_position,
                             cache=cache, use_cache=True)
            next_position = next_position + 1
        completion_ids = torch.stack(tokens, dim=1)  # (B, T)
        completion_mask, truncated = completion_mask_from_eos(completion_ids, eos)
        sample_token_logprobs = torch.stack(logps, dim=1).masked_fill(~completion_mask, 0.0)
        return Rollout(
            prompts=[p for p in prompts for _ in range(samples_per_prompt)],
            completions=self.decode(completion_ids, completion_mask),
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            truncated=truncated,
            sample_token_logprobs=sample_token_logprobs,
            samples_per_prompt=samples_per_prompt,
            sampled_from_policy=self.sampling.exact,
        )

    def decode(self, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
        """Completion texts: counted tokens only, EOS and special tokens dropped."""
        rows = [ids[m].tolist() for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # --- scoring ---------------------------------------------------------------------------------------------
    def token_logprobs(self, rollout: Rollout) -> Tensor:
        """(B, T) log pi(y_t | x, y_<t) under the model itself (temperature 1), 0 off the completion mask.

        One forward pass over prompt + completion; only the T + 1 last positions go through the LM head, and
        the log-softmax is fused into the gather (cross-entropy), so a (B, T, V) tensor is built once.
        """
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=-1)
        attention = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_mask)], dim=-1).long()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        t = rollout.completion_ids.shape[1]
        logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=t + 1).logits[:, :-1, :]
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rollout.completion_ids.reshape(-1), reduction="none")
        return (-nll).view(rollout.completion_ids.shape).masked_fill(~rollout.completion_mask, 0.0)

    def rollout_from_ids(self, prompts: Sequence[str], completion_ids: Sequence[Sequence[int]], samples_per_prompt: int = 1) -> Rollout:
        """A rollout of given completions (token ids) of given prompts, for scoring: demonstrations, preference
        pairs, or an enumerated support. ``prompts`` has one entry per completion. The completion mask follows
        the same EOS convention as sampling."""
        if len(prompts) != len(completion_ids):
            raise ValueError(f"{len(prompts)} prompts for {len(completion_ids)} completions")
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        width = max(1, max(len(c) for c in completion_ids))
        ids = torch.full((len(completion_ids), width), self.pad_id, dtype=torch.long)
        present = torch.zeros(ids.shape, dtype=torch.bool)
        for i, row in enumerate(completion_ids):
            ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
            present[i, : len(row)] = True
        eos = torch.tensor(self.eos_ids)
        completion_mask, truncated = completion_mask_from_eos(ids, eos)
        completion_mask &= present
        ids, completion_mask = ids.to(self.device), completion_mask.to(self.device)
        return Rollout(
            prompts=list(prompts),
            completions=self.decode(ids, completion_mask),
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=ids,
            completion_mask=completion_mask,
            truncated=truncated.to(self.device),
            sample_token_logprobs=torch.zeros(ids.shape, device=self.device),
            samples_per_prompt=samples_per_prompt,
            sampled_from_policy=False,
        )
