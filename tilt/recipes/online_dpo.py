"""Online DPO and XPO: one recipe, three sampling schemes, two data regimes.

Objective (Xie et al. 2024, Algorithm 1; digest §4(a), where its exact typesetting is marked [R], unverified, and its
structure is corroborated by the TRL and oat implementations). Each step t draws prompts x, two responses per prompt,
labels them with a preference oracle, and minimises

    L(pi) = (1/n) * sum_{(x, y+, y-)} -log sigma(beta * h)  +  (alpha/n) * sum_i log pi(y~_i | x_i),
    h = [log pi(y+) - log pi_ref(y+)] - [log pi(y-) - log pi_ref(y-)],

over the pairs of the current batch (``regime="streaming"``: one gradient step per fresh batch, as TRL's online
trainers do, digest §4(b)) or over all pairs so far (``regime="cumulative"``: the data set grows step by step and
each step re-fits on all of it with ``refit_steps`` gradient steps, as in Algorithm 1's argmin). n is the number
of pairs in the sum (ties included), so alpha keeps the paper's ratio to the DPO term.

Schemes (``scheme``), easy to tell apart:
  * ``online-dpo``: both responses from the current policy pi_t (passive exploration; TRL's OnlineDPO); no bonus.
  * ``pairs``: y ~ pi_t and y~ ~ pi_ref, alpha must be 0: Algorithm 1's sampling without the bonus.
  * ``xpo``: the same pairs plus alpha * log pi(y~) on the reference sample y~, whether it won or lost.

Sign convention: +alpha * log pi(y~) is added to a loss that is *minimised*. Since E_{y~ ~ pi_ref} log pi(y~) =
-KL(pi_ref || pi) - H(pi_ref), the bonus *raises* KL(pi_ref || pi): it pushes mass off what the reference
typically says, toward responses pi_ref rarely produces (optimism; ``tilt.math.preference.xpo_bonus``).

Ties (oracle label 0.5) are dropped from the DPO term (they carry no ordering) but count in n, and a tied
reference sample still carries its bonus. ``loss_type="ipo"`` swaps the DPO term for (h - 1/(2 beta))^2.
alpha and beta may be schedules: a tuple gives the value of step 0, 1, ...; the last value is kept afterwards
(TRL schedules per epoch; here a step is the unit). Reference log-probs are computed once, when a pair is
collected, and reused in every re-fit.

Posterior diagnostics: with a Bradley-Terry oracle of scale s (``tilt.preferences.BradleyTerry``, P(A > B) =
sigma(s (r(A) - r(B)))), the optimum of the objective is pi* ∝ pi_ref exp(s r / beta) (digest §1.4), and each step
logs the ``target_*`` estimates of ``tilt.math.importance.diagnostics`` (the keys KL-RL logs) against it, with the
step's beta, from the step's fresh pairs, with the policy's log-probs from before its update, K = 2 per prompt (so
the self-normalised estimates are rough; read the ESS). ``online-dpo``: both responses are from pi_t, q = pi_t.
``pairs``/``xpo``: A ~ pi_t and B ~ pi_ref are one stratified draw from the mixture q = (pi_t + pi_ref)/2, and both
are weighted by it (multiple importance sampling with the balance heuristic, Veach & Guibas 1995): log q(y) =
logaddexp(log pi_t(y), log pi_ref(y)) - log 2, so Z-hat = [P(A)/q(A) + P(B)/q(B)]/2 is unbiased, E = ∫ q P/q = Z.
The rewards are the oracle's own, the reference log-probs those of the pair, log pi_t(B) the loss's own (before the
step's update). Not logged with samples not from the sampler's model itself (temperature, top-k/p), and with other
oracles (a deterministic comparison or a judge has no finite tilted target).

The recipe sees only the ``Policy`` protocol, so it runs on the tabular lab and on Hugging Face models alike.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tilt import distributed
from tilt.math import importance, mismatch
from tilt.math.masking import masked_sum
from tilt.math.preference import dpo_sigmoid_loss, implicit_reward, ipo_loss, xpo_bonus
from tilt.preferences import TIE, BradleyTerry, PreferenceOracle
from tilt.recipes.common import (ConstantRewardWatch, build_optimizer, derive_seed, grad_norm_and_clip, learning_rate, prompt_indices,
                                 step_generator, step_prompt_seeds)
from tilt.rollout import Policy, Rollout

SCHEMES = ("online-dpo", "pairs", "xpo")
LOSSES = {"sigmoid": dpo_sigmoid_loss, "ipo": ipo_loss}


def _as_schedule(value) -> tuple[float, ...]:
    values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)
    if not values:
        raise ValueError("a schedule needs at least one value")
    return values


def scheduled(values: tuple[float, ...], step: int) -> float:
    """The value of a schedule at ``step`` (0-based): values[step], then the last value for ever."""
    return values[min(step, len(values) - 1)]


@dataclass(frozen=True)
class OnlineDPOConfig:
    """Configuration of online DPO / XPO. Batch semantics: each step draws ``prompts_per_step`` prompts and one
    pair of responses per prompt, so a step adds prompts_per_step pairs."""

    scheme: str = field(default="xpo", metadata={"help": "online-dpo (both ~ pi), pairs (pi, pi_ref; alpha = 0) or xpo (pairs + alpha*log pi(y~))"})
    alpha: Any = field(default=1e-5, metadata={"help": "XPO coefficient, a number or a per-step list (last value kept); 1e-5 is TRL's XPOConfig default; 0 unless scheme=xpo"})
    beta: Any = field(default=0.1, metadata={"help": "KL coefficient, a number or a per-step list; 0.1 as in TRL's XPOConfig and Rafailov et al. 2023"})
    loss_type: str = field(default="sigmoid", metadata={"help": "'sigmoid' (DPO) or 'ipo' (Azar et al. 2023)"})
    regime: str = field(default="streaming", metadata={"help": "'streaming' (one update per fresh batch, TRL) or 'cumulative' (re-fit on all pairs so far, Algorithm 1)"})
    refit_steps: int = field(default=1, metadata={"help": "gradient steps per step on the whole data set in the cumulative regime; must be 1 when streaming"})
    steps: int = field(default=100, metadata={"help": "number of steps (rounds), one fresh batch of pairs each"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step, one pair each"})
    lr: float = field(default=5e-7, metadata={"help": "learning rate; 5e-7 as in TRL's XPO documentation example"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order, sampling and stochastic labels"})

    def __post_init__(self):
        object.__setattr__(self, "alpha", _as_schedule(self.alpha))
        object.__setattr__(self, "beta", _as_schedule(self.beta))
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if any(a < 0 for a in self.alpha):
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.scheme != "xpo" and any(a != 0 for a in self.alpha):
            raise ValueError(f"alpha is XPO's bonus; scheme {self.scheme!r} needs alpha = 0 (got {self.alpha}); use scheme 'xpo'")
        if any(not b > 0 for b in self.beta):
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSSES:
            raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")
        if self.regime not in ("streaming", "cumulative"):
            raise ValueError(f"regime must be 'streaming' or 'cumulative', got {self.regime!r}")
        if self.refit_steps < 1 or (self.regime == "streaming" and self.refit_steps != 1):
            raise ValueError("refit_steps must be >= 1, and 1 in the streaming regime (one update per fresh batch)")
        if self.steps < 0 or self.prompts_per_step < 1:
            raise ValueError("steps must be >= 0 and prompts_per_step >= 1")


@dataclass(frozen=True)
class LabelledPairs:
    """One step's pairs: responses A (always from the policy) and B (from the policy or pi_ref), the oracle's labels
    and the reference log-probs, computed once."""

    a: Rollout  # (B,) y ~ pi_t
    b: Rollout  # (B,) second response: ~ pi_t (online-dpo) or y~ ~ pi_ref
    a_preferred: Tensor  # (B,) 1.0 A preferred, 0.0 B preferred, 0.5 tie
    ref_a: Tensor  # (B,) log pi_ref(A)
    ref_b: Tensor  # (B,) log pi_ref(B)
    b_from_ref: bool  # True when B was drawn from pi_ref (its log-prob carries the XPO bonus)
    rewards_a: Tensor | None = None  # (B,) latent reward r(A) of a Bradley-Terry oracle (target diagnostics); else None
    rewards_b: Tensor | None = None  # (B,) r(B), likewise
    # (B,) log of each pair's importance weight [p(A)/q(A)] [p(B)/q(B)] when a fast sampler q drew A or B (p: the model
    # it stands for, tilt.math.mismatch), computed at collection; None when both were drawn by their models themselves
    log_weight: Tensor | None = None


@torch.no_grad()
def collect_pairs(config: OnlineDPOConfig, policy: Policy, ref: Policy, oracle: PreferenceOracle, prompts: Sequence[Any],
                  prompt_seeds: Sequence[int], label_generator: torch.Generator, *, first_pair: int = 0) -> LabelledPairs:
    """Sample one pair per prompt under the config's scheme and label it.

    ``online-dpo``: one ``policy.sample(prompts, 2)`` call (each prompt pre-filled once), prompt p's two samples
    from ``prompt_seeds[p]``: the first is A, the second B. ``pairs`` / ``xpo``: A from the policy with
    ``prompt_seeds[p]`` and B from pi_ref with a seed derived from it, so that A and B differ even while the
    policy equals the reference. The oracle draws (Bradley-Terry labels, random tie-breaks) from ``label_generator``.

    Under several processes, ``prompts`` are this rank's shard of the step and ``first_pair`` the global position of
    its first prompt: the generator is first advanced by ``first_pair`` float64 uniforms, so that the oracles that draw
    one uniform per pair (``BradleyTerry``, ``RewardComparison``; ``Judge`` draws none) give every pair the label it
    gets in one process."""
    if first_pair:
        torch.rand(first_pair, generator=label_generator, dtype=torch.float64)  # the draws of the ranks before this one
    if config.scheme == "online-dpo":
        both = policy.sample(prompts, 2, prompt_seeds=prompt_seeds)  # (2P,) grouped: rows 2p, 2p + 1 are prompt p's
        a, b = both.take(slice(0, None, 2)), both.take(slice(1, None, 2))  # (P,) each
        ref_both = masked_sum(ref.token_logprobs(both), both.completion_mask)  # (2P,) one pass: larger products than two of P
        ref_a, ref_b = ref_both[0::2], ref_both[1::2]
    else:
        a = policy.sample(prompts, 1, prompt_seeds=prompt_seeds)
        b = ref.sample(prompts, 1, prompt_seeds=[derive_seed(s, "reference") for s in prompt_seeds])
        ref_a = masked_sum(ref.token_logprobs(a), a.completion_mask)
        ref_b = masked_sum(ref.token_logprobs(b), b.completion_mask)
    rewards_a = rewards_b = None
    if isinstance(oracle, BradleyTerry):  # the same labels, with the latent rewards they were drawn from
        labels, rewards_a, rewards_b = oracle.labels_and_rewards(a.prompts, a.completions, b.completions, generator=label_generator)
    else:
        labels = oracle(a.prompts, a.completions, b.completions, generator=label_generator).to(torch.float64)
    if labels.shape != (len(a),):
        raise ValueError(f"the oracle returned shape {tuple(labels.shape)} for {len(a)} pairs; it must return one label per pair")
    log_weight = None
    if a.from_proposal or b.from_proposal:  # pi_t's (and pi_ref's) log-probs now, so stored pairs keep pi_t / q_t
        pi_a = masked_sum(policy.token_logprobs(a), a.completion_mask) if a.from_proposal else a.sample_seq_logprobs
        p_b = (ref_b if config.scheme != "online-dpo" else masked_sum(policy.token_logprobs(b), b.completion_mask)) if b.from_proposal else b.sample_seq_logprobs
        log_weight = mismatch.log_ratio(pi_a, a.sample_seq_logprobs) + mismatch.log_ratio(p_b, b.sample_seq_logprobs)  # (B,)
    return LabelledPairs(a, b, labels, ref_a, ref_b, b_from_ref=config.scheme != "online-dpo", rewards_a=rewards_a, rewards_b=rewards_b,
                         log_weight=log_weight)


def pair_losses(config: OnlineDPOConfig, policy: Policy, pairs: LabelledPairs, *, alpha: float, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """(B,) per-pair loss = [DPO or IPO term, 0 on ties] + alpha * log pi(y~) where B is the reference sample."""
    lp_a = masked_sum(policy.token_logprobs(pairs.a), pairs.a.completion_mask)  # (B,) with grad
    lp_b = masked_sum(policy.token_logprobs(pairs.b), pairs.b.completion_mask)
    a_wins = pairs.a_preferred > TIE
    decided = pairs.a_preferred != TIE
    chosen, rejected = torch.where(a_wins, lp_a, lp_b), torch.where(a_wins, lp_b, lp_a)
    ref_chosen, ref_rejected = torch.where(a_wins, pairs.ref_a, pairs.ref_b), torch.where(a_wins, pairs.ref_b, pairs.ref_a)
    preference = torch.where(decided, LOSSES[config.loss_type](chosen, rejected, ref_chosen, ref_rejected, beta=beta), 0.0)
    bonus = xpo_bonus(lp_b, alpha=alpha) if pairs.b_from_ref else torch.zeros_like(preference)
    if pairs.log_weight is not None:  # E_q[w loss] = E_p[loss]: weights truncated at the cap KL-RL uses by default
        weight = mismatch.truncated_weights(pairs.log_weight, cap=mismatch.DEFAULT_CAP).to(preference.dtype)
        preference, bonus = weight * preference, weight * bonus
    with torch.no_grad():
        parts = {
            "preference_loss": preference.detach(),
            "bonus": bonus.detach(),
            "ref_sample_logprob": lp_b.detach() if pairs.b_from_ref else torch.full_like(lp_b, float("nan")),
            "chosen_reward": implicit_reward(chosen, ref_chosen, beta=beta),
            "rejected_reward": implicit_reward(rejected, ref_rejected, beta=beta),
            "decided": decided.to(torch.float64),
        }
        # TRL's keys, over the decided pairs only (NaN on ties, which nansum skips)
        nan = torch.full_like(parts["chosen_reward"], float("nan"))
        trl = {"rewards/chosen": parts["chosen_reward"], "rewards/rejected": parts["rejected_reward"],
               "rewards/margins": parts["chosen_reward"] - parts["rejected_reward"],
               "rewards/accuracies": (parts["chosen_reward"] > parts["rejected_reward"]).to(nan.dtype),
               "logps/chosen": chosen.detach().to(nan.dtype), "logps/rejected": rejected.detach().to(nan.dtype)}
        parts.update({key: torch.where(decided, value, nan) for key, value in trl.items()})
    return preference + bonus, parts


def refit(config: OnlineDPOConfig, policy: Policy, data: Sequence[LabelledPairs], optimizer: torch.optim.Optimizer, *, alpha: float,
          beta: float) -> tuple[dict[str, float], Tensor]:
    """One gradient step on the mean per-pair loss over ``data`` (each stored batch is one micro-batch).

    Returns the metrics and (B,) log pi(y~) of the last batch's reference samples (the fresh pairs, in both regimes),
    detached, as the loss computed it before this gradient step (NaN under ``online-dpo``): the target diagnostics'."""
    n = distributed.all_sum_int(sum(len(p.a) for p in data))  # pairs in the objective, over all ranks
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    for i, pairs in enumerate(data):
        per_pair, parts = pair_losses(config, policy, pairs, alpha=alpha, beta=beta)
        loss = per_pair.sum() / n  # the one reduction: mean over all pairs in the objective (of all ranks)
        with distributed.accumulate(policy, sync=i == len(data) - 1):
            loss.backward()
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value.nansum().item()
    distributed.reduce_gradients(policy, params)  # sum over ranks; nothing in one process
    grad_norm = distributed.as_float(grad_norm_and_clip(params, config.max_grad_norm))
    optimizer.step()
    sums = dict(zip(sums, distributed.all_sum(list(sums.values()))))
    decided = max(sums["decided"], 1.0)
    return {
        "loss": sums["loss"],
        "preference_loss": sums["preference_loss"] / decided,
        "bonus": sums["bonus"] / n,
        "reward_margin": (sums["chosen_reward"] - sums["rejected_reward"]) / n,
        **{key: sums[key] / decided for key in sums if "/" in key},
        "grad_norm": float(grad_norm),
        "learning_rate": learning_rate(optimizer),
    }, parts["ref_sample_logprob"]


def kl_ref_estimate(pairs: LabelledPairs) -> float:
    """Mean log pi(y) - log pi_ref(y) over the fresh policy samples A (a k1 estimate of KL(pi || pi_ref) before the
    update); NaN when the policy sampled with a modified distribution (temperature, top-k/p), whose log-probs differ."""
    if not pairs.a.of_the_model:
        return float("nan")
    (k1,) = distributed.all_gather_cat(masked_sum(pairs.a.sample_token_logprobs, pairs.a.completion_mask) - pairs.ref_a)
    return k1.mean().item()  # over every rank's pairs


def target_diagnostics(pairs: LabelledPairs, *, scale: float, beta: float, ref_sample_logprob: Tensor | None = None) -> dict[str, float]:
    """``target_*`` estimates (``tilt.math.importance.diagnostics``) of pi_t against pi* ∝ pi_ref exp(scale * r / beta),
    from each prompt's two responses, grouped (P, 2): log P = log pi_ref + scale * r / beta, policy log-prob log pi_t.

    Proposal log q: ``online-dpo``, log pi_t (both responses ~ pi_t). B from pi_ref (``pairs``/``xpo``): the balance
    heuristic's mixture, log q = logaddexp(log pi_t, log pi_ref) - log 2, for A and B alike, with log pi_t(B) given
    as ``ref_sample_logprob`` (P,) (the loss's, before the update). The two responses are a stratified draw from q
    (one from each component), not two i.i.d. ones: every per-sample mean stays unbiased for its expectation under q
    (so Z-hat for Z) and the self-normalised ratios keep their usual O(1/K) bias; the standard errors are the i.i.d.
    ones, which on average over-state the variance of a stratified mean (they also count the components' spread).
    Empty when the target or the samples do not allow it (module docstring): no latent rewards, or samples not from
    their sampler's model itself."""
    if pairs.rewards_a is None or not (pairs.a.of_the_model and pairs.b.of_the_model):
        return {}
    log_pi_a = masked_sum(pairs.a.sample_token_logprobs, pairs.a.completion_mask)  # (P,) drawn by pi_t
    if pairs.b_from_ref:
        if ref_sample_logprob is None or ref_sample_logprob.shape != pairs.ref_b.shape:
            raise ValueError(f"B is from pi_ref: ref_sample_logprob must be log pi_t(B), shape {tuple(pairs.ref_b.shape)}; "
                             f"got {None if ref_sample_logprob is None else tuple(ref_sample_logprob.shape)}")
        log_pi_b = ref_sample_logprob.detach()
    else:
        log_pi_b = masked_sum(pairs.b.sample_token_logprobs, pairs.b.completion_mask)
    log_pi = torch.stack([log_pi_a, log_pi_b], -1).double()  # (P, 2)
    ref = torch.stack([pairs.ref_a, pairs.ref_b], -1).double()  # (P, 2)
    rewards = torch.stack([pairs.rewards_a, pairs.rewards_b], -1).to(ref)  # (P, 2)
    log_q = torch.logaddexp(log_pi, ref) - math.log(2) if pairs.b_from_ref else log_pi  # (P, 2)
    log_pi, ref, rewards, log_q = distributed.all_gather_cat(log_pi, ref, rewards, log_q)  # every rank's prompts
    return importance.target_metrics(ref + scale * rewards / beta, log_q, log_pi)


def num_steps(config: OnlineDPOConfig) -> int:
    """How many optimisation steps ``train`` takes: ``config.steps``."""
    return config.steps


def train(
    config: OnlineDPOConfig,
    policy: Policy,
    ref: Policy,
    oracle: PreferenceOracle,
    prompts: Sequence[Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    stored: list[LabelledPairs] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.optim.Optimizer:
    """Run ``config.steps`` steps of online DPO / XPO on ``policy`` against ``ref``, labelling with ``oracle``.

    ``ref`` may be any policy with the same vocabulary. ``on_step(step, metrics)`` gets the metrics of
    docs/xpo.md after each step. Returns the optimizer.

    ``stored`` is the cumulative regime's data set (unused when streaming): the recipe appends each step's pairs to
    this list (pass one to save it in a checkpoint from ``on_step``). ``start_step`` resumes a run: steps before it
    are skipped (prompts, samples and labels are pure functions of the step); the policy and ``optimizer`` must hold
    their state after ``start_step`` steps and, in the cumulative regime, ``stored`` the pairs of those steps.

    Under several processes (``tilt.distributed.init``), every rank passes the same config and prompts; rank r
    samples, labels and trains on the r-th contiguous shard of each step's ``prompts_per_step`` prompts (which must
    divide evenly), with the labels it would get in one process; in the cumulative regime ``stored`` holds this
    rank's pairs only, so a checkpoint must keep each rank's.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to train on")
    stored = [] if stored is None else stored
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if config.regime == "cumulative" and len(stored) != min(start_step, config.steps):
        raise ValueError(f"the cumulative regime resumed at step {start_step} needs the pairs of its {start_step} earlier steps "
                         f"in stored (one entry per step); got {len(stored)}")
    if config.regime == "streaming" and stored:
        raise ValueError("the streaming regime stores no pairs; pass stored=None (or an empty list)")
    optimizer = optimizer or build_optimizer(config.optimizer, policy.parameters(), config.lr)
    distributed.check_same_config({"recipe": "online_dpo", **asdict(config), "prompts": distributed.config_hash(list(prompts))})
    positions = distributed.shard_positions(config.prompts_per_step)  # range(prompts_per_step) in one process
    watch = ConstantRewardWatch()
    for step in range(start_step, config.steps):
        alpha, beta = scheduled(config.alpha, step), scheduled(config.beta, step)
        step_prompts = prompt_indices(len(prompts), step, config.prompts_per_step, config.seed)  # global, all ranks
        batch = [prompts[step_prompts[p]] for p in positions]
        seeds = step_prompt_seeds(config.seed, step, positions)  # by global position: independent of batch and ranks
        pairs = collect_pairs(config, policy, ref, oracle, batch, seeds, step_generator(config.seed, step, "labels"),
                              first_pair=positions.start)
        if config.regime == "cumulative":
            stored.append(pairs)
            data = stored
        else:
            data = [pairs]
        for i in range(config.refit_steps):
            metrics, ref_sample_logprob = refit(config, policy, data, optimizer, alpha=alpha, beta=beta)
            if i == 0:
                fresh_ref_sample_logprob = ref_sample_logprob  # (P,) log pi_t(y~) before the step's update
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {metrics['loss']}; lower the learning rate")
        (labels,) = distributed.all_gather_cat(pairs.a_preferred)  # (P,) every rank's
        metrics.update(
            alpha=alpha,
            beta=beta,
            pairs=float(distributed.all_sum_int(sum(len(p.a) for p in data))),
            policy_sample_win_rate=labels.mean().item(),
            tie_fraction=(labels == TIE).to(torch.float64).mean().item(),
            kl_ref=kl_ref_estimate(pairs),
            **(mismatch.mismatch_metrics(distributed.all_gather_cat(pairs.log_weight)[0].view(1, -1), cap=mismatch.DEFAULT_CAP)
               if pairs.log_weight is not None else {}),
        )
        # no learning signal in a pair: equal latent rewards (Bradley-Terry), else a tie of the oracle
        no_signal = distributed.all_gather_cat(pairs.rewards_a == pairs.rewards_b)[0] if pairs.rewards_a is not None else (labels == TIE)
        metrics["frac_reward_zero_std"] = no_signal.to(torch.float64).mean().item()
        watch.update(step, metrics["frac_reward_zero_std"], what="oracle's reward")
        if isinstance(oracle, BradleyTerry):
            metrics.update(target_diagnostics(pairs, scale=oracle.scale, beta=beta, ref_sample_logprob=fresh_ref_sample_logprob))
        if on_step is not None:
            on_step(step, metrics)
    return optimizer


# --- the stored pairs in a checkpoint: JSON and named tensors, no pickle -----------------------------------------
ROLLOUT_TENSORS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated", "sample_token_logprobs")
PAIR_TENSORS = ("a_preferred", "ref_a", "ref_b")
OPTIONAL_PAIR_TENSORS = ("log_weight", "rewards_a", "rewards_b")
"""Saved when the pair has them (None otherwise): the importance weight of a proposal's samples, the latent rewards."""


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _from_json(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # JSON has no tuples: a sequence comes back as one


def stored_pairs_state(stored: Sequence[LabelledPairs]) -> tuple[list[dict], dict[str, Tensor]]:
    """The cumulative regime's pairs as (JSON rows, named CPU tensors), one row per step, for a checkpoint
    (tensors to safetensors). Prompts and completions must be JSON values (texts; tuples come back as tuples)."""
    rows: list[dict] = []
    tensors: dict[str, Tensor] = {}
    for i, pairs in enumerate(stored):
        row: dict[str, Any] = {"b_from_ref": pairs.b_from_ref}
        for side in ("a", "b"):
            rollout: Rollout = getattr(pairs, side)
            row[side] = {"prompts": [_json_value(p) for p in rollout.prompts],
                         "completions": [_json_value(c) for c in rollout.completions],
                         "samples_per_prompt": rollout.samples_per_prompt, "sampled_from_policy": rollout.sampled_from_policy,
                         "sampler": rollout.sampler}  # which proposal drew it: pi/q weighting depends on it
            for name in ROLLOUT_TENSORS:
                tensors[f"{i}.{side}.{name}"] = getattr(rollout, name).detach().cpu().contiguous()
        for name in PAIR_TENSORS:
            tensors[f"{i}.{name}"] = getattr(pairs, name).detach().cpu().contiguous()
        for name in OPTIONAL_PAIR_TENSORS:  # saved when present: a pair drawn by a proposal keeps its pi/q weight
            if getattr(pairs, name) is not None:
                tensors[f"{i}.{name}"] = getattr(pairs, name).detach().cpu().contiguous()
        rows.append(row)
    return rows, tensors


def restore_stored_pairs(rows: Sequence[dict], tensors: dict[str, Tensor], device: torch.device | str = "cpu") -> list[LabelledPairs]:
    """The pairs ``stored_pairs_state`` saved, bit for bit, their tensors on ``device`` (the policy's)."""
    out = []
    for i, row in enumerate(rows):
        try:
            sides = {}
            for side in ("a", "b"):
                meta = row[side]
                sides[side] = Rollout(prompts=[_from_json(p) for p in meta["prompts"]],
                                      completions=[_from_json(c) for c in meta["completions"]],
                                      **{name: tensors[f"{i}.{side}.{name}"].to(device) for name in ROLLOUT_TENSORS},
                                      samples_per_prompt=meta["samples_per_prompt"], sampled_from_policy=meta["sampled_from_policy"],
                                      sampler=meta.get("sampler", "exact"))  # checkpoints before the key held exact samples only
            optional = {name: tensors[f"{i}.{name}"].to(device) for name in OPTIONAL_PAIR_TENSORS if f"{i}.{name}" in tensors}
            out.append(LabelledPairs(**sides, **{name: tensors[f"{i}.{name}"].to(device) for name in PAIR_TENSORS}, **optional,
                                     b_from_ref=row["b_from_ref"]))
        except KeyError as exc:
            raise ValueError(f"the stored pairs of step {i} lack {exc}: the checkpoint is incomplete or from another version") from None
    return out


def config_dict(config: OnlineDPOConfig) -> dict:
    return asdict(config)
