"""The lab's experiment drivers: train or sample in a small enumerable world and report against the exact target.

``run_kl_rl_lab`` (KL-regularised RL), ``run_dpg_lab`` (distribution matching), ``run_qrs_lab`` (quasi-rejection
sampling) and ``run_gdc_lab`` (moment constraints) each return a plain dict; ``tilt lab`` prints them.
"""
from __future__ import annotations

import time

import torch
from scipy.optimize import brentq
from tqdm import tqdm

from tilt.gdc import fit_coefficients, fit_target, pointwise_target
from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import TableReward, exact_report, reward_table
from tilt.math import exact, importance
from tilt.posterior import qrs_estimates, qrs_exact, quasi_rejection_sample
from tilt.recipes import dpg, kl_rl
from tilt.recipes.common import derive_seed
from tilt.target import TiltedTarget

LAB_LR = 0.05
"""Adam on the logits with lr 0.05 decayed linearly to 0: a sweep over V in {2,3,4}, L in {3,4,8}, beta in
{0.05 .. 1} and random rewards reached KL(pi*||pi) < 1e-3 in 3000 steps of batch 64 in every case (see
docs/kl_rl.md). The digest's SGD at lr 0.5 (§2(e) E1.2) does not at beta 0.1 or with 256 sequences."""


EVAL_SAMPLES = 1024
"""Fresh policy samples per context behind the importance-sampled estimates printed after training."""


def lab_threads() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def run_kl_rl_lab(
    *,
    vocab: int = 3,
    length: int = 3,
    contexts: int = 1,
    reward: str = "count:2",
    reward_seed: int = 0,
    beta: float = 0.3,
    seed: int = 0,
    steps: int = 3000,
    batch: int = 64,
    lr: float = LAB_LR,
    optimizer: str = "adamw",
    lr_schedule: str = "linear",
    ppo_epochs: int = 1,
    kl_penalty: str = "reward",
    kl_estimator: str = "k1",
    pure: bool = False,
    progress: bool = False,
) -> dict:
    """Train a tabular policy from the reference with ``kl_rl.train`` and report exact quantities."""
    if batch % contexts:
        raise ValueError(f"--batch {batch} must be a multiple of --contexts {contexts}")
    ref = random_tabular_policy(vocab, length, contexts, seed=seed)
    policy = ref.copy()
    rewards = reward_table(reward, vocab, length, contexts, reward_seed=reward_seed)
    config = kl_rl.KLRLConfig(
        beta=0.0 if pure else beta,
        steps=steps,
        prompts_per_step=contexts,
        samples_per_prompt=batch // contexts,
        lr=lr,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        ppo_epochs=ppo_epochs,
        kl_penalty=kl_penalty,
        kl_estimator=kl_estimator,
        seed=seed,
    )
    bar = tqdm(total=steps, desc="lab kl-rl", unit="step", disable=not progress)
    start = time.perf_counter()
    kl_rl.train(config, policy, ref, TableReward(rewards, vocab, length), list(range(contexts)), on_step=lambda s, m: bar.update())
    bar.close()
    report = exact_report(policy, ref, rewards, beta if beta > 0 else 0.0)
    if pure:
        argmax_mass = (policy.support_logprobs().exp() * (rewards == rewards.amax(-1, keepdim=True))).sum(-1).mean()
        report["argmax_mass"] = argmax_mass.item()
    report.update(steps=steps, seconds=round(time.perf_counter() - start, 3), support=vocab**length, beta=beta, trained_beta=config.beta)
    return report


def lab_target(ref: TabularPolicy, rewards: torch.Tensor, beta: float, evidence: str) -> TiltedTarget:
    """pi_ref exp(r/beta) (``evidence="tilt"``) or pi_ref * r for a 0/1 reward (``evidence="filter"``)."""
    reward = TableReward(rewards, ref.vocab, ref.length)
    if evidence == "filter":
        return pointwise_target(ref, reward)
    if evidence != "tilt":
        raise ValueError(f"evidence must be 'tilt' or 'filter', got {evidence!r}")
    return TiltedTarget(ref=ref, reward=reward, beta=beta)


@torch.no_grad()
def target_report(policy: TabularPolicy, ref: TabularPolicy, rewards: torch.Tensor, beta: float, target: TiltedTarget) -> dict:
    """``tilt.lab.world.exact_report``, with every quantity about the target taken from ``target`` (so a filtered
    posterior is reported against itself, not against pi_ref exp(r/beta))."""
    report = exact_report(policy, ref, rewards, beta)
    ex = target.exact(ref.enumerate())
    logp = policy.support_logprobs()
    report.update(
        kl_target_policy=exact.kl(ex.log_probs, logp).item(),
        kl_policy_target=exact.kl(logp, ex.log_probs).item(),
        target_entropy=exact.entropy(ex.log_probs).item(),
        target_expected_reward=exact.expectation(ex.log_probs, rewards).item(),
        log_z=ex.log_z.mean().item(),
    )
    return report


@torch.no_grad()
def sampled_diagnostics(policy: TabularPolicy, target: TiltedTarget, n: int, seed: int) -> dict:
    """Importance-sampled estimates (``tilt.math.importance.target_metrics``, keyed ``target_*``) from n fresh samples
    of the policy per context."""
    g = torch.Generator().manual_seed(derive_seed(seed, "eval"))
    rollout = policy.sample(list(range(policy.contexts)), n, generator=g)
    log_pi = rollout.sample_seq_logprobs.view(policy.contexts, n)
    log_p = target.log_weight(rollout).view(policy.contexts, n)
    return importance.target_metrics(log_p, log_pi, log_pi)


def run_dpg_lab(
    *,
    vocab: int = 3,
    length: int = 3,
    contexts: int = 1,
    reward: str = "count:2",
    reward_seed: int = 0,
    beta: float = 0.3,
    seed: int = 0,
    steps: int = 3000,
    batch: int = 64,
    lr: float = LAB_LR,
    optimizer: str = "adamw",
    lr_schedule: str = "linear",
    mode: str = "on-policy",
    divergence: str = "forward-kl",
    evidence: str = "tilt",
    baseline: str = "loo",
    eval_samples: int = EVAL_SAMPLES,
    progress: bool = False,
) -> dict:
    """Train a tabular policy from the reference with ``dpg.train``; report exact quantities (the keys of
    ``tilt lab kl-rl``) and importance-sampled estimates of the same divergences (``target_*``)."""
    if batch % contexts:
        raise ValueError(f"--batch {batch} must be a multiple of --contexts {contexts}")
    ref = random_tabular_policy(vocab, length, contexts, seed=seed)
    policy = ref.copy()
    rewards = reward_table(reward, vocab, length, contexts, reward_seed=reward_seed)
    target = lab_target(ref, rewards, beta, evidence)
    config = dpg.DPGConfig(
        mode=mode,
        divergence=divergence,
        baseline=baseline,
        steps=steps,
        prompts_per_step=contexts,
        samples_per_prompt=batch // contexts,
        lr=lr,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        diagnostics_interval=0,
        seed=seed,
    )
    bar = tqdm(total=steps, desc=f"lab dpg ({mode}, {divergence})", unit="step", disable=not progress)
    start = time.perf_counter()
    _, state = dpg.train(config, policy, target, list(range(contexts)), on_step=lambda s, m: bar.update())
    bar.close()
    seconds = time.perf_counter() - start
    report = target_report(policy, ref, rewards, beta, target)
    report.update(sampled_diagnostics(policy, target, eval_samples, seed))
    report.update(
        steps=steps,
        seconds=round(seconds, 3),
        support=vocab**length,
        beta=beta,
        trained_beta=beta if evidence == "tilt" else None,
        mode=mode,
        divergence=divergence,
        evidence=evidence,
        proposal_updates=state.proposal_updates,
    )
    return report


def run_qrs_lab(
    *,
    vocab: int = 3,
    length: int = 3,
    contexts: int = 1,
    reward: str = "count:2",
    reward_seed: int = 0,
    beta: float = 0.3,
    seed: int = 0,
    qrs_beta: float = 1.0,
    samples: int = 20000,
    evidence: str = "tilt",
) -> dict:
    """QRS with proposal pi_ref toward the lab's target: exact quantities and their estimates from ``samples``
    candidates per context, and the TV between the accepted samples' histogram and the exact p_beta."""
    ref = random_tabular_policy(vocab, length, contexts, seed=seed)
    rewards = reward_table(reward, vocab, length, contexts, reward_seed=reward_seed)
    target = lab_target(ref, rewards, beta, evidence)
    ex = target.exact(ref.enumerate())
    ref_logp = ref.support_logprobs().detach()
    q = qrs_exact(ex.log_weights, ref_logp, qrs_beta=qrs_beta)
    g = torch.Generator().manual_seed(derive_seed(seed, "qrs"))
    cand = quasi_rejection_sample(target, list(range(contexts)), samples, qrs_beta=qrs_beta, generator=g)
    est = qrs_estimates(cand.log_weights.view(contexts, samples), qrs_beta=qrs_beta)
    codes = ref.sequence_code(cand.rollout.completion_ids) + torch.as_tensor(cand.rollout.prompts) * vocab**length
    counts = torch.bincount(codes[cand.keep], minlength=contexts * vocab**length).view(contexts, -1).double()
    hist = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return {
        "qrs_beta": qrs_beta,
        "acceptance_rate": q.acceptance_rate,
        "tv": q.tv,
        "kl_target_sampler": q.kl_target_sampler,
        "kl_sampler_target": q.kl_sampler_target,
        "max_weight": (ex.log_weights - ref_logp).exp().amax().item(),
        "log_z": ex.log_z.mean().item(),
        "acceptance_rate_estimate": est["acceptance_rate"].mean().item(),
        "acceptance_rate_estimate_stderr": (est["acceptance_rate_stderr"].square().sum().sqrt() / contexts).item(),
        "tv_estimate": est["tv"].mean().item(),
        "kl_target_sampler_estimate": est["kl_target_sampler"].mean().item(),
        "accepted": int(cand.keep.sum()),
        "samples": samples * contexts,
        "accepted_tv_sampler": 0.5 * (hist - q.log_probs.exp()).abs().sum(-1).mean().item(),
        "accepted_tv_target": 0.5 * (hist - ex.log_probs.exp()).abs().sum(-1).mean().item(),
        "support": vocab**length,
        "beta": beta,
        "evidence": evidence,
    }


def run_gdc_lab(
    *,
    vocab: int = 3,
    length: int = 3,
    contexts: int = 1,
    seed: int = 0,
    features: tuple[str, ...] = ("contains:2",),
    moments: tuple[float, ...] = (0.5,),
    samples: int = 512,
    sample_seed: int = 0,
) -> dict:
    """Fit the I-projection of a random reference under E[phi] = mu from ``samples`` reference samples per context,
    and compare with the exact coefficient (a 1-D root when there is one feature) and the moment it achieves."""
    ref = random_tabular_policy(vocab, length, contexts, seed=seed)
    tables = [reward_table(spec, vocab, length, contexts) for spec in features]
    feature_fns = [TableReward(t, vocab, length) for t in tables]
    g = torch.Generator().manual_seed(derive_seed(sample_seed, "gdc"))
    target, fit = fit_target(ref, feature_fns, moments, list(range(contexts)), generator=g, n_samples=samples)
    ref_logp = ref.support_logprobs().detach()  # (C, N)
    phi = torch.stack(tables, -1)  # (C, N, F)
    ex = target.exact(ref.enumerate())
    achieved = torch.einsum("cn,cnf->f", ex.log_probs.exp(), phi) / contexts
    if len(features) == 1:
        def gap(lam: float) -> float:
            w = torch.softmax(ref_logp + lam * phi[..., 0], -1)
            return ((w * phi[..., 0]).sum(-1).mean() - moments[0]).item()
        exact_coefficients = [brentq(gap, -50.0, 50.0, xtol=1e-12)]
    else:
        exact_coefficients = fit_coefficients(phi, ref_logp, torch.tensor(list(moments)), tolerance=1e-10).coefficients.tolist()
    one = len(features) == 1
    coefficients = fit.coefficients.tolist()
    return {
        "coefficient": coefficients[0] if one else coefficients,
        "coefficient_stderr": fit.stderr.tolist()[0] if one else fit.stderr.tolist(),
        "exact_coefficient": exact_coefficients[0] if one else exact_coefficients,
        "moment": achieved.tolist()[0] if one else achieved.tolist(),
        "target_moment": moments[0] if one else list(moments),
        "sample_moment": fit.moments.tolist()[0] if one else fit.moments.tolist(),
        "ref_moment": (torch.einsum("cn,cnf->f", ref_logp.exp(), phi) / contexts).tolist()[0 if one else slice(None)],
        "kl_ref": exact.kl(ex.log_probs, ref_logp).item(),
        "iterations": fit.iterations,
        "samples": samples,
        "support": vocab**length,
    }
