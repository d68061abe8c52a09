"""Evaluating a policy pi against a reference pi_ref on held-out prompts: mean reward, KL(pi || pi_ref), and win
rates (standard, and best-of-N / worst-of-N at inference time), each with a percentile bootstrap interval.

What is estimated, from K samples of each prompt from pi and K from pi_ref (P prompts):

* ``reward_mean``: E_x E_{y~pi}[r(x, y)], the mean over all P*K samples (likewise ``ref_reward_mean`` under pi_ref);
* ``kl_ref``: KL(pi || pi_ref) = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)], by k1, the sequence log-ratio summed over
  the completion tokens (unbiased; digest §1.2). ``kl_ref_k3`` applies Schulman's k3 = (rho - 1) - log rho,
  rho = pi_ref(y)/pi(y), to the same sequence log-ratio: also unbiased, never negative, but heavy-tailed when some
  sample is much less likely under pi_ref than under pi; read both;
* ``win_rate``: W_r(pi > pi_ref) = E[1{r(y) > r(z)} + 1/2 1{r(y) = r(z)}], y ~ pi, z ~ pi_ref (digest §5(a); the
  tie convention is [R]), over all K x K pairs of each prompt (``tilt.math.infalign.pairwise_win_rate``);
* with ``best_of = N``: ``win_rate_bon``, BoN_N(pi) against BoN_N(pi_ref), and ``win_rate_won``, WoN_N(pi) against
  WoN_N(pi_ref) (InfAlign's inference-time win rates, digest §5(a)): the K samples of each prompt form K/N groups of
  N, and each group's best (worst) reward is one draw of the procedure;
* with ``beta = B``: ``target_*``, how far pi is from the tilted target pi* ∝ pi_ref exp(r/B) (digest §1.1), by
  importance sampling on the same K samples of pi (``tilt.math.importance.diagnostics`` with q = pi, the keys and
  meanings the KL-RL recipe logs): log Z, KL(pi* || pi), KL(pi || pi*), TV, JS, each with a 95% delta-method
  interval (``_stderr``, ``_lower``, ``_upper``), and the Kish ESS of the weights pi*/pi (``ess``, ``ess_fraction``).
  Any model, however it was trained, is compared with the same target.

Intervals (all but the ``target_*`` ones, which are importance sampling's own): the one two-level percentile
bootstrap, ``tilt.math.bootstrap.two_level_bootstrap`` (``bootstrap_mean`` for means, ``tilt.math.infalign.
bootstrap_win_rate`` for win rates): each resample draws the prompts with replacement and, within each drawn
prompt, that prompt's samples with replacement. It is valid with one prompt and with one sample per prompt, and counts the
prompts as a sample from a population; it is conservative (within-prompt noise enters twice) when there are many
prompts. As the number of samples per prompt grows, the intervals shrink to the spread between prompts.

The functions at the top are pure tensor math; ``evaluate`` samples and scores on any ``Policy``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from tilt.math import importance
from tilt.math.bootstrap import bootstrap_mean  # the one two-level bootstrap (also imported from here by callers)
from tilt.math.infalign import best_of_n_values, bootstrap_win_rate, worst_of_n_values
from tilt.math.kl import full_token_kl, k1, k3
from tilt.math.masking import masked_sum, picked_token_logprobs
from tilt.recipes.common import derive_seed
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy


# --- pure math -----------------------------------------------------------------------------------------------------
def sequence_kl_terms(seq_log_ratio: Tensor) -> dict[str, Tensor]:
    """Per-sample KL(pi || pi_ref) estimates from the sequence log-ratio log pi(y) - log pi_ref(y), y ~ pi:
    {"k1": log-ratio, "k3": (rho - 1) - log rho}, each the shape of the input (tilt.math.kl; Schulman 2020)."""
    return {"k1": k1(seq_log_ratio), "k3": k3(seq_log_ratio)}


def target_diagnostics(rewards: Tensor, seq_log_ratio: Tensor, *, beta: float) -> dict[str, float]:
    """Importance-sampled diagnostics of pi against pi* ∝ pi_ref exp(r/beta) from K samples y ~ pi of each of P
    prompts, keyed ``target_<name>`` for every key of ``tilt.math.importance.diagnostics`` (log Z, KL(pi* || pi),
    KL(pi || pi*), TV, JS with 95% intervals, ESS), as the KL-RL recipe logs them.

    The recipe calls diagnostics(log P, log q, log pi) with log P = log pi_ref + r/beta and q = pi. Every estimate
    there depends on its inputs only through log P - log q and log pi - log q, so the same numbers come from
    log P - log pi = r/beta - (log pi - log pi_ref) and log q = log pi = 0: the sequence log-ratio is all it needs.
    rewards, seq_log_ratio: (P, K), K >= 2, seq_log_ratio = log pi(y) - log pi_ref(y) on y ~ pi.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 for the target pi* ∝ pi_ref exp(r/beta), got {beta}")
    if rewards.shape != seq_log_ratio.shape or rewards.dim() != 2:
        raise ValueError(f"rewards and seq_log_ratio must both be (P, K); got {tuple(rewards.shape)} and {tuple(seq_log_ratio.shape)}")
    log_w = rewards.double() / beta - seq_log_ratio.double()  # (P, K) log pi*(y)/pi(y) + log Z
    zero = torch.zeros_like(log_w)
    return importance.target_metrics(log_w, zero, zero)


# --- sampling and scoring on a Policy ------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    """How an evaluation samples and how its intervals are computed."""

    samples_per_prompt: int = field(default=16, metadata={
        "help": "K completions of each prompt from the policy, and K from the reference; 16 for a quick first read"})
    best_of: int = field(default=0, metadata={"help": "N of the best-of-N / worst-of-N win rates (K/N groups per prompt); 0 = off"})
    num_resamples: int = field(default=1000, metadata={
        "help": "bootstrap resamples behind each interval; 1000 as in tilt.math.infalign.bootstrap_win_rate, the order "
                "Efron & Tibshirani (1993) recommend for percentile intervals"})
    level: float = field(default=0.95, metadata={"help": "coverage of the intervals"})
    batch_size: int = field(default=64, metadata={"help": "sequences per sampling call (memory bound)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and of the bootstrap"})
    beta: float | None = field(default=None, metadata={
        "help": "also estimate how far the policy is from pi* ∝ pi_ref exp(r/beta) (the target_* metrics); None = off"})

    def __post_init__(self):
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be > 0 (the target is pi_ref exp(r/beta)), or None to skip the target diagnostics; got {self.beta}")
        if self.beta is not None and self.samples_per_prompt < 2:
            raise ValueError("the target diagnostics (beta) estimate each prompt's log Z from its samples: they need "
                             f"samples_per_prompt >= 2, got {self.samples_per_prompt}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.best_of < 0:
            raise ValueError(f"best_of must be >= 0 (0 = off), got {self.best_of}")
        if self.best_of and self.samples_per_prompt % self.best_of:
            raise ValueError(f"best-of-{self.best_of} win rates split the {self.samples_per_prompt} samples of each prompt into "
                             f"groups of {self.best_of}: make the number of samples a multiple of {self.best_of}")
        if self.num_resamples < 10:
            raise ValueError(f"num_resamples must be >= 10, got {self.num_resamples}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Draws:
    """K scored samples of each of P prompts from one policy."""

    completions: list  # (P, K) nested lists
    rewards: Tensor  # (P, K) float64
    seq_log_ratio: Tensor | None  # (P, K) float64 log pi(y) - log pi_ref(y), for samples of pi; None for pi_ref's
    lengths: Tensor  # (P, K) counted completion tokens
    truncated: Tensor  # (P, K) bool, no EOS before the length limit
    seq_kl_full: Tensor | None = None  # (P, K) float64 sum_t KL(pi(.|y_<t) || pi_ref(.|y_<t)) over the vocabulary (full_kl)


@dataclass(frozen=True)
class Evaluation:
    metrics: dict  # see the module docstring and docs/eval_and_sample.md
    policy: Draws
    ref: Draws
    prompts: list  # (P,)


@torch.no_grad()
def draw_scored(policy: Policy, prompts: Sequence[Any], k: int, reward_fn: RewardFn, *, generator: torch.Generator,
                batch_size: int = 64, ref: Policy | None = None, columns: Mapping[str, Sequence] | None = None,
                progress: Callable[[int], None] | None = None, full_kl: bool = False) -> Draws:
    """k samples of each prompt from ``policy``, scored with ``reward_fn`` (``columns``: the data's other columns,
    one value per prompt, passed to the reward once per sample). With ``ref``, also the sequence log-ratio
    log policy(y) - log ref(y) of each sample (both scored by a forward pass, so that a model against itself gives 0
    exactly). At most ``batch_size`` sequences per sampling call; ``progress(n)`` is called with each batch's size.
    With ``full_kl`` (and ``ref``), also each sample's sum over positions of the next-token KL over the whole
    vocabulary (``tilt.math.kl.full_token_kl``): the same expectation as the log-ratio, with far less spread; the
    same two forward passes, each keeping a (B, T, V) log-softmax."""
    p = len(prompts)
    per_call = min(k, batch_size)  # samples of one prompt per call
    prompts_per_call = max(1, batch_size // per_call)
    completions: list[list] = [[] for _ in range(p)]
    rewards = torch.empty(p, k, dtype=torch.float64)
    log_ratio = torch.zeros(p, k, dtype=torch.float64) if ref is not None else None
    kl_full = torch.zeros(p, k, dtype=torch.float64) if ref is not None and full_kl else None
    lengths = torch.empty(p, k, dtype=torch.long)
    truncated = torch.empty(p, k, dtype=torch.bool)
    for start in range(0, p, prompts_per_call):
        chunk = list(prompts[start:start + prompts_per_call])
        rows = range(start, start + len(chunk))
        for s0 in range(0, k, per_call):
            m = min(per_call, k - s0)
            rollout = policy.sample(chunk, m, generator=generator, exact=True)
            if not rollout.of_the_model:
                raise ValueError("evaluation needs samples of the policy itself: sample at temperature 1 without top-k/top-p "
                                 "(a tempered or truncated sampler is another distribution, and the KL would not be the policy's)")
            cols = {name: [values[i] for i in rows for _ in range(m)] for name, values in (columns or {}).items()}
            r = score_rewards(reward_fn, rollout.prompts, rollout.completions, **cols).view(len(chunk), m)
            rewards[start:start + len(chunk), s0:s0 + m] = r
            mask = rollout.completion_mask
            lengths[start:start + len(chunk), s0:s0 + m] = mask.sum(-1).view(len(chunk), m).cpu()
            truncated[start:start + len(chunk), s0:s0 + m] = rollout.truncated.view(len(chunk), m).cpu()
            if ref is not None and ref is not policy:
                if full_kl:
                    pi_full, ref_full = policy.token_log_softmax(rollout), ref.token_log_softmax(rollout)  # (B, T, V)
                    ids = rollout.completion_ids
                    pi_tok, ref_tok = picked_token_logprobs(pi_full, ids, mask), picked_token_logprobs(ref_full, ids, mask)
                    kl_full[start:start + len(chunk), s0:s0 + m] = full_token_kl(pi_full, ref_full, mask).double().view(len(chunk), m).cpu()
                    del pi_full, ref_full
                else:
                    pi_tok, ref_tok = policy.token_logprobs(rollout), ref.token_logprobs(rollout)  # (B, T)
                lr = masked_sum(pi_tok - ref_tok, mask)  # (B,)
                log_ratio[start:start + len(chunk), s0:s0 + m] = lr.double().view(len(chunk), m).cpu()
            for j, i in enumerate(rows):
                completions[i].extend(rollout.completions[j * m:(j + 1) * m])
            if progress is not None:
                progress(len(rollout))
    return Draws(completions, rewards, log_ratio, lengths, truncated, kl_full)


def evaluate(config: EvalConfig, policy: Policy, ref: Policy, reward_fn: RewardFn, prompts: Sequence[Any], *,
             columns: Mapping[str, Sequence] | None = None, progress: Callable[[int], None] | None = None) -> Evaluation:
    """Sample K = ``config.samples_per_prompt`` completions of every prompt from ``policy`` and from ``ref``, and
    estimate reward, KL(policy || ref) and win rates with intervals (module docstring), and with ``config.beta`` the
    ``target_*`` diagnostics against pi* ∝ ref exp(reward/beta) from the same samples. Draws 2 * P * K samples.
    Passing the same object as ``policy`` and ``ref`` evaluates a model against itself (KL exactly 0)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    for name, values in (columns or {}).items():
        if len(values) != len(prompts):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(prompts)} prompts")
    k = config.samples_per_prompt
    g_pi = torch.Generator().manual_seed(derive_seed(config.seed, "eval", "policy"))
    g_ref = torch.Generator().manual_seed(derive_seed(config.seed, "eval", "ref"))
    g_boot = torch.Generator().manual_seed(derive_seed(config.seed, "eval", "bootstrap"))
    pi = draw_scored(policy, prompts, k, reward_fn, generator=g_pi, batch_size=config.batch_size, ref=ref, columns=columns, progress=progress)
    rf = draw_scored(ref, prompts, k, reward_fn, generator=g_ref, batch_size=config.batch_size, columns=columns, progress=progress)

    boot = dict(generator=g_boot, num_resamples=config.num_resamples, level=config.level)
    m: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": k, "level": config.level}

    def put(name: str, triple: tuple[float, float, float]) -> None:
        m[name], low, high = triple
        m[f"{name}_ci"] = [low, high]

    put("reward_mean", bootstrap_mean(pi.rewards, **boot))
    put("ref_reward_mean", bootstrap_mean(rf.rewards, **boot))
    kl_terms = sequence_kl_terms(pi.seq_log_ratio)
    put("kl_ref", bootstrap_mean(kl_terms["k1"], **boot))
    put("kl_ref_k3", bootstrap_mean(kl_terms["k3"], **boot))
    put("win_rate", bootstrap_win_rate(pi.rewards, rf.rewards, **boot))
    if config.best_of:
        n = config.best_of
        m["best_of"] = n
        put("win_rate_bon", bootstrap_win_rate(best_of_n_values(pi.rewards, n), best_of_n_values(rf.rewards, n), **boot))
        put("win_rate_won", bootstrap_win_rate(worst_of_n_values(pi.rewards, n), worst_of_n_values(rf.rewards, n), **boot))
    if config.beta is not None:
        m["beta"] = config.beta
        m.update(target_diagnostics(pi.rewards, pi.seq_log_ratio, beta=config.beta))
    m["completion_length"] = pi.lengths.double().mean().item()
    m["ref_completion_length"] = rf.lengths.double().mean().item()
    m["truncated_fraction"] = pi.truncated.double().mean().item()
    m["ref_truncated_fraction"] = rf.truncated.double().mean().item()
    return Evaluation(metrics=m, policy=pi, ref=rf, prompts=prompts)
