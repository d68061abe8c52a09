"""Distribution matching toward the tilted target: DPG, KL-adaptive DPG, and the f-divergence family.

Objective (Korbak, Perez, Buckley 2022, §2 and §4; Parshakova et al. 2019 [R]; Khalifa et al. 2021 [R]):

    minimise D_f(pi_theta || pi*),   pi*(y|x) = P(x, y) / Z(x),   P = pi_ref exp(Phi(r)/beta)  (or pi_ref * b, a filter)

With f chosen from ``tilt.math.fdiv.DIVERGENCES``: ``forward-kl`` is DPG/GDC (the cross-entropy
-E_{pi*} log pi, i.e. KL(pi* || pi)); ``reverse-kl`` is KL-regularised RL (same expected gradient as
``tilt.recipes.kl_rl`` divided by beta); ``js``, ``tv`` and ``chi2`` are f-DPG (disco's FDPGTuner [V-code]).

Estimator, per step: P prompts, K samples each, drawn from a proposal q.
  * ``mode="on-policy"``: q = pi_theta, importance weights pi/q = 1 (DPG_on).
  * ``mode="adaptive"``: q is a frozen copy of pi_theta (KL-adaptive DPG, the GDC training loop). Every
    ``proposal_update_interval`` steps the samples drawn from q since the last check are re-scored under the
    current pi, and q is replaced by a copy of pi only if the self-normalised IS estimate of KL(pi* || pi) is
    below that of KL(pi* || q) (digest §2(b); disco ``Tuner`` offline mode [V-code]).
  * log Z(x): a running estimate per prompt, log mean P/q over every sample of that prompt seen so far
    (``tilt.math.importance.RunningLogZ``; disco's moving Z). Prompts seen once fall back to that step's samples.
  * pseudo-reward -f'(pi/p) with log p = log P - log Ẑ; advantage = pseudo-reward minus the weighted
    leave-one-out mean of the other samples of the same prompt (an unbiased baseline); loss per sequence
    -(pi/q) * A * log pi(y) (``tilt.math.fdiv.f_divergence_loss``), mean over the step's sequences.

Departures: the baseline is leave-one-out within a prompt (unbiased for every f) instead of disco's moving
average of past pseudo-rewards (window 1024), which is biased when the policy moves; each f is normalised so that
f'(1) = 0, so for forward KL the pseudo-reward is already p/pi - 1, the GDC++ baseline (Korbak et al. 2022b,
Facts 1-2 [R]), and ``baseline="none"`` gives exactly GDC++. The error of Ẑ makes every f but forward KL (where
Z only scales the gradient) and reverse KL (where it is a constant) slightly biased, as in disco.

The recipe sees the ``Policy`` protocol and a ``tilt.target.TiltedTarget`` only.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from tilt import distributed
from tilt.math import importance, mismatch
from tilt.math.fdiv import DIVERGENCES, f_divergence_loss, importance_weights, log_density_ratio, pseudo_reward, weighted_leave_one_out_baseline
from tilt.math.masking import masked_sum
from tilt.recipes.common import (ConstantRewardWatch, build_optimizer, frac_zero_std, grad_norm_and_clip, learning_rate, lr_factor,
                                 micro_batches, prompt_indices, set_lr, step_prompt_seeds)
from tilt.math.target import tilted_log_weight
from tilt.recipes.kl_rl import score_tokens
from tilt.rewards import score_rewards
from tilt.rollout import Policy, Rollout
from tilt.target import TiltedTarget

MODES = ("on-policy", "adaptive")


@dataclass(frozen=True)
class DPGConfig:
    """Configuration of distribution matching. Batch semantics: each step draws ``prompts_per_step`` prompts and
    ``samples_per_prompt`` completions of each from the proposal."""

    mode: str = field(default="on-policy", metadata={"help": "'on-policy' (q = pi) or 'adaptive' (frozen q, replaced when KL(pi*||pi) improves)"})
    divergence: str = field(default="forward-kl", metadata={"help": "forward-kl (DPG), reverse-kl (= KL-regularised RL), js, tv or chi2"})
    baseline: str = field(default="loo", metadata={"help": "'loo': weighted leave-one-out mean of the pseudo-reward; 'none': f'(1) = 0 only (GDC++ for forward-kl)"})
    steps: int = field(default=100, metadata={"help": "number of optimisation steps (one fresh batch each)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts drawn per step"})
    samples_per_prompt: int = field(default=4, metadata={"help": "completions per prompt (K >= 2 for the leave-one-out baseline)"})
    lr: float = field(default=1.41e-5, metadata={"help": "learning rate; 1.41e-5 is disco's Tuner default"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd (disco uses Adam)"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant' (disco's default) or 'linear' (decay to 0 at the last step)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from 0 to lr"})
    proposal_update_interval: int = field(default=16, metadata={"help": "adaptive mode: steps between proposal checks; 2^4 as in disco"})
    micro_batch_size: int = field(default=0, metadata={"help": "sequences per forward/backward pass; 0 = the whole step at once"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    diagnostics_interval: int = field(default=1, metadata={"help": "log IS estimates of KL(pi*||pi), KL(pi||pi*), TV, JS with intervals every this many steps; 0 = never"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order and sampling"})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {self.divergence!r}")
        if self.baseline not in ("loo", "none"):
            raise ValueError(f"baseline must be 'loo' or 'none', got {self.baseline!r}")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2: the baseline and the interval estimates need two samples of a prompt")
        if self.prompts_per_step < 1 or self.steps < 0:
            raise ValueError("prompts_per_step must be >= 1 and steps >= 0")
        if self.proposal_update_interval < 1 or self.diagnostics_interval < 0:
            raise ValueError("proposal_update_interval must be >= 1 and diagnostics_interval >= 0")
        if self.lr_schedule not in ("constant", "linear") or self.warmup_steps < 0:
            raise ValueError(f"lr_schedule must be 'constant' or 'linear' and warmup_steps >= 0, got {self.lr_schedule!r}")
        if self.micro_batch_size < 0:
            raise ValueError("micro_batch_size must be >= 0 (0 = whole step)")


@dataclass
class DPGState:
    """What a DPG run carries between steps (checkpoint it with the optimizer): the running log Z of each prompt,
    the frozen proposal (adaptive mode), and the proposal's samples since the last check."""

    log_z: dict = field(default_factory=dict)  # prompt key -> importance.RunningLogZ
    proposal: Policy | None = None
    pending: list = field(default_factory=list)  # (rollout, log P (B,), log q (B,)) drawn from the current proposal
    proposal_updates: int = 0


def _key(prompt: Any) -> Any:
    try:
        hash(prompt)
        return prompt
    except TypeError:
        return repr(prompt)


def frozen_copy(policy: Policy) -> Policy:
    """A copy of ``policy`` that does not train (the adaptive proposal)."""
    proposal = copy.deepcopy(policy)
    for p in proposal.parameters():
        p.requires_grad_(False)
    return proposal


def _seq(policy: Policy, rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
    return masked_sum(score_tokens(policy, rollout, micro_batch_size), rollout.completion_mask)


def dpg_step(
    config: DPGConfig,
    policy: Policy,
    target: TiltedTarget,
    prompts: Sequence[Any],
    optimizer: torch.optim.Optimizer,
    prompt_seeds: Sequence[int],
    state: DPGState,
    *,
    log_diagnostics: bool = True,
    step_prompts: Sequence[Any] | None = None,
) -> dict[str, float]:
    """One step: sample from the proposal, weigh, update. Returns the step's metrics (see docs/dpg.md).

    Under several processes, ``prompts`` and ``prompt_seeds`` are this rank's contiguous shard of the step's prompts
    ``step_prompts`` (all ranks): the running log Z of every prompt of the step is updated from the weights of all
    ranks (so the state is the same on every rank and equal to the one-process state), the loss is divided by the
    global number of sequences, gradients are summed and the metrics computed over all ranks."""
    k = config.samples_per_prompt
    step_prompts = list(prompts) if step_prompts is None else list(step_prompts)
    first = distributed.shard_positions(len(step_prompts)).start * k  # this rank's first sequence in the step
    sampler = policy if config.mode == "on-policy" else state.proposal
    rollout = sampler.sample(prompts, k, prompt_seeds=prompt_seeds)
    n_local = len(rollout)
    n_seq = distributed.all_sum_int(n_local)  # the step's sequences over all ranks

    # q is the distribution actually sampled from (tempered or truncated if the engine was told so): its log-probs
    # are the rollout's, and the weights pi/q then correct for it (exactly unless truncation gives q zeros where pi has none)
    log_q = rollout.sample_seq_logprobs.double()
    log_pi = log_q if config.mode == "on-policy" and rollout.sampled_from_policy else _seq(policy, rollout, config.micro_batch_size).double()
    ref_seq = _seq(target.ref, rollout, config.micro_batch_size).double()  # (B,) log pi_ref
    rewards = score_rewards(target.reward, rollout.prompts, rollout.completions).to(log_q.dtype)  # (B,) raw r
    log_p_unnorm = tilted_log_weight(ref_seq, target.transform(rewards), beta=target.beta)  # (B,) log P, -inf off a filter
    log_w = log_p_unnorm - log_q  # (B,)

    # running log Z per prompt, updated with this step's samples (of every rank) first
    (log_w_all,) = distributed.all_gather_cat(log_w)  # (N,) the whole step, in global order
    log_z_all = torch.empty(n_seq, dtype=log_q.dtype)
    for p, prompt in enumerate(step_prompts):
        key, part = _key(prompt), slice(p * k, (p + 1) * k)
        state.log_z[key] = state.log_z.get(key, importance.RunningLogZ()).updated(log_w_all[part])
        log_z_all[part] = state.log_z[key].log_z
    if not torch.isfinite(log_z_all).all():
        raise FloatingPointError(
            "every sample of a prompt so far has target weight 0 (the filter rejects them all), so Z cannot be "
            "estimated; use more samples per prompt or a proposal that reaches the filter"
        )
    log_z = log_z_all[first: first + n_local]  # (B,) this rank's

    fdiv = DIVERGENCES[config.divergence]
    log_t = log_density_ratio(log_pi, log_p_unnorm, log_z)  # (B,) log pi/p
    rewards_f = pseudo_reward(fdiv.fprime, log_t)  # (B,)
    if not torch.isfinite(rewards_f).all():
        raise ValueError(
            f"the {config.divergence} pseudo-reward is infinite: the target is 0 on a sampled sequence (a 0/1 filter), "
            "where KL(pi || pi*) is infinite; use forward-kl, js, tv or chi2 to match a filtered posterior"
        )
    weights = importance_weights(log_pi, log_q)  # (B,) pi/q
    if config.baseline == "loo":
        baseline = weighted_leave_one_out_baseline(rewards_f.view(-1, k), weights.view(-1, k)).view(-1)
    else:
        baseline = torch.zeros_like(rewards_f)
    advantages = rewards_f - baseline  # (B,)

    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total_loss = 0.0
    parts = micro_batches(n_local, config.micro_batch_size)
    for i, part in enumerate(parts):
        sub = rollout.take(part)
        tok = policy.token_logprobs(sub)  # (b, T) with grad
        loss = f_divergence_loss(tok, advantages[part], weights[part], sub.completion_mask).sum() / n_seq
        with distributed.accumulate(policy, sync=i == len(parts) - 1):
            loss.backward()  # the one reduction: mean over the step's sequences (of all ranks)
        total_loss += loss.item()
    distributed.reduce_gradients(policy, params)  # sum over ranks; nothing in one process
    grad_norm = distributed.as_float(grad_norm_and_clip(params, config.max_grad_norm))
    optimizer.step()
    (total_loss,) = distributed.all_sum([total_loss])

    # metrics over the whole step: per-sequence values of every rank, in global batch order
    weights_all, rewards_all, log_pi_all, ref_all, adv_all, log_p_all, log_q_all = distributed.all_gather_cat(
        weights, rewards, log_pi, ref_seq, advantages, log_p_unnorm, log_q)
    kl_ref = weights_all * (log_pi_all - ref_all)  # IS estimate of KL(pi || pi_ref) per sample
    metrics = {
        "loss": total_loss,
        "reward": (weights_all * rewards_all).mean().item(),
        "kl_ref": kl_ref.mean().item(),
        "log_z_running": log_z_all.view(-1, k)[:, 0].mean().item(),
        "advantage_abs": adv_all.abs().mean().item(),
        "importance_weight_max": weights_all.max().item(),
        "grad_norm": grad_norm,
        "learning_rate": learning_rate(optimizer),
        "frac_reward_zero_std": frac_zero_std(rewards_all.view(-1, k)),
        "proposal_updates": float(state.proposal_updates),
        **mismatch.mismatch_metrics(mismatch.log_ratio(log_pi_all, log_q_all).view(-1, k), cap=mismatch.DEFAULT_CAP),  # the sampler q against pi
    }
    if log_diagnostics:
        metrics.update(importance.target_metrics(log_p_all.view(-1, k), log_q_all.view(-1, k), log_pi_all.view(-1, k)))

    if config.mode == "adaptive":
        state.pending.append((rollout, log_p_unnorm.view(-1, k), log_q.view(-1, k)))
    return metrics


@torch.no_grad()
def maybe_update_proposal(config: DPGConfig, policy: Policy, state: DPGState) -> dict[str, float]:
    """KL-adaptive DPG: estimate KL(pi* || pi) and KL(pi* || q) on the proposal's pending samples (self-normalised IS,
    the same weights for both, so Ẑ cancels in the comparison) and replace q by a copy of pi if pi is closer."""
    kl_pi, kl_q = [], []
    for rollout, log_p, log_q in state.pending:
        log_pi = _seq(policy, rollout, config.micro_batch_size).view_as(log_q)
        kl_pi.append(importance.kl_target_policy(log_p, log_q, log_pi).value)
        kl_q.append(importance.kl_target_policy(log_p, log_q, log_q).value)
    all_pi, all_q = distributed.all_gather_cat(torch.cat(kl_pi), torch.cat(kl_q))  # every rank's prompts
    est_pi, est_q = all_pi.mean().item(), all_q.mean().item()
    replaced = est_pi < est_q
    if replaced:
        state.proposal = frozen_copy(policy)
        state.proposal_updates += 1
    state.pending = []
    return {"kl_target_policy_check": est_pi, "kl_target_proposal_check": est_q, "proposal_replaced": float(replaced)}


def train(
    config: DPGConfig,
    policy: Policy,
    target: TiltedTarget,
    prompts: Sequence[Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    state: DPGState | None = None,
    start_step: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[torch.optim.Optimizer, DPGState]:
    """Run ``config.steps`` steps of distribution matching of ``policy`` toward ``target``.

    ``on_step(step, metrics)`` is called after each step. Returns the optimizer and the state (running log Z,
    proposal), which a checkpoint needs besides the policy and the step number. In adaptive mode the initial
    proposal is a frozen copy of ``policy`` unless ``state.proposal`` is given.

    Under several processes (``tilt.distributed.init``), every rank passes the same config and prompts; rank r takes
    the r-th contiguous shard of each step's ``prompts_per_step`` prompts (which must divide evenly), and the state
    (running log Z, proposal decisions) stays the same on every rank.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to train on")
    distributed.check_same_config({"recipe": "dpg", **asdict(config), "prompts": distributed.config_hash(list(prompts))})
    positions = distributed.shard_positions(config.prompts_per_step)  # range(prompts_per_step) in one process
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    state = state or DPGState()
    if config.mode == "adaptive" and state.proposal is None:
        state.proposal = frozen_copy(policy)
    watch = ConstantRewardWatch()
    for step in range(start_step, config.steps):
        set_lr(optimizer, config.lr * lr_factor(step, config.steps, config.lr_schedule, config.warmup_steps))
        step_prompts = [prompts[i] for i in prompt_indices(len(prompts), step, config.prompts_per_step, config.seed)]
        diag = config.diagnostics_interval > 0 and step % config.diagnostics_interval == 0
        seeds = step_prompt_seeds(config.seed, step, positions)  # by global position: same samples at any world size
        metrics = dpg_step(config, policy, target, [step_prompts[p] for p in positions], optimizer, seeds, state,
                           log_diagnostics=diag, step_prompts=step_prompts)
        if config.mode == "adaptive" and (step + 1) % config.proposal_update_interval == 0:
            metrics.update(maybe_update_proposal(config, policy, state))
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {metrics['loss']}; lower the learning rate or check the target")
        watch.update(step, metrics["frac_reward_zero_std"])
        if on_step is not None:
            on_step(step, metrics)
    return optimizer, state


def config_dict(config: DPGConfig) -> dict:
    return asdict(config)
