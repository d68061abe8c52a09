"""Behaviour cloning (supervised fine-tuning) on demonstrations: the first stage of demonstration-regularised RL.

Objective (Tiapkin et al. 2023, §3 BC; digest §3(a)): maximise the likelihood of the expert's completions,

    minimise  sum_i sum_t -log q(y_t^i | x^i, y_<t^i)   over the completion tokens of the demonstrations,

with q = (1 - V f) pi + f, the policy mixed with the uniform distribution so that every token has probability
at least f (``floor``; f = 0 is plain maximum likelihood, q = pi). The paper needs the clone to give every
action a probability bounded below, so that the KL-regularised step toward it, and its trajectory KL to the
expert, stay finite; in the tabular case it uses add-one smoothing (``tilt.lab.mdp.behaviour_clone``). The
floor is the form of that requirement that works through the ``Policy`` protocol, which exposes only the
log-probabilities of the demonstrated tokens; label smoothing (``tilt.math.bc.label_smoothed_bc_loss``), the
per-token form of the paper's log-regulariser, needs the whole vocabulary's log-probabilities and is left to a
policy that exposes them. The floored clone is what the RL stage must use as its reference:
``FlooredPolicy(clone, floor=f, vocab=V)`` (with f = 0 it is the clone itself).

Estimator, per step: ``sequences_per_step`` demonstrations, read as epochs of a seeded permutation (a pure
function of the step, so a resumed run reads the same ones); loss = the sum over the step's completion tokens
of -log q, divided by the number of those tokens (the one reduction: mean negative log-likelihood per
completion token of the step, whatever the micro-batch split). Prompt tokens never count: the demonstration
rollout's ``completion_mask`` is True on completion tokens only. Packing or padding is the rollout builder's
choice; this recipe sees a padded ``Rollout``.

Then KL-regularised RL toward the clone is ``tilt.recipes.kl_rl.train(config, policy, ref=FlooredPolicy(clone,
...), ...)`` with beta = lambda (digest §3(b)); the policy may start from the clone or from any other model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tilt import distributed
from tilt.math.bc import bc_loss, floored_token_logprobs
from tilt.recipes.common import build_optimizer, grad_norm_and_clip, learning_rate, lr_factor, micro_batches, prompt_indices, set_lr
from tilt.rollout import Policy, Rollout


@dataclass(frozen=True)
class BCConfig:
    """Configuration of behaviour cloning. Batch semantics: each step reads ``sequences_per_step`` demonstrations
    (prompt + completion pairs); 0 reads all of them (full-batch maximum likelihood)."""

    steps: int = field(default=100, metadata={"help": "number of optimisation steps"})
    sequences_per_step: int = field(default=16, metadata={"help": "demonstrations per step; 0 = all of them every step"})
    lr: float = field(default=2e-5, metadata={"help": "learning rate; 2e-5 is TRL's SFTConfig default"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant' or 'linear' (decay to 0 at the last step)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from 0 to lr"})
    floor: float = field(
        default=0.0,
        metadata={"help": "probability floor f: the clone is q = (1 - V f) pi + f, every token >= f (Tiapkin et al. 2023 need "
                  "a positive minimum probability); 0 = plain maximum likelihood. Needs vocab_size."},
    )
    vocab_size: int = field(default=0, metadata={"help": "vocabulary size V, needed when floor > 0"})
    micro_batch_size: int = field(default=0, metadata={"help": "sequences per forward/backward pass; 0 = the whole step at once"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed of the order in which demonstrations are read"})

    def __post_init__(self):
        if self.steps < 0 or self.sequences_per_step < 0 or self.micro_batch_size < 0 or self.warmup_steps < 0:
            raise ValueError("steps, sequences_per_step, micro_batch_size and warmup_steps must be >= 0")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")
        if self.floor < 0:
            raise ValueError(f"floor must be >= 0, got {self.floor}")
        if self.floor > 0 and (self.vocab_size < 2 or not self.floor < 1.0 / self.vocab_size):
            raise ValueError(
                f"floor {self.floor} needs vocab_size V >= 2 with floor < 1/V (got V = {self.vocab_size}); "
                "set vocab_size to the tokenizer's vocabulary size"
            )


class FlooredPolicy:
    """q(y_t | .) = (1 - V f) pi(y_t | .) + f: a policy whose every token has probability >= f. Use it as the
    reference of the RL stage after cloning with the same floor.

    ``token_logprobs`` is exact. ``sample`` draws from pi, not q (mixing inside generation is not possible through
    the protocol), and marks the rollout ``sampled_from_policy=False``; the RL stage never samples its reference.
    """

    def __init__(self, policy: Policy, *, floor: float, vocab: int):
        floored_token_logprobs(torch.zeros(()), floor=floor, vocab=vocab)  # validates floor against vocab
        self.policy, self.floor, self.vocab = policy, floor, vocab

    def token_logprobs(self, rollout: Rollout) -> Tensor:
        logp = floored_token_logprobs(self.policy.token_logprobs(rollout), floor=self.floor, vocab=self.vocab)
        return torch.where(rollout.completion_mask, logp, 0.0)  # (B, T), 0 off-mask as the protocol says

    def sample(self, prompts: Sequence[Any], samples_per_prompt: int, *, generator: torch.Generator, exact: bool = False) -> Rollout:
        rollout = self.policy.sample(prompts, samples_per_prompt, generator=generator, exact=exact)
        # the floored law is another distribution than the clone's samples follow, unless the floor is 0
        return dataclasses.replace(rollout, sampled_from_policy=rollout.sampled_from_policy and self.floor == 0)

    def parameters(self):
        return self.policy.parameters()


def _token_logprobs(config: BCConfig, policy: Policy, batch: Rollout) -> Tensor:
    tok = policy.token_logprobs(batch)  # (b, T)
    if config.floor > 0:
        tok = floored_token_logprobs(tok, floor=config.floor, vocab=config.vocab_size)
    return tok


def bc_step(config: BCConfig, policy: Policy, batch: Rollout, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One step of maximum likelihood on ``batch``. Returns its metrics (see docs/demo_rl.md).

    Under several processes, ``batch`` is this rank's shard of the step: the loss is divided by the step's completion
    tokens over all ranks, gradients are summed over ranks, and the metrics are the whole step's."""
    n_tokens = distributed.all_sum_int(int(batch.completion_mask.sum()))  # the step's completion tokens, all ranks
    if n_tokens == 0:
        raise ValueError("the demonstrations have no completion tokens: check the completion_mask of the rollout")
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = 0.0
    parts = micro_batches(len(batch), config.micro_batch_size)
    for i, part in enumerate(parts):
        sub = batch.take(part)
        per_seq = bc_loss(_token_logprobs(config, policy, sub), sub.completion_mask)  # (b,)
        loss = per_seq.sum() / n_tokens  # the one reduction: mean over the step's completion tokens (of all ranks)
        with distributed.accumulate(policy, sync=i == len(parts) - 1):
            loss.backward()
        total += loss.item()
    distributed.reduce_gradients(policy, params)  # sum over ranks; nothing in one process
    grad_norm = distributed.as_float(grad_norm_and_clip(params, config.max_grad_norm))
    optimizer.step()
    total, sequences = distributed.all_sum([total, float(len(batch))])
    return {"loss": total, "tokens": float(n_tokens), "sequences": sequences, "grad_norm": grad_norm,
            "learning_rate": learning_rate(optimizer)}


@torch.no_grad()
def demonstration_nll(config: BCConfig, policy: Policy, demos: Rollout) -> float:
    """Mean -log q per completion token over all demonstrations (the quantity cloning lowers), micro-batched."""
    total, tokens = 0.0, int(demos.completion_mask.sum())
    for part in micro_batches(len(demos), config.micro_batch_size):
        sub = demos.take(part)
        total += float(bc_loss(_token_logprobs(config, policy, sub), sub.completion_mask).sum())
    return total / max(tokens, 1)


def num_steps(config: BCConfig) -> int:
    """How many optimisation steps ``train`` takes: ``config.steps``."""
    return config.steps


def train(
    config: BCConfig,
    policy: Policy,
    demos: Rollout,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.optim.Optimizer:
    """Clone the demonstrations ``demos`` into ``policy`` by ``config.steps`` steps of maximum likelihood.

    ``demos``: a rollout whose ``completion_mask`` is True on the completion tokens to imitate. ``on_step(step,
    metrics)`` is called after each step. Returns the optimizer (with the policy and the step number, all a
    checkpoint needs: the batches are a pure function of the step).

    Under several processes (``tilt.distributed.init``), every rank passes the same demonstrations; rank r clones the
    r-th contiguous shard of each step's demonstrations (``sequences_per_step``, or all of them, must divide evenly).
    """
    if len(demos) == 0:
        raise ValueError("no demonstrations to clone")
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    per_step = config.sequences_per_step or len(demos)
    positions = distributed.shard_positions(per_step)  # this rank's positions in each step (all of them in one process)
    for step in range(start_step, config.steps):
        set_lr(optimizer, config.lr * lr_factor(step, config.steps, config.lr_schedule, config.warmup_steps))
        indices = list(range(len(demos))) if config.sequences_per_step == 0 else prompt_indices(len(demos), step, per_step, config.seed)
        metrics = bc_step(config, policy, demos.take([indices[p] for p in positions]), optimizer)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {metrics['loss']}; lower the learning rate")
        if on_step is not None:
            on_step(step, metrics)
    return optimizer


def config_dict(config: BCConfig) -> dict:
    return asdict(config)
