"""``tilt lab path``: the path an optimizer takes from pi_ref, exactly, against the frontier (docs/frontier.md, "Why
trained policies sit off the frontier")."""
from __future__ import annotations

import argparse

from tilt.cli.output import print_json, table

HELP = {
    "vocab": "vocabulary size V",
    "length": "sequence length L (the support has V^L sequences per context)",
    "contexts": "number of contexts, each with its own reference",
    "scale": "sd of the reference's logits (larger: more peaked next-token distributions)",
    "reward": "count:K, contains:K or random (tilt.lab.world.reward_table)",
    "reward_seed": "seed of a random reward",
    "seed": "seed of the reference logits and of sampling",
    "optimizer": "sgd (the plain gradient), adam, or natural (F^-1 g, exact for the tabular Fisher)",
    "lr": "step size on the logits; 0: the optimizer's default (tilt.lab.path.DEFAULT_PATH_LR)",
    "beta": "KL coefficient of the objective E[r] - beta KL; 0: pure reward ascent",
    "samples": "0: the exact expected gradient; n >= 2: the REINFORCE estimate of n samples per context",
    "max_kl": "stop once KL(pi || pi_ref) passes this (nats)",
    "max_steps": "stop after this many steps",
}
"""One line of help per field of ``tilt.lab.path.PathConfig`` (a test keeps the two equal)."""


def add_lab_parsers(lab_sub) -> None:
    from tilt.runs.config import class_fields, module_constant

    p = lab_sub.add_parser(
        "path", help="the path of SGD, Adam or the natural gradient from pi_ref, read against the exact frontier",
        description=__doc__ + " Prints the win rate and mean reward along the path at fixed KLs, the frontier's there, and "
        "the efficiency of each; the natural gradient stays on the reward tilt, the plain gradient and Adam do not.")
    optimizers = module_constant("tilt.lab.path", "OPTIMIZERS")
    for spec in class_fields("tilt.lab.path:PathConfig"):
        kind = {"int": int, "float": float, "str": str}[spec.type]
        extra = {"choices": list(optimizers)} if spec.name == "optimizer" else {}
        p.add_argument("--" + spec.name.replace("_", "-"), type=kind, default=spec.default,
                       help=f"{HELP[spec.name]} (default {spec.default})", **extra)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_path)


def run_path(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    from tilt.lab.path import PathConfig, exact_path

    torch.set_num_threads(1)  # a table of logits: threads only add overhead
    config = PathConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PathConfig)})
    report = exact_path(config)
    if args.json:
        print_json({**{k: v for k, v in report.items() if k not in ("kl", "win_rate", "reward")},
                    "path": {k: report[k].tolist() for k in ("kl", "win_rate", "reward")}})
        return 0
    gradient = "exact expected gradient" if config.samples == 0 else f"REINFORCE estimate of {config.samples} samples per context"
    print(f"\n{config.optimizer} at lr {report['lr']:g}, {gradient}, beta {config.beta:g}: {report['steps']} steps to KL "
          f"{report['kl'][-1].item():.3f}; V {config.vocab}, L {config.length}, {config.contexts} contexts, logit sd {config.scale:g}, "
          f"reward {config.reward}\n")
    rows = [[f"{kl:g}", r["win_rate"], r["frontier_win_rate"], r["efficiency"], r["reward"], r["frontier_reward"], r["reward_efficiency"]]
            for kl, r in report["read_off"].items()]
    print(table(["KL", "win rate", "WR* (calibrated tilt)", "efficiency", "mean reward", "R* (reward tilt)", "reward efficiency"], rows))
    if report["diverged_at"] is not None:
        print(f"\nthe logits overflowed at step {report['diverged_at']}: the path ends before it (a smaller --lr, or more --samples)")
    print(f"\nfirst step's efficiency (Fisher cosine, g'd / sqrt(d'F d g'F^-1 g)): {report['small_kl_efficiency']:.3f}   "
          f"(1: the natural gradient; NaN: KL not reached)")
    return 0
