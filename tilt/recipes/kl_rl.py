"""KL-regularised policy gradient: REINFORCE with a leave-one-out baseline (RLOO), or PPO-clip.

Objective (Korbak, Perez, Buckley 2022, §2; digest §1.1):

    maximise J_KL(pi) = E_{x, y~pi}[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x))

whose maximiser is the tilted target pi* ∝ pi_ref * exp(r / beta), so that J_KL(pi) = beta log Z - beta KL(pi || pi*):
this recipe is variational inference toward pi*. With beta = 0 it is pure RL, whose optimum is a point mass
on the reward's argmax (distribution collapse).

Estimator, per step: P prompts, K samples each, y ~ pi (the current policy).
  * KL in the reward (default, ``kl_penalty="reward"``): r' = r - beta * (log pi(y) - log pi_ref(y)) with the
    sequence log-ratio (k1, detached); advantage A = r' minus the mean r' of the other K-1 samples of the same
    prompt; loss = -A * log pi(y). This is the exact score-function gradient of J_KL (digest §1.3), with zero
    variance at the optimum, where r' ≡ beta log Z.
  * KL in the loss (``kl_penalty="loss"``): A from the raw reward; loss = -A log pi(y) + beta * k(y) with the
    estimator ``kl_estimator`` differentiated through log pi. Only sequence-level k2 gives the exact
    gradient of KL(pi || pi_ref); see ``tilt.math.kl`` for what the others estimate.
  * PPO-clip (``ppo_epochs > 1``): the same advantages, several passes over the batch with the clipped
    per-token ratio surrogate (Schulman et al. 2017). The first pass equals REINFORCE.

Departures from the papers: the baseline is leave-one-out (Ahmadian et al. 2024), not a learned value
function, and beta is fixed unless ``kl_target`` > 0, which adapts it with Ziegler et al.'s proportional controller. Loss reduction: mean over the sequences
of the step, whatever the micro-batch split (tests check the split does not change the gradient).

The recipe sees only the ``Policy`` protocol, so it runs unchanged on Hugging Face models and in the lab.

Several processes (``torchrun``; docs/distributed.md): each rank samples and trains on its contiguous shard of the
step's prompts (all K samples of a prompt on one rank), each prompt seeded by its global position; the loss is
divided by the global number of sequences and gradients are summed across ranks, so a run gives the same updates
whatever the number of processes. Metrics are computed on the per-sequence values gathered from every rank.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from tilt import distributed
from tilt.math import importance, mismatch
from tilt.math.kl import KL_ESTIMATORS, full_token_kl, sequence_kl, token_kl
from tilt.math.masking import masked_sum, picked_token_logprobs
from tilt.math.pg import kl_shaped_reward, leave_one_out_advantage, ppo_clip_loss, reinforce_loss
from tilt.math.kl_control import adaptive_kl_beta
from tilt.recipes.common import (ConstantRewardWatch, KLControlState, build_optimizer, frac_zero_std, grad_norm_and_clip, learning_rate,
                                 lr_factor, micro_batches, prompt_indices, set_lr, step_prompt_seeds)
from tilt.rewards import RewardFn, RewardScores, reward_metrics, score_rollout_by_function
from tilt.rollout import Policy, Rollout


@dataclass(frozen=True)
class KLRLConfig:
    """Configuration of KL-regularised RL. Batch semantics: each step draws ``prompts_per_step`` prompts and
    ``samples_per_prompt`` completions of each; a step therefore holds prompts_per_step * samples_per_prompt
    sequences."""

    beta: float = field(default=0.05, metadata={"help": "KL coefficient; 0 is pure RL. 0.05 is TRL's RLOO default."})
    steps: int = field(default=100, metadata={"help": "number of optimisation steps (one fresh batch each)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts drawn per step"})
    samples_per_prompt: int = field(
        default=4, metadata={"help": "completions per prompt (K >= 2 for the leave-one-out baseline); 4 as in Ahmadian et al. 2024"}
    )
    lr: float = field(default=1e-5, metadata={"help": "learning rate"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant' or 'linear' (decay to 0 at the last step)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from 0 to lr"})
    kl_penalty: str = field(default="reward", metadata={"help": "'reward': k1 in the shaped reward (exact); 'loss': estimator added to the loss; "
                                                           "'full': the exact next-token KL over the whole vocabulary at each position, in the "
                                                           "reward and as a pathwise loss term (exact gradient, lower variance; docs/kl_rl.md)"})
    kl_estimator: str = field(default="k1", metadata={"help": "k1, k2 or k3; used with kl_penalty=loss (the reward always uses k1)"})
    kl_level: str = field(default="sequence", metadata={"help": "with kl_penalty=loss: 'sequence' (estimator on the summed log-ratio) or 'token' (summed per-token estimates)"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each batch; 1 = REINFORCE, >1 = PPO-clip"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO ratio clip; 0.2 as in Schulman et al. 2017"})
    micro_batch_size: int = field(default=0, metadata={"help": "sequences per forward/backward pass; 0 = the whole step at once"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order and sampling"})
    kl_target: float = field(default=0.0, metadata={"help": "target KL(pi || pi_ref) in nats per sequence: > 0 adapts beta every step with "
                                                            "Ziegler et al. 2019's proportional controller, starting from beta; 0 = beta fixed"})
    kl_horizon: float = field(default=10000.0, metadata={"help": "controller horizon: gain = sequences per step / horizon; 10000 as in Ziegler et al.'s code and TRL"})
    kl_budget: float = field(default=0.0, metadata={"help": "stop once a step's KL(pi || pi_ref) estimate exceeds this many nats (docs/kl_rl.md says which checkpoint to keep); 0 = no budget"})
    importance_weighting: str = field(default="truncated", metadata={"help": (
        "weights pi/q of samples drawn by a fast sampler q (sampling.sampler int8/int8-smooth/fp16/bf16): 'truncated' (min(w, importance_cap); "
        "Yao et al. 2025), 'self-normalised' (within a prompt's samples) or 'none' (biased; for comparison); tilt.math.mismatch")})
    importance_cap: float = field(default=2.0, metadata={"help": "cap of the truncated weights; 2 as in Yao et al. 2025 and TRL's vllm_importance_sampling_cap"})

    def __post_init__(self):
        if self.kl_target < 0 or self.kl_budget < 0 or not self.kl_horizon > 0:
            raise ValueError(f"need kl_target >= 0, kl_budget >= 0 and kl_horizon > 0; got {self.kl_target}, {self.kl_budget}, {self.kl_horizon}")
        if self.kl_target > 0 and self.beta == 0:
            raise ValueError("kl_target adapts beta multiplicatively, so it cannot start from beta = 0: give an initial beta > 0")
        if self.importance_weighting not in mismatch.WEIGHTINGS or self.importance_cap < 1:
            raise ValueError(f"importance_weighting must be one of {mismatch.WEIGHTINGS} and importance_cap >= 1, "
                             f"got {self.importance_weighting!r}, {self.importance_cap}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2: the leave-one-out baseline needs two samples of a prompt")
        if self.prompts_per_step < 1 or self.steps < 0:
            raise ValueError("prompts_per_step must be >= 1 and steps >= 0")
        if self.kl_penalty not in ("reward", "loss", "full"):
            raise ValueError(f"kl_penalty must be 'reward', 'loss' or 'full', got {self.kl_penalty!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.kl_level not in ("sequence", "token"):
            raise ValueError(f"kl_level must be 'sequence' or 'token', got {self.kl_level!r}")
        if self.ppo_epochs < 1 or not 0 < self.clip_eps < 1:
            raise ValueError("ppo_epochs must be >= 1 and 0 < clip_eps < 1")
        if self.lr_schedule not in ("constant", "linear") or self.warmup_steps < 0:
            raise ValueError(f"lr_schedule must be 'constant' or 'linear' and warmup_steps >= 0, got {self.lr_schedule!r}")
        if self.micro_batch_size < 0:
            raise ValueError("micro_batch_size must be >= 0 (0 = whole step)")


@torch.no_grad()
def score_tokens(policy: Policy, rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
    """(B, T) token log-probs of a rollout under ``policy``, without gradient, micro-batched."""
    parts = [policy.token_logprobs(rollout.take(s)) for s in micro_batches(len(rollout), micro_batch_size)]
    return torch.cat(parts)


def full_kl_pass(policy: Policy, ref: Policy, rollout: Rollout, parts: list, *, reuse: bool):
    """The first passes of ``kl_penalty=full``: (graded_full, ref_full, kl_full_seq (B,), old_tok (B, T), ref_tok (B, T)).

    With one micro-batch and ``reuse`` (one epoch), the policy's pass is the update's own, with grad (graded_full,
    (B, T, V)) and the reference's is kept for it (ref_full); otherwise both are None and each micro-batch is
    scored here without grad, then again in the update (one more pass of each model, (b, T, V) floats at a time)."""
    mask = rollout.completion_mask
    if reuse and len(parts) == 1:
        with torch.no_grad():
            ref_full = ref.token_log_softmax(rollout)  # (B, T, V)
        graded_full = policy.token_log_softmax(rollout)  # (B, T, V) with grad
        firsts = [(graded_full.detach(), ref_full)]
    else:
        graded_full = ref_full = None
        with torch.no_grad():
            firsts = [(policy.token_log_softmax(rollout.take(p)), ref.token_log_softmax(rollout.take(p))) for p in parts]
    kl_full_seq = torch.cat([full_token_kl(pi_f, ref_f, mask[p]) for (pi_f, ref_f), p in zip(firsts, parts)])
    old_tok = torch.cat([picked_token_logprobs(pi_f, rollout.completion_ids[p], mask[p]) for (pi_f, _), p in zip(firsts, parts)])
    ref_tok = torch.cat([picked_token_logprobs(ref_f, rollout.completion_ids[p], mask[p]) for (_, ref_f), p in zip(firsts, parts)])
    return graded_full, ref_full, kl_full_seq, old_tok, ref_tok


def kl_rl_step(
    config: KLRLConfig,
    policy: Policy,
    ref: Policy,
    reward_fn: RewardFn,
    prompts: Sequence[Any],
    optimizer: torch.optim.Optimizer,
    prompt_seeds: Sequence[int],
) -> dict[str, float]:
    """One step: sample (prompt p's completions from ``prompt_seeds[p]``), score, shape, and update.
    Returns the step's metrics (see docs/kl_rl.md).

    Under several processes, ``prompts`` and ``prompt_seeds`` are this rank's shard of the step; the loss is
    divided by the global number of sequences, gradients are summed and metrics computed over all ranks."""
    k = config.samples_per_prompt
    rollout = policy.sample(prompts, k, prompt_seeds=prompt_seeds)
    mask = rollout.completion_mask  # (B, T) True where a token counts
    n_seq = distributed.all_sum_int(len(rollout))  # the step's sequences over all ranks (len(rollout) in one process)
    scores = score_rollout_by_function(reward_fn, rollout)  # passes completion_ids, as TRL does
    rewards = scores.total  # (B,) the weighted sum of the reward functions

    parts = micro_batches(len(rollout), config.micro_batch_size)
    full = config.kl_penalty == "full"
    graded_tok = None  # the update's own forward pass, when it can also supply pi's log-probs
    graded_full = ref_full = kl_full_seq = None  # kl_penalty=full: (B, T, V) distributions, (B,) sum_t KL_t
    if full:
        graded_full, ref_full, kl_full_seq, old_tok, ref_tok = full_kl_pass(policy, ref, rollout, parts, reuse=config.ppo_epochs == 1)
    else:
        ref_tok = score_tokens(ref, rollout, config.micro_batch_size)  # (B, T)
        if rollout.sampled_from_policy:
            old_tok = rollout.sample_token_logprobs  # equal to the scorer's to float precision (tested)
        elif rollout.from_proposal and config.ppo_epochs == 1 and len(parts) == 1:
            graded_tok = policy.token_logprobs(rollout)  # (B, T) with grad: pi's log-probs come free with the update's pass
            old_tok = graded_tok.detach()
        else:
            old_tok = score_tokens(policy, rollout, config.micro_batch_size)
    old_seq, ref_seq = masked_sum(old_tok, mask), masked_sum(ref_tok, mask)  # (B,)
    q_seq = rollout.sample_seq_logprobs.to(old_seq.dtype)  # (B,) log q: the sampler's (= old_seq when q = pi)
    rewards = rewards.to(old_seq.dtype)

    if full:  # r - beta * sum_t KL_t: the Rao-Blackwellised k1 (tilt.math.kl.full_token_kl)
        shaped = rewards - config.beta * kl_full_seq.to(rewards.dtype)  # (B,)
    else:
        beta_in_reward = config.beta if config.kl_penalty == "reward" else 0.0
        shaped = kl_shaped_reward(rewards, old_seq, ref_seq, beta=beta_in_reward)  # (B,)
    seq_weights = None  # (B,) pi/q per sequence (tilt.math.mismatch) when a fast sampler q drew the samples
    if rollout.from_proposal:
        group_weights = mismatch.sequence_weights(mismatch.log_ratio(old_seq, q_seq).view(-1, k), weighting=config.importance_weighting,
                                                  cap=config.importance_cap)  # (P, K)
        advantages = mismatch.weighted_leave_one_out_advantage(shaped.view(-1, k), group_weights).view(-1)  # (B,)
        seq_weights = group_weights.view(-1)
    else:
        advantages = leave_one_out_advantage(shaped.view(-1, k)).view(-1)  # (B,)
    estimator = KL_ESTIMATORS[config.kl_estimator]

    totals = {"loss": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _epoch in range(config.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for i, part in enumerate(parts):
            sub = rollout.take(part)
            if full:
                pi_full = graded_full if graded_full is not None else policy.token_log_softmax(sub)  # (b, T, V) with grad
                if graded_full is None:
                    with torch.no_grad():
                        ref_full = ref.token_log_softmax(sub)
                tok = picked_token_logprobs(pi_full, sub.completion_ids, sub.completion_mask)  # (b, T)
            else:
                tok = graded_tok if graded_tok is not None else policy.token_logprobs(sub)  # (b, T) with grad
            if config.ppo_epochs == 1:
                per_seq = reinforce_loss(tok, advantages[part], sub.completion_mask)
                clipped = torch.zeros(())
            else:
                per_seq, clip_frac = ppo_clip_loss(tok, old_tok[part], advantages[part], sub.completion_mask, clip_eps=config.clip_eps)
                clipped = clip_frac.sum()
            if full and config.beta > 0:  # the pathwise term E[sum_t ∇KL_t]; the reward holds the prefixes' term
                per_seq = per_seq + config.beta * full_token_kl(pi_full, ref_full, sub.completion_mask)
            if config.kl_penalty == "loss" and config.beta > 0:
                if config.kl_level == "sequence":
                    kl = sequence_kl(estimator, masked_sum(tok, sub.completion_mask), ref_seq[part])
                else:
                    kl = token_kl(estimator, tok, ref_tok[part], sub.completion_mask)
                per_seq = per_seq + config.beta * kl
            if seq_weights is not None:
                per_seq = seq_weights[part] * per_seq  # E_q[(pi/q) loss] = E_pi[loss]
            loss = per_seq.sum() / n_seq  # the one reduction: mean over the step's sequences (of all ranks)
            with distributed.accumulate(policy, sync=i == len(parts) - 1):
                loss.backward()
            totals["loss"] += loss.item() / config.ppo_epochs
            totals["clip_fraction"] += clipped.item() / n_seq / config.ppo_epochs
        distributed.reduce_gradients(policy, params)  # sum over ranks; nothing in one process
        norm = grad_norm_and_clip(params, config.max_grad_norm)  # measured every step, clipped when asked
        totals["grad_norm"] += distributed.as_float(norm) / config.ppo_epochs
        optimizer.step()
    totals["loss"], totals["clip_fraction"] = distributed.all_sum([totals["loss"], totals["clip_fraction"]])

    # metrics over the whole step: per-sequence values of every rank, in global batch order
    lengths = mask.sum(-1)  # (B,)
    rewards, old_seq, ref_seq, q_seq, advantages, lengths, truncated = distributed.all_gather_cat(
        rewards, old_seq, ref_seq, q_seq, advantages, lengths, rollout.truncated
    )

    kl_seq = old_seq - ref_seq  # (B,) k1 per sequence on fresh samples
    posterior = {}
    if config.beta > 0:  # how far pi is from pi*, by importance sampling on the step's own samples (proposal: the sampler q)
        target_log_weights = ref_seq + rewards / config.beta  # (B,) log pi_ref + r / beta
        grouped = [x.view(-1, k) for x in (target_log_weights, q_seq, old_seq)]
        posterior = importance.target_metrics(*grouped)
    return {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if n_seq > 1 else 0.0,
        "kl_ref": kl_seq.mean().item(),
        "kl_ref_k3": sequence_kl(KL_ESTIMATORS["k3"], old_seq, ref_seq).mean().item(),
        **({"kl_ref_full": distributed.all_gather_cat(kl_full_seq)[0].mean().item()} if full else {}),
        "shaped_reward": kl_shaped_reward(rewards, old_seq, ref_seq, beta=config.beta).mean().item(),
        "entropy": -old_seq.mean().item(),
        "advantage_abs": advantages.abs().mean().item(),
        "completion_length": lengths.float().mean().item(),
        "truncated_fraction": truncated.float().mean().item(),
        "frac_reward_zero_std": frac_zero_std(rewards.view(-1, k)),
        "learning_rate": learning_rate(optimizer),
        **totals,
        **posterior,
        **function_metrics(scores),
        **mismatch.mismatch_metrics(mismatch.log_ratio(old_seq, q_seq).view(-1, k), cap=config.importance_cap),
        "sampler/refresh_seconds": rollout.sampler_refresh_seconds,
    }


def function_metrics(scores: RewardScores) -> dict[str, float]:
    """``rewards/<name>/mean`` and ``/std`` (TRL's keys, ``tilt.rewards.reward_metrics``) of each reward function
    over every rank's samples, when the reward sums several functions; nothing for a single one (``reward`` is it)."""
    names = list(scores.values)
    if len(names) < 2:
        return {}
    gathered = distributed.all_gather_cat(*(scores.values[n] for n in names), *(scores.scored_mask[n] for n in names))
    values, masks = dict(zip(names, gathered[:len(names)])), dict(zip(names, gathered[len(names):]))
    return reward_metrics(RewardScores(total=scores.total, values=values, scored_mask=masks))


def num_steps(config: KLRLConfig) -> int:
    """How many optimisation steps ``train`` takes: ``config.steps``."""
    return config.steps


def train(
    config: KLRLConfig,
    policy: Policy,
    ref: Policy,
    reward_fn: RewardFn,
    prompts: Sequence[Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    kl_state: KLControlState | None = None,
) -> torch.optim.Optimizer:
    """Run ``config.steps`` steps of KL-regularised RL of ``policy`` toward pi* ∝ ref * exp(reward / beta).

    ``ref`` may be any policy with the same vocabulary, not necessarily the initial one (Tiapkin et al. 2023
    regularise toward a behaviour-cloned policy). ``on_step(step, metrics)`` is called after each step, on every
    rank, with the metrics of the whole step (write them from ``distributed.is_main()`` only).
    Returns the optimizer (its state is what a checkpoint needs besides the policy and the step number).

    Under several processes (``distributed.init``), every rank passes the same config and prompts; rank r takes the
    r-th contiguous shard of each step's ``prompts_per_step`` prompts (which must divide evenly).

    Adaptive beta (``kl_target`` > 0) and the KL budget: ``kl_state`` (a ``KLControlState`` the caller owns and
    checkpoints) holds the beta of the next step and is updated in place before ``on_step``; a resumed adaptive run
    must pass the state saved with its checkpoint. Every step logs the ``beta`` it used. When a step's ``kl_ref``
    exceeds ``kl_budget``, that step logs ``kl_budget_exceeded`` = 1, ``kl_state.budget_exceeded_step`` is set and
    training stops after ``on_step``: the policy that step sampled from was over the budget, so the last policy
    measured within it is the one the previous step sampled from (docs/kl_rl.md).
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to train on")
    distributed.check_same_config({"recipe": "kl_rl", **asdict(config), "prompts": distributed.config_hash(list(prompts))})
    positions = distributed.shard_positions(config.prompts_per_step)  # range(prompts_per_step) in one process
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    if kl_state is None:
        if config.kl_target > 0 and start_step > 0:
            raise ValueError("resuming an adaptive-beta run (kl_target > 0) needs the KLControlState saved with its checkpoint: pass kl_state")
        kl_state = KLControlState(beta=config.beta)
    watch = ConstantRewardWatch()
    for step in range(start_step, config.steps):
        set_lr(optimizer, config.lr * lr_factor(step, config.steps, config.lr_schedule, config.warmup_steps))
        step_prompts = prompt_indices(len(prompts), step, config.prompts_per_step, config.seed)  # global list
        batch = [prompts[step_prompts[p]] for p in positions]
        seeds = step_prompt_seeds(config.seed, step, positions)  # by global position: same samples at any world size
        step_config = replace(config, beta=kl_state.beta) if config.kl_target > 0 else config
        metrics = {**kl_rl_step(step_config, policy, ref, reward_fn, batch, optimizer, seeds), "beta": step_config.beta}
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {metrics['loss']}; lower the learning rate or check the reward scale")
        if config.kl_target > 0:
            kl_state.beta = adaptive_kl_beta(kl_state.beta, metrics["kl_ref"], target=config.kl_target, horizon=config.kl_horizon,
                                             n_steps=config.prompts_per_step * config.samples_per_prompt)
        over = config.kl_budget > 0 and metrics["kl_ref"] > config.kl_budget
        if config.kl_budget > 0:
            metrics["kl_budget_exceeded"] = float(over)
        if over:
            kl_state.budget_exceeded_step = step
        watch.update(step, metrics["frac_reward_zero_std"])
        if on_step is not None:
            on_step(step, metrics)
        if over:
            break
    return optimizer


def config_dict(config: KLRLConfig) -> dict:
    return asdict(config)
