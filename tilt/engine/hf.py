"""A Hugging Face causal LM as a tilt ``Policy``: batched sampling with a KV cache, and completion log-probs.

Masking convention, the same everywhere: prompts are left-padded (``prompt_mask`` True on real tokens);
completions are right-padded, and a completion token counts (``completion_mask`` True) up to and including
the first EOS, never after it. ``truncated`` flags samples that hit ``max_new_tokens`` without an EOS.

Sampling is from the model's own distribution by default (temperature 1, no top-k, no top-p). If a user
changes these, ``Rollout.sample_token_logprobs`` describes the distribution actually sampled from (the
tempered/truncated one), ``Rollout.sampled_from_policy`` is False, and recipes then score the policy's own
log-probs with a separate forward pass; on-policy estimators become off-policy and are biased.

With a fast sampler (``SamplingConfig.sampler``: a reduced-precision copy q of the model decodes, see
``tilt.engine.fast_sampler``), ``sample_token_logprobs`` are log q, ``Rollout.sampler`` names the copy, and the
recipes weight each sequence by pi/q (``tilt.math.mismatch``), which keeps their estimators unbiased.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tilt.engine.fast_sampler import SAMPLERS, FastSampler, resolve_sampler
from tilt.math.masking import completion_mask_from_eos
from tilt.math.categorical import sample_from_logits
from tilt.math.sampling import sampling_uniforms
from tilt.rollout import Rollout


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = field(default=32, metadata={"help": "completion length limit (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "1.0 samples the policy itself; other values sample a tempered policy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = off (exact sampling)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off (exact sampling)"})
    sampler: str = field(default="auto", metadata={"help": (
        "which copy of the model draws the training rollouts: 'auto' (the default: exact where the run decodes under "
        "bfloat16/float16 autocast or the model is small, else fp16 on a CPU with fbgemm, bf16 on a GPU with bfloat16; "
        "tilt.engine.fast_sampler), 'exact' (the "
        "model itself), 'int8' (linear layers int8, CPU), 'int8-smooth' (int8 per token after SmoothQuant smoothing, CPU: "
        "4/5 of int8's speed, a far closer proposal), 'fp16' (linear weights packed as float16, CPU) or 'bf16' (a bfloat16 "
        "copy). Only the recipes that weight their samples by pi/q (KL-RL, PPO, DPG, online DPO/XPO) sample from the copy; "
        "evaluation, best-of-N, calibration, BOND, BoNBoN, APO, QRPO and tilt sample always decode with the model itself")})
    sampler_refresh_steps: int = field(default=0, metadata={"help": (
        "refresh the fast sampler's copy after every N-th optimizer step; 0 = when refreshing costs at most 20% of the "
        "time spent sampling (a stale copy is still corrected exactly by pi/q; tilt.engine.fast_sampler)")})

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}: need max_new_tokens >= 1, temperature > 0, top_k >= 0, 0 < top_p <= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampling.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler_refresh_steps < 0:
            raise ValueError(f"sampling.sampler_refresh_steps must be >= 0 (0 = by cost), got {self.sampler_refresh_steps}")

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

    ``compute_dtype`` (bfloat16 or float16, or None): the model's forward passes run under ``torch.autocast`` in that
    dtype while its weights stay in theirs (float32 master weights, as mixed-precision training keeps them: an AdamW
    update of 1e-5 is below bfloat16's resolution for most weights, so bfloat16 weights barely train). The incremental
    decode and the full scoring pass then round differently, so a rollout is a proposal's (``sampler='autocast'``,
    ``sampled_from_policy=False``): its log-probs are log q of the decode, and recipes weight by pi/q as for a fast
    sampler (docs/runs.md, "Precision").
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sampling: SamplingConfig = SamplingConfig(),
                 compute_dtype: torch.dtype | None = None):
        self.model = model.eval()
        weights = next(model.parameters()).dtype
        self.compute_dtype = compute_dtype if compute_dtype not in (None, weights) else None
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.sampler_kind, self.sampler_reason = resolve_sampler(sampling.sampler, model, self.compute_dtype)  # 'exact', 'int8', 'int8-smooth', 'fp16' or 'bf16'
        self.fast_sampler = FastSampler(model, self.sampler_kind, sampling.sampler_refresh_steps) if self.sampler_kind != "exact" else None

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
        return self._left_pad(rows)

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Token-id rows as left-padded ``(ids (B, W), mask (B, W) bool)`` on the model's device."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = True
        return ids.to(self.device), mask.to(self.device)

    # --- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], samples_per_prompt: int, *, generator: torch.Generator | None = None,
               prompt_seeds: Sequence[int] | None = None, exact: bool = False) -> Rollout:
        """``samples_per_prompt`` completions of each prompt, with a KV cache; one forward pass per new token.

        Randomness: one uniform per (sample, position), drawn up front from ``generator``, or per prompt from
        ``prompt_seeds`` (then a prompt's completions do not depend on the rest of the batch), and turned into
        tokens by inverse-CDF sampling.

        Speed (docs/performance.md): each distinct prompt goes through the model once and its KV cache and
        first next-token distribution are repeated for its K samples; a token is drawn by a two-level
        inverse-CDF search (``tilt.math.categorical``) rather than a full-vocabulary cumulative sum; and once
        a quarter of the running batch has ended, the ended sequences are dropped from it, so they cost no
        further forward passes. Rows that ended but are still in the batch keep drawing tokens, which the
        EOS mask discards at the end.

        ``exact``: decode with the model itself (under autocast where ``compute_dtype`` is set), not with the fast
        sampler's copy, for the consumers that need the model's own law (``tilt.rollout.Policy.sample``).
        """
        k = samples_per_prompt
        # the model that decodes: the policy itself, or its reduced-precision copy q (refreshed if the weights changed)
        started = time.perf_counter()
        distinct_ids, distinct_mask = self.encode_prompts(prompts)  # (P, Tp)
        copy = self.fast_sampler if not exact else None  # the reduced-precision copy decodes, or the model itself
        refreshes = copy.refreshes if copy is not None else 0
        decoder = self.model if copy is None else copy.model_for_sampling(self.model, (distinct_ids, distinct_mask))
        refreshed = copy is not None and copy.refreshes > refreshes
        prompt_ids = distinct_ids.repeat_interleave(k, 0)  # (B, Tp)
        prompt_mask = distinct_mask.repeat_interleave(k, 0)
        uniforms = sampling_uniforms(len(prompts), k, self.sampling.max_new_tokens, generator=generator, prompt_seeds=prompt_seeds).to(self.device)  # (B, T)
        autocast_decode = decoder is self.model and self.compute_dtype is not None  # the same weights, decoded in compute_dtype
        with self.autocast() if autocast_decode else contextlib.nullcontext():
            raw_ids, raw_logps = self._generate(distinct_ids, distinct_mask, k, uniforms, decoder=decoder)
        eos = torch.tensor(self.eos_ids, device=self.device)
        completion_mask, truncated = completion_mask_from_eos(raw_ids, eos)  # (B, T)
        completion_ids = raw_ids.masked_fill(~completion_mask, self.pad_id)
        sample_token_logprobs = raw_logps.masked_fill(~completion_mask, 0.0)
        if copy is not None:
            copy.record_sampling(time.perf_counter() - started - (copy.last_refresh_seconds if refreshed else 0.0))
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
            sampled_from_policy=self.sampling.exact and copy is None and not autocast_decode,
            sampler="autocast" if autocast_decode and self.sampling.exact else (self.sampler_kind if copy is not None else "exact"),
            sampler_refresh_seconds=copy.last_refresh_seconds if refreshed else 0.0,
        )

    def _generate(self, distinct_ids: Tensor, distinct_mask: Tensor, k: int, uniforms: Tensor, *,
                  decoder=None) -> tuple[Tensor, Tensor]:
        """The decoding loop of ``sample``: ``k`` continuations of each left-padded row of ``distinct_ids`` (P, Tp), one
        token per column of ``uniforms`` (P * k, T) at most, drawn from ``decoder``: the model itself (the default, and
        always for ``sample_continuations``, whose callers need the exact model) or the fast sampler's copy q. Returns raw
        token ids and their sampling log-probs, both (P * k, steps), steps <= T, unmasked (positions after an EOS hold
        whatever was drawn)."""
        decoder = self.model if decoder is None else decoder
        b, tp, t_max = distinct_ids.shape[0] * k, distinct_ids.shape[1], uniforms.shape[1]
        prompt_mask = distinct_mask.repeat_interleave(k, 0)
        eos = torch.tensor(self.eos_ids, device=self.device)
        distinct_positions = (distinct_mask.long().cumsum(-1) - 1).clamp(min=0)  # (P, Tp)
        cache = DynamicCache()
        out = decoder(input_ids=distinct_ids, attention_mask=distinct_mask.long(), position_ids=distinct_positions,
                      cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float().repeat_interleave(k, 0)  # (B, V)
        if k > 1:
            cache.batch_repeat_interleave(k)
        attention = torch.ones(b, tp + t_max, dtype=torch.long, device=self.device)  # (B, Tp + T), 1 = attend
        attention[:, :tp] = prompt_mask.long()
        next_position = distinct_positions[:, -1:].repeat_interleave(k, 0) + 1  # (b, 1)
        rows = torch.arange(b, device=self.device)  # (b,) the rows of the full batch still in the running batch
        ended = torch.zeros(b, dtype=torch.bool, device=self.device)  # (b,) running rows that have drawn an EOS
        raw_ids = torch.full((b, t_max), self.pad_id, dtype=torch.long, device=self.device)  # (B, T), masked at the end
        raw_logps = torch.zeros(b, t_max, device=self.device)  # (B, T)
        steps = t_max
        for t in range(t_max):
            warped = logits if self.sampling.exact else warp_logits(logits, self.sampling)
            y, lp = sample_from_logits(warped, uniforms[rows, t])  # (b,)
            raw_ids[rows, t] = y
            raw_logps[rows, t] = lp
            ended = ended | torch.isin(y, eos)
            if t + 1 == t_max or bool(ended.all()):
                steps = t + 1
                break
            if 4 * int(ended.sum()) >= len(rows):  # compact: drop the ended rows from the running batch
                keep = (~ended).nonzero().squeeze(-1)  # (b_next,)
                cache.batch_select_indices(keep)
                rows, y, next_position, ended = rows[keep], y[keep], next_position[keep], ended[keep]
            out = decoder(input_ids=y.unsqueeze(-1), attention_mask=attention[rows, : tp + t + 1], position_ids=next_position,
                          cache=cache, use_cache=True)
            logits = out.logits[:, -1, :].float()  # (b, V)
            next_position = next_position + 1
        return raw_ids[:, :steps], raw_logps[:, :steps]

    # --- continuing prefixes (the samplers of tilt.samplers) ---------------------------------------------------
    @property
    def max_length(self) -> int:
        """Completion length limit in tokens (``sampling.max_new_tokens``)."""
        return self.sampling.max_new_tokens

    @torch.no_grad()
    def sample_continuations(self, prompts: Sequence[str], prefixes: Sequence[Sequence[int]], max_new_tokens: Sequence[int], *,
                             generator: torch.Generator | None = None) -> list[tuple[int, ...]]:
        """Completions that start with the given token ids: row b is ``prefixes[b]`` followed by tokens drawn from the
        model (with ``sampling``'s settings) given prompt b and that prefix, up to and including an EOS, or
        ``max_new_tokens[b]`` new tokens. Returns each whole completion's token ids (prefix included).

        The prefix is appended to the prompt's tokens as ids, not re-tokenised, so the continuation is drawn from
        exactly pi(. | x, y_<i) as ``token_logprobs`` scores it."""
        if not len(prompts) == len(prefixes) == len(max_new_tokens):
            raise ValueError(f"{len(prompts)} prompts, {len(prefixes)} prefixes and {len(max_new_tokens)} lengths: give one of each per row")
        if len(prompts) == 0:
            return []
        limits = [int(m) for m in max_new_tokens]
        if min(limits) < 1:
            raise ValueError("every continuation needs max_new_tokens >= 1: a prefix at the length limit has nothing left to sample")
        prompt_ids, prompt_mask = self.encode_prompts(prompts)  # (B, Tp) left-padded
        rows = [ids[m].tolist() + list(prefix) for ids, m, prefix in zip(prompt_ids.cpu(), prompt_mask.cpu(), prefixes)]
        ids, mask = self._left_pad(rows)  # (B, W) prompt and prefix, left-padded
        uniforms = torch.rand(len(rows), max(limits), generator=generator, dtype=torch.float64).to(self.device)  # (B, T)
        with self.autocast():
            raw_ids, _ = self._generate(ids, mask, 1, uniforms)  # (B, steps)
        out = []
        for prefix, new, limit in zip(prefixes, raw_ids.cpu().tolist(), limits):
            new = new[:limit]
            stop = next((t for t, tok in enumerate(new) if tok in self.eos_ids), None)
            out.append(tuple(prefix) + tuple(new if stop is None else new[: stop + 1]))
        return out

    def decode_tokens(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Completion texts of token-id rows, EOS and special tokens dropped (as ``decode``)."""
        return self.tokenizer.batch_decode([list(r) for r in rows], skip_special_tokens=True)

    def decode(self, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
        """Completion texts: counted tokens only, EOS and special tokens dropped."""
        rows = [ids[m].tolist() for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # --- scoring ---------------------------------------------------------------------------------------------
    def token_logprobs(self, rollout: Rollout) -> Tensor:
        """(B, T) log pi(y_t | x, y_<t) under the model itself (temperature 1), 0 off the completion mask.

        One forward pass over the prompt and all completion tokens but the last (no position needs the
        distribution after the last token), of which only the T last positions go through the LM head, so
        the (B, T, V) logits come out contiguous and are never copied; the log-softmax is fused into the
        gather (cross-entropy), so a (B, T, V) log-softmax is built once.
        """
        logits = self._completion_logits(rollout)  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), rollout.completion_ids.flatten(), reduction="none")  # (B * T,)
        return (-nll).view(rollout.completion_ids.shape).masked_fill(~rollout.completion_mask, 0.0)

    def token_log_softmax(self, rollout: Rollout) -> Tensor:
        """(B, T, V) float32 log pi(. | x, y_<t): the whole next-token distribution at every completion position
        (rows off the completion mask are computed but mean nothing). The same single forward pass as
        ``token_logprobs``; it costs B * T * V floats (151 MB for 32 x 24 tokens of a 49k vocabulary), twice with
        the gradient. Used by the full-vocabulary KL penalty (KL-RL ``kl_penalty=full``)."""
        return torch.log_softmax(self._completion_logits(rollout).float(), dim=-1)

    def _completion_logits(self, rollout: Rollout) -> Tensor:
        """(B, T, V) logits predicting each completion token: one forward pass over the prompt and all completion
        tokens but the last, of which only the T last positions go through the LM head."""
        t = rollout.completion_ids.shape[1]
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids[:, :-1]], dim=-1)  # (B, Tp + T - 1)
        attention = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_mask[:, :-1])], dim=-1).long()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        with self.autocast():
            return self.model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=t).logits

    def autocast(self):
        """The context the model's forward passes run in: autocast to ``compute_dtype``, or nothing."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

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
