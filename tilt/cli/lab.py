"""``tilt lab``: experiments in small enumerable worlds, where the target and every divergence are exact.

The lab runs the *same* recipes as real models; only the policy is a table of logits.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from tilt.cli.output import print_json, table
from tilt.lab.tabular import random_tabular_policy
from tilt.lab.world import TableReward, exact_report, reward_table
from tilt.recipes import kl_rl

LAB_LR = 0.05
"""Adam on the logits with lr 0.05 decayed linearly to 0: a sweep over V in {2,3,4}, L in {3,4,8}, beta in
{0.05 .. 1} and random rewards reached KL(pi*||pi) < 1e-3 in 3000 steps of batch 64 in every case (see
docs/kl_rl.md). The digest's SGD at lr 0.5 (§2(e) E1.2) does not at beta 0.1 or with 256 sequences."""


def add_world_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the world")
    g.add_argument("--vocab", type=int, default=3, help="vocabulary size V (default 3)")
    g.add_argument("--length", type=int, default=3, help="sequence length L; the support has V^L sequences (default 3)")
    g.add_argument("--contexts", type=int, default=1, help="number of contexts (prompts), each with its own reference (default 1)")
    g.add_argument("--reward", default="count:2", help="count:K (fraction of token K), contains:K (0/1 filter) or random (default count:2)")
    g.add_argument("--reward-seed", type=int, default=0, help="seed of a random reward (default 0)")
    g.add_argument("--beta", type=float, default=0.3, help="KL coefficient / temperature of the target (default 0.3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the reference logits and of sampling (default 0)")


def add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=3000, help="optimisation steps (default 3000)")
    g.add_argument("--batch", type=int, default=64, help="samples per step, split evenly over contexts (default 64)")
    g.add_argument("--lr", type=float, default=LAB_LR, help=f"learning rate (default {LAB_LR}, decayed linearly to 0)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer on the logits (default adamw)")
    g.add_argument("--lr-schedule", choices=["linear", "constant"], default="linear", help="(default linear)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="1 = REINFORCE with leave-one-out baseline; >1 = PPO-clip")
    g.add_argument("--kl-penalty", choices=["reward", "loss"], default="reward", help="where the KL term goes (default reward)")
    g.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default="k1", help="estimator when --kl-penalty loss")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


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

    from tilt.cli import bon_lab, demo_reg, infalign, inference, preference  # here, not at the top: they import this module

    inference.add_lab_parsers(lab_sub)
    demo_reg.add_lab_parsers(lab_sub)
    infalign.add_lab_parsers(lab_sub)
    preference.add_lab_parsers(lab_sub)
    bon_lab.add_lab_parsers(lab_sub)


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


def run_kl_rl_command(args: argparse.Namespace) -> int:
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
