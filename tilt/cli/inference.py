"""``tilt lab dpg``, ``tilt lab qrs``, ``tilt lab gdc``: alignment as inference in the exact lab.

* dpg: distribution matching (DPG, KL-adaptive DPG, f-divergences) toward the tilted target or a filtered posterior;
* qrs: quasi-rejection sampling, its exact acceptance rate and divergences next to their estimates from samples;
* gdc: the exponential-family target that meets a moment constraint, fitted from samples and solved exactly.
"""
from __future__ import annotations

import argparse

from tilt.cli.lab_options import add_training_options, add_world_options
from tilt.cli.output import print_json, table


# --- tilt lab dpg -------------------------------------------------------------------------------------------------


def run_dpg_command(args: argparse.Namespace) -> int:
    from tilt.lab.drivers import lab_threads
    from tilt.lab.drivers import run_dpg_lab

    lab_threads()
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


def run_qrs_command(args: argparse.Namespace) -> int:
    from tilt.lab.drivers import lab_threads
    from tilt.lab.drivers import run_qrs_lab

    lab_threads()
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


def run_gdc_command(args: argparse.Namespace) -> int:
    from tilt.lab.drivers import lab_threads
    from tilt.lab.drivers import run_gdc_lab

    lab_threads()
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
    from tilt.runs.config import module_constant

    EVAL_SAMPLES = module_constant("tilt.lab.drivers", "EVAL_SAMPLES")

    p = lab_sub.add_parser(
        "dpg",
        help="distribution matching (DPG, KL-adaptive DPG, f-divergences) toward pi*, checked against the exact target",
        description="Train a tabular policy by minimising an f-divergence to the tilted target (forward KL = DPG/GDC, "
        "reverse KL = KL-regularised RL, JS, TV, chi2), on-policy or with a KL-adaptive frozen proposal.",
    )
    add_world_options(p)
    add_training_options(p)
    g = p.add_argument_group("distribution matching")
    g.add_argument("--mode", choices=list(module_constant("tilt.recipes.dpg", "MODES")), default="on-policy", help="on-policy (q = pi) or adaptive (frozen proposal) (default on-policy)")
    g.add_argument("--divergence", choices=module_constant("tilt.math.fdiv", "DIVERGENCES"), default="forward-kl", help="the f-divergence D(pi || pi*) minimised (default forward-kl)")
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
