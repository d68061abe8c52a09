"""The ``tilt`` command. Each command group lives in its own module and adds its parser here; only the module of
the command being run is imported (``tilt --help`` imports none of them, and no module imports torch or
transformers before its command runs)."""
from __future__ import annotations

import argparse
import importlib
import sys

from tilt.cli.output import run_parsed

GROUPS = {
    "train": ("tilt.cli.train", "add_parser", "train a model from a YAML config, in a run directory you can stop and resume"),
    "lab": ("tilt.cli.lab", "add_parser", "exact experiments in small enumerable worlds"),
    "eval": ("tilt.cli.evaluate", "add_eval_parser", "reward, KL to a reference and win rate against it, with confidence intervals"),
    "report": ("tilt.cli.report", "add_parser", "plots and an HTML page of one or more run directories"),
    "infalign": ("tilt.cli.infalign", "add_parser", "inference-aware alignment: KL and win rates of calibrated tilts, and tuning t"),
    "data": ("tilt.cli.data", "add_parser", "check training data files"),
    "demo": ("tilt.cli.demo", "add_parser", "align the embedded model toward positive reviews and show before/after"),
    "sample": ("tilt.cli.evaluate", "add_sample_parser", "sample completions: plain, best-of-N, worst-of-N, quasi-rejection, importance resampling, MH or SMC"),
    "frontier": ("tilt.cli.frontier", "add_parser", "the best win rate and reward at each KL from reference samples (the KL-win-rate frontier)"),
}
"""Command -> (module, the function that adds its parser, one-line help)."""


def _chosen(argv: list[str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token if token in GROUPS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the full parser of the command named in ``argv`` (all of them when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="tilt",
        description="Align language models by treating fine-tuning as Bayesian inference toward the tilted target "
        "pi*(y|x) ∝ pi_ref(y|x) exp(Phi(r(x,y))/beta).",
        epilog="Start with `tilt lab kl-rl`: a small world where the target is known exactly.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen(argv) if argv is not None else None
    for name, (module, adder, help_text) in GROUPS.items():
        if argv is None or name == chosen:
            adder_fn = getattr(importlib.import_module(module), adder)
            adder_fn(sub, argv) if name == "train" else adder_fn(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_fields", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.fields = rest
    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
