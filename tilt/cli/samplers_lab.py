"""``tilt lab mh`` and ``tilt lab smc``: the samplers of pi* against the exact target of a variable-length world;
``tilt lab kl-target``: where an adaptive-beta KL-RL run lands relative to the exact pi* at its final beta."""
from __future__ import annotations

import argparse

from tilt.cli.output import fmt, print_json, table


def _world_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", type=int, default=3, help="tokens, EOS (token 0) included (default 3)")
    p.add_argument("--length", type=int, default=4, help="completion length limit (default 4)")
    p.add_argument("--beta", type=float, default=0.25, help="temperature of pi* ∝ pi_ref exp(r/beta) (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference's logits (default 0)")
    p.add_argument("--reward-seed", type=int, default=100, help="seed of the uniform random reward per completion (default 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_lab_parsers(lab_sub) -> None:
    p = lab_sub.add_parser(
        "mh",
        help="suffix-resampling Metropolis-Hastings (QUEST): the chain's exact law tends to pi*",
        description="Completions of varied lengths (EOS = token 0). The exact transition matrix of suffix-resampling MH, "
        "started from pi_ref: TV to pi* after t steps, for the kernel with the |y|/|y'| factor and without it; and the "
        "sampler's own chains against the exact law.",
    )
    _world_options(p)
    p.add_argument("--steps", type=int, default=200, help="exact steps to follow (default 200)")
    p.add_argument("--chains", type=int, default=2000, help="sampled chains (default 2000)")
    p.add_argument("--sampled-steps", type=int, default=5, help="steps of the sampled chains (default 5)")
    p.set_defaults(run=run_mh_command)

    p = lab_sub.add_parser(
        "smc",
        help="sequential Monte Carlo: its estimate of Z is unbiased (not that of log Z)",
        description="Many independent SMC runs against the exact Z of a variable-length world.",
    )
    _world_options(p)
    p.add_argument("--particles", type=int, default=4, help="particles per run (default 4)")
    p.add_argument("--block-size", type=int, default=1, help="tokens per block (default 1)")
    p.add_argument("--prefix-token", type=int, default=1, help="prefix potential: fraction of this token so far; -1 = none (importance resampling)")
    p.add_argument("--ess-threshold", type=float, default=0.5, help="resample when ESS < this x particles (default 0.5)")
    p.add_argument("--runs", type=int, default=2000, help="independent runs (default 2000)")
    p.set_defaults(run=run_smc_command)

    p = lab_sub.add_parser(
        "kl-target",
        help="KL-RL with an adaptive beta toward a KL target (Ziegler et al. 2019), against the exact pi* at its final beta",
        description="Tabular KL-RL from the reference, beta adapted every step by the proportional controller. Reports the "
        "final beta, the beta whose exact pi* has the target KL, and how far the policy is from the pi* at the final beta.",
    )
    p.add_argument("--kl-target", type=float, default=0.5, help="target KL(pi || pi_ref) in nats (default 0.5)")
    p.add_argument("--beta", type=float, default=0.5, help="initial beta (default 0.5)")
    p.add_argument("--steps", type=int, default=400, help="steps (default 400)")
    p.add_argument("--batch", type=int, default=64, help="samples per step (default 64)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--lr-schedule", choices=["constant", "linear"], default="constant",
                   help="constant (default) or linear decay to 0; with a decayed lr the policy stops following beta")
    p.add_argument("--gain", type=float, default=0.1, help="controller gain K_beta = batch / horizon (default 0.1, Ziegler et al. §2.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference and of training (default 0)")
    p.add_argument("--reward-seed", type=int, default=1, help="seed of the random reward (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_kl_target_command)


def run_mh_command(args: argparse.Namespace) -> int:
    import torch

    from tilt.lab.samplers import mh_report

    torch.set_num_threads(1)
    r = mh_report(vocab=args.vocab, length=args.length, beta=args.beta, seed=args.seed, reward_seed=args.reward_seed,
                  steps=args.steps, chains=args.chains, sampled_steps=args.sampled_steps)
    if args.json:
        print_json(r)
        return 0
    print(f"{r['support']} completions of lengths {r['lengths']}; beta = {r['beta']}")
    print(f"max |pi* M - pi*|: {fmt(r['invariance_residual'])} with |y|/|y'|, {fmt(r['invariance_residual_uncorrected'])} without\n")
    rows = [(t, fmt(r["tv_by_step"][t]), fmt(r["tv_by_step_uncorrected"][t])) for t in r["tv_by_step"]]
    print(table(["step", "TV(chain, pi*)", "TV without |y|/|y'|"], rows))
    print(f"\nwithout |y|/|y'| the chain settles {fmt(r['tv_stationary_uncorrected'])} in TV away from pi*")
    print(f"{r['chains']} sampled chains after {r['sampled_steps']} steps: TV to the exact law {fmt(r['sampled_tv'])} "
          f"(sampling noise about {fmt(r['sampled_noise'])}); acceptance rate {fmt(r['acceptance_rate'])}, ESS {fmt(r['ess'])}")
    return 0


def run_smc_command(args: argparse.Namespace) -> int:
    import torch

    from tilt.lab.samplers import smc_report

    torch.set_num_threads(1)
    r = smc_report(vocab=args.vocab, length=args.length, beta=args.beta, seed=args.seed, reward_seed=args.reward_seed,
                   particles=args.particles, block_size=args.block_size, prefix_token=None if args.prefix_token < 0 else args.prefix_token,
                   ess_threshold=args.ess_threshold, runs=args.runs)
    if args.json:
        print_json(r)
        return 0
    print(table(["quantity", "exact", f"mean over {r['runs']} runs", "stderr", "error / stderr"], [
        ("Z", fmt(r["z"]), fmt(r["z_hat_mean"]), fmt(r["z_hat_stderr"]), fmt(r["z_error_in_stderr"])),
        ("log Z", fmt(r["log_z"]), fmt(r["log_z_hat_mean"]), fmt(r["log_z_hat_stderr"]), fmt(r["log_z_error_in_stderr"])),
    ]))
    print(f"\n{r['particles']} particles, blocks of {r['block_size']} token(s), prefix potential: {r['prefix_reward']}; "
          f"{fmt(r['resampled_fraction'])} of blocks resampled")
    return 0


def run_kl_target_command(args: argparse.Namespace) -> int:
    import torch

    from tilt.lab.kl_target import adaptive_beta_report

    torch.set_num_threads(1)
    r = adaptive_beta_report(kl_target=args.kl_target, beta=args.beta, steps=args.steps, batch=args.batch, lr=args.lr,
                             lr_schedule=args.lr_schedule, gain=args.gain, seed=args.seed, reward_seed=args.reward_seed)
    if args.json:
        print_json(r)
        return 0
    print(table(["quantity", "value"], [
        ("initial beta", fmt(r["initial_beta"])),
        ("final beta", fmt(r["final_beta"])),
        ("beta whose exact pi* has the target KL", fmt(r["beta_for_target"])),
        ("KL(pi || pi_ref), the policy", fmt(r["kl_ref"])),
        ("KL(pi* || pi_ref) at the final beta", fmt(r["target_kl_ref"])),
        ("KL(pi || pi*) at the final beta", fmt(r["kl_policy_target"])),
        ("KL(pi* || pi) at the final beta", fmt(r["kl_target_policy"])),
    ]))
    return 0
