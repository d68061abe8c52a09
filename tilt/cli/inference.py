"""``tilt lab dpg``, ``tilt lab qrs``, ``tilt lab gdc``: alignment as inference in the exact lab.

* dpg: distribution matching (DPG, KL-adaptive DPG, f-divergences) toward the tilted target or a filtered posterior;
* qrs: quasi-rejection sampling, its exact acceptance rate and divergences next to their estimates from samples;
* gdc: the exponential-family target that meets a moment constraint, fitted from samples and solved exactly.
"""
from __future__ import annotations

import argparse
import time

import torch
from scipy.optimize import brentq
from tqdm import tqdm

from tilt.cli.lab import LAB_LR, add_training_options, add_world_options
from tilt.cli.output import print_json, table
from tilt.gdc import fit_coefficients, fit_target, pointwise_target
from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import TableReward, exact_report, reward_table
from tilt.math import exact, importance
from tilt.math.fdiv import DIVERGENCES
from tilt.posterior import qrs_estimates, qrs_exact, quasi_rejection_sample
from tilt.recipes import dpg
from tilt.recipes.common import derive_seed
from tilt.target import TiltedTarget

EVAL_SAMPLES = 1024
"""Fresh policy samples per context behind the importance-sampled estimates printed after training."""


def _threads() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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


# --- tilt lab dpg -------------------------------------------------------------------------------------------------
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


def run_dpg_command(args: argparse.Namespace) -> int:
    _threads()
    if args.ppo_epochs != 1 or args.kl_penalty != "reward" or args.kl_estimator != "k1":
        raise ValueError("--ppo-epochs, --kl-penalty and --kl-estimator belong to kl-rl; DPG takes --divergence instead")
    report = run_dpg_lab(
        vocab=args.vocab,
        length=args.length,
        contexts=args.contexts,
        reward=args.reward,
        reward_seed=args.reward_seed,
        beta=args.beta,
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        optimizer=args.optimizer,
        lr_schedule=args.lr_schedule,
        mode=args.mode,
        divergence=args.divergence,
        evidence=args.evidence,
        baseline=args.baseline,
        eval_samples=args.eval_samples,
        progress=not args.json,
    )
    if args.json:
        print_json(report)
        return 0
    what = "pi_ref * b (filter)" if args.evidence == "filter" else f"pi_ref exp(r/{args.beta})"
    print(f"\nDPG ({args.mode}, {args.divergence}) toward {what} on {report['support']} sequences, "
          f"{args.steps} steps of {args.batch} samples, {report['seconds']:.1f} s\n")
    rows = [
        ("E[r]  expected reward", report["expected_reward"], report["target_expected_reward"]),
        ("H     entropy (nats)", report["entropy"], report["target_entropy"]),
        ("largest sequence probability", report["max_prob"], None),
    ]
    print(table(["quantity", "policy pi", "target pi*"], rows))
    rows = [
        (name, report[key], report[f"target_{ikey}"], report[f"target_{ikey}_lower"], report[f"target_{ikey}_upper"])
        for name, key, ikey in [("KL(pi* || pi)", "kl_target_policy", "kl_target_policy"), ("KL(pi || pi*)", "kl_policy_target", "kl_policy_target"), ("log Z", "log_z", "log_z")]
    ]
    print()
    print(table(["quantity", "exact", "IS estimate", "95% low", "95% high"], rows))
    if args.mode == "adaptive":
        print(f"\nproposal replaced {report['proposal_updates']} times")
    return 0


# --- tilt lab qrs -------------------------------------------------------------------------------------------------
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


def run_qrs_command(args: argparse.Namespace) -> int:
    _threads()
    report = run_qrs_lab(
        vocab=args.vocab, length=args.length, contexts=args.contexts, reward=args.reward, reward_seed=args.reward_seed,
        beta=args.beta, seed=args.seed, qrs_beta=args.qrs_beta, samples=args.samples, evidence=args.evidence,
    )
    if args.json:
        print_json(report)
        return 0
    print(f"\nquasi-rejection sampling with beta_q = {args.qrs_beta} (exact sampling from beta_q >= {report['max_weight']:.4g}), "
          f"{report['samples']} candidates, {report['accepted']} accepted\n")
    rows = [
        ("acceptance rate", report["acceptance_rate"], report["acceptance_rate_estimate"]),
        ("TV(pi*, p_beta)", report["tv"], report["tv_estimate"]),
        ("KL(pi* || p_beta)", report["kl_target_sampler"], report["kl_target_sampler_estimate"]),
        ("KL(p_beta || pi*)", report["kl_sampler_target"], None),
    ]
    print(table(["quantity", "exact", "estimate from samples"], rows))
    print(f"\nTV(accepted samples, p_beta) = {report['accepted_tv_sampler']:.4f}   TV(accepted samples, pi*) = {report['accepted_tv_target']:.4f}")
    return 0


# --- tilt lab gdc -------------------------------------------------------------------------------------------------
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


def run_gdc_command(args: argparse.Namespace) -> int:
    _threads()
    if len(args.feature) != len(args.moment):
        raise ValueError(f"give one --moment per --feature ({len(args.feature)} features, {len(args.moment)} moments)")
    report = run_gdc_lab(
        vocab=args.vocab, length=args.length, contexts=args.contexts, seed=args.seed, features=tuple(args.feature),
        moments=tuple(args.moment), samples=args.samples, sample_seed=args.sample_seed,
    )
    if args.json:
        print_json(report)
        return 0
    print(f"\nGDC target pi_ref exp(lambda . phi) with E[phi] = {report['target_moment']}, fitted from {args.samples} samples\n")
    rows = [
        ("lambda (coefficient)", report["coefficient"], report["exact_coefficient"]),
        ("E[phi] under the fitted target", report["moment"], report["target_moment"]),
    ]
    print(table(["quantity", "fitted", "exact"], rows) if len(args.feature) == 1 else report)
    print(f"\nstandard error of lambda: {report['coefficient_stderr']}; KL(target || pi_ref) = {report['kl_ref']:.4f}")
    return 0


# --- wiring -------------------------------------------------------------------------------------------------------
def _evidence_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--evidence", choices=["tilt", "filter"], default="tilt",
        help="tilt: target pi_ref exp(r/beta); filter: target pi_ref * r for a 0/1 reward such as contains:K (beta unused)",
    )


def add_lab_parsers(lab_sub) -> None:
    p = lab_sub.add_parser(
        "dpg",
        help="distribution matching (DPG, KL-adaptive DPG, f-divergences) toward pi*, checked against the exact target",
        description="Train a tabular policy by minimising an f-divergence to the tilted target (forward KL = DPG/GDC, "
        "reverse KL = KL-regularised RL, JS, TV, chi2), on-policy or with a KL-adaptive frozen proposal.",
    )
    add_world_options(p)
    add_training_options(p)
    g = p.add_argument_group("distribution matching")
    g.add_argument("--mode", choices=list(dpg.MODES), default="on-policy", help="on-policy (q = pi) or adaptive (frozen proposal) (default on-policy)")
    g.add_argument("--divergence", choices=list(DIVERGENCES), default="forward-kl", help="the f-divergence D(pi || pi*) minimised (default forward-kl)")
    g.add_argument("--baseline", choices=["loo", "none"], default="loo", help="loo: leave-one-out baseline; none: GDC++ for forward-kl (default loo)")
    g.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, help=f"fresh samples behind the target_* estimates (default {EVAL_SAMPLES})")
    _evidence_option(g)
    p.set_defaults(run=run_dpg_command)

    p = lab_sub.add_parser(
        "qrs",
        help="quasi-rejection sampling from pi*: exact acceptance rate and divergences next to their estimates",
        description="Quasi-rejection sampling with proposal pi_ref: accept y with probability min(1, P(y)/(Q pi_ref(y))). "
        "The samples follow p_Q ∝ min(P, Q pi_ref), which is pi* once Q >= max P/pi_ref.",
    )
    add_world_options(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--qrs-beta", type=float, default=1.0, help="QRS parameter Q > 0 (not the KL coefficient) (default 1)")
    g.add_argument("--samples", type=int, default=20000, help="candidates per context (default 20000)")
    _evidence_option(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_qrs_command)

    p = lab_sub.add_parser(
        "gdc",
        help="fit the exponential-family target that meets moment constraints (GDC), against the exact root",
        description="Fit lambda in pi_ref(y) exp(lambda . phi(y)) so that E[phi] equals the given moments, by "
        "self-normalised importance sampling from pi_ref, and compare with the exact solution.",
    )
    g = p.add_argument_group("the world")
    g.add_argument("--vocab", type=int, default=3, help="vocabulary size V (default 3)")
    g.add_argument("--length", type=int, default=3, help="sequence length L (default 3)")
    g.add_argument("--contexts", type=int, default=1, help="number of contexts (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the reference logits (default 0)")
    g = p.add_argument_group("constraints")
    g.add_argument("--feature", action="append", help="a feature: count:K or contains:K; repeat for several (default contains:2)")
    g.add_argument("--moment", action="append", type=float, help="its desired mean, one per --feature (default 0.5)")
    g.add_argument("--samples", type=int, default=512, help="reference samples per context to fit from (default 512, as in disco)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of those samples (default 0)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=_gdc_with_defaults)


def _gdc_with_defaults(args: argparse.Namespace) -> int:
    args.feature = args.feature or ["contains:2"]
    args.moment = args.moment or [0.5]
    return run_gdc_command(args)
