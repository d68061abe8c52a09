"""``tilt lab``: experiments in small enumerable worlds, where the target and every divergence are exact.

The lab runs the *same* recipes as real models; only the policy is a table of logits.
"""
from __future__ import annotations

import argparse

from tilt.cli.lab_options import add_training_options, add_world_options
from tilt.cli.output import print_json, table


def add_parser(sub) -> None:
    lab = sub.add_parser("lab", help="exact experiments in small enumerable worlds", description=__doc__)
    lab_sub = lab.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)

    p = lab_sub.add_parser(
        "kl-rl",
        help="KL-regularised RL toward pi* ∝ pi_ref exp(r/beta), checked against the exact target",
        description="Train a tabular policy with the KL-regularised policy-gradient recipe (REINFORCE + leave-one-out "
        "baseline, or PPO-clip) and compare it with the exact tilted target.",
    )
    add_world_options(p)
    add_training_options(p)
    p.set_defaults(run=run_kl_rl_command, pure=False)

    p = lab_sub.add_parser(
        "pure-rl",
        help="the beta = 0 limit: pure reward maximisation, which collapses",
        description="The same recipe with beta = 0 (no KL penalty). Its optimum is a point mass on the reward's "
        "argmax. --beta only sets the target used for comparison; training ignores it.",
    )
    add_world_options(p)
    add_training_options(p)
    p.set_defaults(run=run_kl_rl_command, pure=True)

    from tilt.cli import bon_lab, demo_reg, infalign, inference, path_lab, preference, samplers_lab  # here: each imports only when its command runs

    inference.add_lab_parsers(lab_sub)
    demo_reg.add_lab_parsers(lab_sub)
    infalign.add_lab_parsers(lab_sub)
    preference.add_lab_parsers(lab_sub)
    samplers_lab.add_lab_parsers(lab_sub)
    bon_lab.add_lab_parsers(lab_sub)
    path_lab.add_lab_parsers(lab_sub)


def run_kl_rl_command(args: argparse.Namespace) -> int:
    import torch
    from tilt.lab.drivers import run_kl_rl_lab

    torch.set_num_threads(1)  # a table of logits: threads only add overhead
    report = run_kl_rl_lab(
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
        ppo_epochs=args.ppo_epochs,
        kl_penalty=args.kl_penalty,
        kl_estimator=args.kl_estimator,
        pure=args.pure,
        progress=not args.json,
    )
    if args.json:
        print_json(report)
        return 0
    name = "pure RL (beta = 0)" if args.pure else f"KL-regularised RL (beta = {args.beta})"
    print(f"\n{name} on {report['support']} sequences, {args.steps} steps of {args.batch} samples, {report['seconds']:.1f} s\n")
    rows = [
        ("E[r]  expected reward", report["expected_reward"], report["target_expected_reward"]),
        ("H     entropy (nats)", report["entropy"], report["target_entropy"]),
        ("KL(. || pi_ref)", report["kl_ref"], None if report["log_z"] is None else report["target_expected_reward"] / args.beta - report["log_z"]),
        ("largest sequence probability", report["max_prob"], None),
    ]
    print(table(["quantity", "policy pi", "target pi*"], rows))
    if report["kl_target_policy"] is not None:
        print(f"\nKL(pi* || pi) = {report['kl_target_policy']:.2e}   KL(pi || pi*) = {report['kl_policy_target']:.2e}   "
              f"(0 means the policy is the posterior)")
    if args.pure:
        print(f"mass on the reward's argmax: {report['argmax_mass']:.4f}  (pure RL collapses onto it)")
    return 0
