"""``tilt lab demo-bc | demo-rl | demo-rlhf``: demonstration-regularised RL in an exact tabular MDP
(Tiapkin et al. 2023; see docs/demo_rl.md).

A random finite-horizon MDP and its epsilon-optimal expert are fixed by ``--seed``; demonstrations and
preferences are drawn from seeds derived from it, one per replicate.
"""
from __future__ import annotations

import argparse

from tilt.cli.output import print_json, table


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def _add_world_options(p: argparse.ArgumentParser) -> None:
    from tilt.runs.config import module_constant

    expert_temperature = module_constant("tilt.lab.mdp", "EXPERT_TEMPERATURE")

    g = p.add_argument_group("the MDP")
    g.add_argument("--states", type=int, default=5, help="number of states S (default 5, digest §3(e))")
    g.add_argument("--actions", type=int, default=4, help="number of actions A (default 4)")
    g.add_argument("--horizon", type=int, default=5, help="horizon H (default 5)")
    g.add_argument("--seed", type=int, default=0, help="seed of the MDP and the expert; demonstrations use seeds derived from it (default 0)")
    g.add_argument(
        "--expert-temperature", type=float, default=expert_temperature,
        help=f"the expert is softmax(Q*/T) (default {expert_temperature}, digest §3(e))",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_lab_parsers(lab_sub) -> None:
    p = lab_sub.add_parser(
        "demo-bc",
        help="behaviour cloning from N demonstrations: KL_traj(expert || clone) falls as 1/N",
        description="Clone the expert with add-one smoothing from N trajectories and report the exact trajectory KL "
        "KL_traj(expert || clone), averaged over --seeds draws of the demonstrations, and its log-log slope in N.",
    )
    _add_world_options(p)
    p.add_argument("--demos", type=_ints, default=[10, 30, 100, 300, 1000, 3000, 10000], help="numbers of demonstrations, comma-separated (default 10,30,...,10000)")
    p.add_argument("--seeds", type=int, default=5, help="demonstration draws averaged per N (default 5)")
    p.set_defaults(run=run_demo_bc)

    p = lab_sub.add_parser(
        "demo-rl",
        help="plan exactly toward the clone with KL coefficient lambda; check gap <= eps_E + lambda KL_traj",
        description="Clone from N demonstrations, then find the exact maximiser of E[sum r] - lambda KL(pi || clone) by soft "
        "value iteration, and compare its gap V* - V with the bound eps_E + lambda KL_traj(expert || clone).",
    )
    _add_world_options(p)
    p.add_argument("--demos", type=int, default=300, help="number of demonstrations N (default 300)")
    p.add_argument("--lam", type=float, default=0.1, help="KL coefficient lambda toward the clone; 0 = greedy (default 0.1)")
    p.set_defaults(run=run_demo_rl)

    p = lab_sub.add_parser(
        "demo-rlhf",
        help="RLHF regularised toward the clone: preferences on clone pairs, MLE reward, KL-regularised planning",
        description="Clone from N demonstrations; draw P pairs of clone trajectories labelled by Bradley-Terry on the true "
        "returns; fit a tabular reward by maximum likelihood; plan toward the clone with each lambda. Reports the mean "
        "gap over --seeds replicates for every (P, lambda), and the clone's gap.",
    )
    _add_world_options(p)
    p.add_argument("--demos", type=int, default=300, help="number of demonstrations N (default 300, digest E2.3)")
    p.add_argument("--preferences", type=_ints, default=[30, 100, 300, 1000, 3000], help="numbers of preference pairs, comma-separated (default 30,100,300,1000,3000)")
    p.add_argument("--lam", type=_floats, default=[0.0, 0.1, 0.5, 1.0], help="KL coefficients, comma-separated; 0 = greedy on the fitted reward (default 0,0.1,0.5,1)")
    p.add_argument("--seeds", type=int, default=5, help="replicates (demonstrations and preferences) averaged (default 5)")
    p.set_defaults(run=run_demo_rlhf)


def _world(args: argparse.Namespace) -> tuple[mdp.World, dict]:
    import torch
    from tilt.lab import mdp

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    world = mdp.make_world(args.states, args.actions, args.horizon, seed=args.seed, expert_temperature=args.expert_temperature)
    header = {
        "states": args.states,
        "actions": args.actions,
        "horizon": args.horizon,
        "seed": args.seed,
        "expert_temperature": args.expert_temperature,
        "v_star": world.v_star,
        "epsilon_e": world.epsilon_e,
    }
    return world, header


def _check_seeds(seeds: int) -> None:
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")


def run_demo_bc(args: argparse.Namespace) -> int:
    from tilt.lab import mdp

    _check_seeds(args.seeds)
    world, report = _world(args)
    result = mdp.bc_rate(world, args.demos, seeds=args.seeds, seed=args.seed)
    report.update(
        seeds=args.seeds,
        demos=[r["demos"] for r in result["rows"]],
        kl_traj=[r["kl_traj"] for r in result["rows"]],
        n_times_kl=[r["n_times_kl"] for r in result["rows"]],
        slope=result["slope"],
    )
    if args.json:
        print_json(report)
        return 0
    print(f"\nbehaviour cloning, S={args.states} A={args.actions} H={args.horizon}: V* = {world.v_star:.4f}, eps_E = {world.epsilon_e:.4f}\n")
    print(table(["N demos", "KL_traj(expert || clone)", "N * KL_traj"], [(r["demos"], r["kl_traj"], r["n_times_kl"]) for r in result["rows"]]))
    if result["slope"] is not None:
        print(f"\nlog-log slope of KL_traj in N: {result['slope']:.3f}  (the paper's rate 1/N is slope -1)")
    return 0


def run_demo_rl(args: argparse.Namespace) -> int:
    from tilt.lab import mdp

    if args.lam < 0 or args.demos < 1:
        raise ValueError("--lam must be >= 0 and --demos >= 1")
    world, report = _world(args)
    result = mdp.demo_rl(world, args.demos, args.lam, seed=args.seed)
    report.update(demos=args.demos, lam=args.lam, **result)
    if args.json:
        print_json(report)
        return 0
    print(f"\nKL-regularised planning toward the clone, N = {args.demos}, lambda = {args.lam}\n")
    rows = [
        ("gap of the regularised optimum  V* - V", result["gap"]),
        ("bound  eps_E + lambda * KL_traj", result["bound"]),
        ("gap of the clone", result["bc_gap"]),
        ("KL_traj(expert || clone)", result["kl_traj"]),
        ("KL_traj(optimum || clone)", result["kl_policy_clone"]),
    ]
    print(table(["quantity", "value"], rows))
    return 0


def run_demo_rlhf(args: argparse.Namespace) -> int:
    from tilt.lab import mdp

    _check_seeds(args.seeds)
    if args.demos < 1:
        raise ValueError("--demos must be >= 1")
    world, report = _world(args)
    result = mdp.demo_rlhf(world, args.demos, args.preferences, args.lam, seeds=args.seeds, seed=args.seed)
    report.update(demos=args.demos, preferences=args.preferences, lam=args.lam, seeds=args.seeds, gaps=result["rows"], bc_gap=result["bc_gap"])
    if args.json:
        print_json(report)
        return 0
    print(f"\nRLHF regularised toward the clone, N = {args.demos}, mean gap V* - V over {args.seeds} replicates; "
          f"the clone's gap is {result['bc_gap']:.4f}\n")
    gaps = {(r["preferences"], r["lam"]): r["gap"] for r in result["rows"]}
    headers = ["P preferences"] + [f"lambda={lam:g}" for lam in args.lam]
    print(table(headers, [[p] + [gaps[(p, lam)] for lam in args.lam] for p in args.preferences]))
    return 0
