"""``tilt lab bon-distill`` and ``tilt lab regress``: best-of-N distillation and regression to pi*, against the exact
targets of a small world (docs/bon_distillation.md, docs/apo.md)."""
from __future__ import annotations

import argparse

from tilt.cli.output import print_json, table

DISTILL_METHODS = ("vbon", "dpg", "bond", "bonbon")
REGRESSION_METHODS = ("apo", "qrpo")
"""The methods of ``tilt.lab.bon_distill`` (written out here so that ``--help`` imports no torch; a test keeps them equal)."""


def add_lab_parsers(lab_sub) -> None:
    p = lab_sub.add_parser("bon-distill", help="distil best-of-N of the reference (vBoN, DPG, Jeffreys BOND, BoNBoN), checked against the exact pi_BoN",
                           description="Train a one-token tabular policy toward best-of-N of its reference with one method and report exact "
                           "distances to pi_BoN, and pi_BoN's own KL and win rate next to the continuous-limit closed forms.")
    p.add_argument("--method", choices=DISTILL_METHODS, default="bond", help="vbon (KL-RL at beta 1 on log pi_BoN/pi_ref), dpg (forward KL toward "
                   "pi_BoN), bond (Jeffreys mix), bonbon (SFT + IPO on best/worst pairs) (default bond)")
    p.add_argument("--n", type=int, default=4, help="N of best-of-N (default 4)")
    p.add_argument("--responses", type=int, default=4, help="number of responses (default 4)")
    p.add_argument("--levels", type=int, default=3, help="rewards floor(levels * U), with ties when below --responses; 0 = distinct rewards (default 3)")
    p.add_argument("--jeffreys-weight", type=float, default=0.5, help="bond: weight of the backward KL (default 0.5)")
    p.add_argument("--alpha", type=float, default=1.0, help="bonbon: weight of the SFT term; 1 = exact target (default 1)")
    _training(p, steps=400, batch=32)
    p.set_defaults(run=run_bon_distill_command)

    p = lab_sub.add_parser("regress", help="A*-PO or QRPO: regression to pi*, checked against the exact target",
                           description="Train a tabular policy by least squares of beta log(pi/pi_ref) onto r - V* (A*-PO, V* exact or from "
                           "reference samples) or onto the quantile reward minus beta log Z (QRPO, log Z in closed form).")
    p.add_argument("--method", choices=REGRESSION_METHODS, default="qrpo", help="(default qrpo)")
    p.add_argument("--vocab", type=int, default=3, help="vocabulary size (default 3)")
    p.add_argument("--length", type=int, default=2, help="sequence length (default 2)")
    p.add_argument("--contexts", type=int, default=2, help="number of contexts (default 2)")
    p.add_argument("--levels", type=int, default=0, help="rewards floor(levels * U) (ties); 0 = U itself (default 0)")
    p.add_argument("--beta", type=float, default=0.5, help="KL coefficient (default 0.5)")
    p.add_argument("--sampling", choices=["reference", "policy"], default="reference", help="qrpo: completions to regress on (default reference)")
    p.add_argument("--value-samples", type=int, default=0, help="apo: reference samples for V*; 0 = the exact V* (default 0)")
    _training(p, steps=300, batch=32)
    p.set_defaults(run=run_regress_command)


def _training(p: argparse.ArgumentParser, *, steps: int, batch: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimisation steps (default {steps})")
    p.add_argument("--batch", type=int, default=batch, help=f"samples (or pairs) per step (default {batch})")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the logits (default 0.05)")
    p.add_argument("--seed", type=int, default=1, help="seed of the world and of sampling (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _print(report: dict, title: str, target: str) -> None:
    print(f"\n{title}\n")
    rows = [("KL(. || pi_ref)", report["kl_ref"], report["target_kl_ref"]), ("win rate against pi_ref", report["win_rate"], report["target_win_rate"])]
    print(table(["quantity", "policy pi", f"target {target}"], rows))
    print(f"\nKL({target} || pi) = {report['kl_target_policy']:.2e} (from {report['start_kl_target_policy']:.3g} at pi_ref)   "
          f"KL(pi || {target}) = {report['kl_policy_target']:.2e}   max |log pi - log {target}| = {report['max_abs_logprob_diff']:.2e}")


def run_bon_distill_command(args: argparse.Namespace) -> int:
    import torch

    from tilt.lab.bon_distill import run_bon_distill_lab

    torch.set_num_threads(1)
    report = run_bon_distill_lab(args.method, responses=args.responses, levels=args.levels, n=args.n, steps=args.steps, batch=args.batch,
                                 lr=args.lr, seed=args.seed, jeffreys_weight=args.jeffreys_weight, alpha=args.alpha)
    if args.json:
        print_json(report)
        return 0
    _print(report, f"{args.method} toward best-of-{args.n} of pi_ref ({args.steps} steps of {args.batch})", "pi_BoN")
    print(f"continuous-limit closed forms: KL = log N - (N-1)/N = {report['kl_closed_form']:.4f}, win rate N/(N+1) = "
          f"{report['win_rate_closed_form']:.4f} (ties make pi_BoN's own values smaller)")
    return 0


def run_regress_command(args: argparse.Namespace) -> int:
    import torch

    from tilt.lab.bon_distill import run_regression_lab

    torch.set_num_threads(1)
    report = run_regression_lab(args.method, vocab=args.vocab, length=args.length, contexts=args.contexts, levels=args.levels, beta=args.beta,
                                steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, sampling=args.sampling,
                                value_samples=args.value_samples)
    if args.json:
        print_json(report)
        return 0
    _print(report, f"{args.method} toward pi* at beta = {args.beta} ({args.steps} steps of {args.batch})", "pi*")
    return 0
