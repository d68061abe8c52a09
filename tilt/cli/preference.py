"""``tilt lab xpo-bandit``: XPO against online DPO in a bandit whose best arm the reference barely covers."""
from __future__ import annotations

import argparse
import time

from tilt.cli.output import print_json, table

DEFAULT_ALPHA = 0.01
"""XPO's alpha in the lab: 0.01 solved 9/10 seeds at epsilon 1e-3 in digest §4(e); 0.1 and 1 solved none."""


def add_lab_parsers(lab_sub) -> None:
    from tilt.runs.config import module_constant

    METHODS = module_constant("tilt.lab.bandit", "METHODS")

    p = lab_sub.add_parser(
        "xpo-bandit",
        help="XPO vs online DPO in a K-armed bandit with a poorly covered best arm (exact J_beta per round)",
        description="A K-armed bandit with pi_ref(a*) = epsilon, Bradley-Terry labels and the bounded class "
        "pi ∝ pi_ref exp(theta/beta), theta in [0, R]^K. Each round adds one labelled pair and re-fits on all pairs "
        "so far (Xie et al. 2024, Algorithm 1). A seed is solved when J* - J_beta(pi_t) < 0.1 at some round.",
    )
    p.add_argument("--method", choices=[*METHODS, "all"], default="xpo",
                   help="online-dpo: both arms from pi_t; pairs: (pi_t, pi_ref) with alpha = 0; xpo: pairs + alpha*log pi(y~); "
                   "all: the three on the same seeds (default xpo)")
    p.add_argument("--alpha", type=float, default=None, help=f"XPO coefficient (default {DEFAULT_ALPHA} for xpo; must be 0 otherwise)")
    p.add_argument("--epsilon", type=float, default=1e-3, help="pi_ref(a*), the reference's mass on the best arm (default 1e-3)")
    p.add_argument("--arms", type=int, default=10, help="number of arms K (default 10)")
    p.add_argument("--rounds", type=int, default=150, help="rounds T, one labelled pair each (default 150)")
    p.add_argument("--seeds", type=int, default=10, help="number of seeds (default 10)")
    p.add_argument("--seed", type=int, default=0, help="the first seed; seeds are seed .. seed+seeds-1 (default 0)")
    p.add_argument("--beta", type=float, default=0.25, help="KL coefficient (default 0.25)")
    p.add_argument("--best-reward", type=float, default=3.0, help="r(a*); the other arms' rewards are U[0, 1.5] (default 3)")
    p.add_argument("--bt-scale", type=float, default=1.0, help="Bradley-Terry scale of the labels (default 1)")
    p.add_argument("--lr", type=float, default=0.05, help="projected Adam learning rate (default 0.05)")
    p.add_argument("--steps-per-round", type=int, default=100, help="Adam steps per round (default 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_xpo_bandit_command)


def bandit_configs(args: argparse.Namespace) -> list[BanditConfig]:
    from tilt.lab.bandit import BanditConfig
    from tilt.lab.bandit import METHODS

    methods = list(METHODS) if args.method == "all" else [args.method]
    configs = []
    for method in methods:
        if method == "xpo":
            alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
        else:
            alpha = 0.0 if args.alpha is None or args.method == "all" else args.alpha
        configs.append(
            BanditConfig(method=method, alpha=alpha, beta=args.beta, epsilon=args.epsilon, arms=args.arms, rounds=args.rounds,
                         best_reward=args.best_reward, bt_scale=args.bt_scale, lr=args.lr, steps_per_round=args.steps_per_round)
        )
    return configs


def run_xpo_bandit_command(args: argparse.Namespace) -> int:
    import torch
    from tilt.lab.bandit import run_bandit_methods
    from tilt.lab.bandit import summarise

    torch.set_num_threads(1)  # (R, K, K) tensors: thread start-up costs more than it saves
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    configs = bandit_configs(args)
    start = time.perf_counter()
    runs = run_bandit_methods(configs, range(args.seed, args.seed + args.seeds))
    seconds = round(time.perf_counter() - start, 3)
    reports = [summarise(c, r) | {"seconds": seconds} for c, r in zip(configs, runs)]
    if args.json:
        print_json(reports[0] if len(reports) == 1 else {r["method"]: r for r in reports})
        return 0
    c0 = configs[0]
    print(f"\nbandit: K = {c0.arms}, pi_ref(a*) = {c0.epsilon}, beta = {c0.beta}, r(a*) = {c0.best_reward}, "
          f"pi*(a*) = {reports[0]['target_best_arm_mass']:.3f}; {c0.rounds} rounds, {args.seeds} seeds, {seconds:.1f} s\n")
    print(table(
        ["method", "alpha", "solved", "mean final gap", "mean best gap", "final pi(a*)", "never sampled a*"],
        [(r["method"], r["config"]["alpha"], f"{r['solved']}/{len(r['seeds'])}", r["mean_final_gap"], r["mean_best_gap"],
          r["mean_final_best_arm_mass"], f"{r['never_sampled_best_arm']}/{len(r['seeds'])}") for r in reports],
    ))
    if len(reports) == 1:
        r = reports[0]
        print()
        print(table(
            ["seed", "first round a* sampled", "round solved", "final gap"],
            [(s, f, sr, g) for s, f, sr, g in zip(r["seeds"], r["first_round_best_arm_sampled"], r["solved_round"], r["final_gap"])],
        ))
    print(f"\nsolved: J* - J_beta < {c0.solve_gap} at some round; gaps are exact.")
    return 0
