"""``tilt infalign``: the calibrated-space analytic tool of inference-aware alignment (digest §5(b)), and
``tilt lab ctrl``: calibrate-and-transform RL in the tabular lab, checked exactly (digest §5(e) E4.5)."""
from __future__ import annotations

import argparse

from tilt.cli.output import print_json, table

PROCEDURE_NAMES = {"bon": "best-of-N", "won": "worst-of-N"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "infalign",
        help="inference-aware alignment: KL and win rates of calibrated tilts, and tuning t",
        description=__doc__,
    )
    ia_sub = p.add_subparsers(dest="infalign_command", metavar="COMMAND", required=True)

    a = ia_sub.add_parser(
        "analyze",
        help="KL and standard / inference-time win rates of pi ∝ pi_ref exp(Phi(C)/beta), beta solved for a KL budget",
        description="In calibrated space (u = C ~ Uniform[0,1] under pi_ref), solve beta so that KL(pi||pi_ref) = --kl "
        "for pi ∝ pi_ref exp(Phi(u)/beta), and print the standard and inference-time win rates by quadrature.",
    )
    _procedure_options(a)
    a.add_argument("--transform", choices=["identity", "exp", "probit"], default="exp",
                   help="Phi: identity (calibrated RLHF), exp (exp(t u) for bon, -exp(-t u) for won), or probit "
                   "(plain RLHF on a reward that is normal under pi_ref). Default exp")
    a.add_argument("--t", type=float, default=None, help="t of the exp transform; omitted: tuned for --n and --kl")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a.set_defaults(run=run_analyze)

    t = ia_sub.add_parser(
        "tune-t",
        help="the t of the exp transform that maximises the inference-time win rate at a KL budget",
        description="Search t (log grid on [0.05, 1000], then golden section) maximising the inference-time win rate "
        "of the procedure's exponential transform at KL(pi||pi_ref) = --kl, and compare with the identity.",
    )
    _procedure_options(t)
    t.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    t.set_defaults(run=run_tune_t)


def _procedure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--procedure", choices=["bon", "won"], default="bon", help="inference procedure: best-of-N or worst-of-N (default bon)")
    p.add_argument("--n", type=int, default=4, help="N samples of the procedure (default 4)")
    p.add_argument("--kl", type=float, default=0.5, help="KL(pi || pi_ref) budget in nats (default 0.5)")


def _check(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if not args.kl > 0:
        raise ValueError(f"--kl must be > 0, got {args.kl}")


def run_analyze(args: argparse.Namespace) -> int:
    import torch
    from tilt.infalign import analyze
    from tilt.infalign import inference_key
    from tilt.infalign import paper_scale_beta
    from tilt.infalign import procedure_transform
    from tilt.infalign import tune_t

    torch.set_num_threads(1)  # vectors of 2^15 points: one thread is fastest
    _check(args)
    t = args.t
    if args.transform == "exp" and t is None:
        t = tune_t(args.procedure, args.n, args.kl).t
    metrics = analyze(procedure_transform(args.procedure, args.transform, t), args.n, args.kl)
    report = {
        "procedure": args.procedure,
        "n": args.n,
        "transform": args.transform,
        "t": t if args.transform == "exp" else None,
        "kl_budget": args.kl,
        "beta_paper_scale": paper_scale_beta(args.procedure, args.transform, t, metrics["beta"]),
        "win_rate_inference": metrics[inference_key(args.procedure)],
        **metrics,
    }
    if args.json:
        print_json(report)
        return 0
    name = PROCEDURE_NAMES[args.procedure]
    print(f"\n{args.transform} transform{'' if t is None else f' (t = {t:.4g})'}, {name} with N = {args.n}, KL budget {args.kl}\n")
    rows = [
        ("beta (Phi mapped onto [0, 1])", report["beta"]),
        ("beta (the paper's Phi)", report["beta_paper_scale"]),
        ("KL(pi || pi_ref)", report["kl"]),
        ("standard win rate  pi vs pi_ref", report["win_rate_standard"]),
        (f"inference win rate  {name}(pi) vs {name}(pi_ref)", report["win_rate_inference"]),
        ("best-of-N(pi) vs best-of-N(pi_ref)", report["win_rate_bon"]),
        ("worst-of-N(pi) vs worst-of-N(pi_ref)", report["win_rate_won"]),
    ]
    print(table(["quantity", "value"], rows))
    return 0


def run_tune_t(args: argparse.Namespace) -> int:
    import torch
    from tilt.infalign import analyze
    from tilt.infalign import inference_key
    from tilt.infalign import paper_scale_beta
    from tilt.infalign import procedure_transform
    from tilt.infalign import tune_t

    torch.set_num_threads(1)
    _check(args)
    tuned = tune_t(args.procedure, args.n, args.kl)
    key = inference_key(args.procedure)
    identity = analyze(procedure_transform(args.procedure, "identity"), args.n, args.kl)
    report = {
        "procedure": args.procedure,
        "n": args.n,
        "kl_budget": args.kl,
        "t": tuned.t,
        "beta": tuned.beta,
        "beta_paper_scale": paper_scale_beta(args.procedure, "exp", tuned.t, tuned.beta),
        "kl": tuned.metrics["kl"],
        "win_rate_inference": tuned.win_rate_inference,
        "win_rate_standard": tuned.metrics["win_rate_standard"],
        "identity_win_rate_inference": identity[key],
        "gain_over_identity": tuned.win_rate_inference - identity[key],
        "at_search_edge": tuned.at_search_edge,
    }
    if args.json:
        print_json(report)
        return 0
    name = PROCEDURE_NAMES[args.procedure]
    print(f"\n{name} with N = {args.n} at KL {args.kl}: t = {tuned.t:.4g}" + ("  (edge of the search: a larger t may do better)" if tuned.at_search_edge else ""))
    print(table(["transform", f"{name} win rate", "standard win rate"], [
        (f"exp, t = {tuned.t:.4g}", tuned.win_rate_inference, tuned.metrics["win_rate_standard"]),
        ("identity (calibrated RLHF)", identity[key], identity["win_rate_standard"]),
    ]))
    return 0


def add_lab_parsers(lab_sub) -> None:
    from tilt.runs.config import module_constant

    CTRL_BATCH, CTRL_LR, CTRL_STEPS = (module_constant("tilt.lab.ctrl", n) for n in ("CTRL_BATCH", "CTRL_LR", "CTRL_STEPS"))

    p = lab_sub.add_parser(
        "ctrl",
        help="calibrate-and-transform RL on one prompt with K tabular responses, inference-time win rate exact",
        description="One prompt, K responses (Dirichlet(1) reference, normal reward). Calibrate with m reference "
        "samples, transform, choose beta so the exact tilted policy has the KL budget, train with the KL-regularised "
        "recipe, and compare the exact inference-time win rate with the exact tilted policy and the analytic tool.",
    )
    p.add_argument("--responses", type=int, default=200, help="number K of responses (default 200)")
    p.add_argument("--procedure", choices=["bon", "won"], default="bon", help="best-of-N or worst-of-N (default bon)")
    p.add_argument("--n", type=int, default=4, help="N of the procedure (default 4)")
    p.add_argument("--kl", type=float, default=0.5, help="KL budget; beta is solved to match it (default 0.5)")
    p.add_argument("--transform", choices=["identity", "raw", "exp"], default="exp",
                   help="identity (calibrated RLHF), raw (plain KL-RL on the raw reward) or exp (CTRL). Default exp")
    p.add_argument("--t", type=float, default=None, help="t of the exp transform; omitted: tuned analytically")
    p.add_argument("--calibration-samples", type=int, default=256, help="m reference samples for calibration (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the calibration and training (default 0)")
    p.add_argument("--steps", type=int, default=CTRL_STEPS, help=f"training steps (default {CTRL_STEPS})")
    p.add_argument("--batch", type=int, default=CTRL_BATCH, help=f"samples per step (default {CTRL_BATCH})")
    p.add_argument("--lr", type=float, default=CTRL_LR, help=f"Adam learning rate, decayed linearly to 0 (default {CTRL_LR})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_ctrl_command)


def run_ctrl_command(args: argparse.Namespace) -> int:
    import torch
    from tilt.lab.ctrl import run_ctrl_lab

    torch.set_num_threads(1)  # tiny tabular ops: more threads only add contention
    report = run_ctrl_lab(
        responses=args.responses,
        procedure=args.procedure,
        n=args.n,
        kl=args.kl,
        transform=args.transform,
        t=args.t,
        calibration_samples=args.calibration_samples,
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        progress=not args.json,
    )
    if args.json:
        print_json(report)
        return 0
    name = PROCEDURE_NAMES[args.procedure]
    t = "" if report["t"] is None else f", t = {report['t']:.4g}"
    print(f"\n{args.transform} transform{t}, {name} with N = {args.n}, {args.responses} responses, beta = {report['beta']:.4g} "
          f"(KL budget {args.kl}), {args.steps} steps, {report['seconds']:.1f} s\n")
    rows = [
        ("KL(. || pi_ref)", report["kl"], report["target_kl"], report["analytic_kl"]),
        ("standard win rate", report["win_rate_standard"], report["target_win_rate_standard"], report["analytic_win_rate_standard"]),
        (f"{name} win rate", report["win_rate_inference"], report["target_win_rate_inference"], report["analytic_win_rate_inference"]),
    ]
    print(table(["quantity", "learned pi", "exact tilted pi", f"analytic ({report['analytic_transform']})"], rows))
    print(f"\nKL(tilted || learned) = {report['kl_target_policy']:.2e}")
    return 0
