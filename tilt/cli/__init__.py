"""The ``tilt`` command. Each command group lives in its own module and adds its parser here."""
from __future__ import annotations

import argparse
import sys

from tilt.cli import data, demo, evaluate, frontier, infalign, lab, report, train
from tilt.cli.output import run_parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilt",
        description="Align language models by treating fine-tuning as Bayesian inference toward the tilted target "
        "pi*(y|x) ∝ pi_ref(y|x) exp(Phi(r(x,y))/beta).",
        epilog="Start with `tilt lab kl-rl`: a small world where the target is known exactly.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.add_parser(sub)
    lab.add_parser(sub)
    evaluate.add_parser(sub)
    report.add_parser(sub)
    infalign.add_parser(sub)
    data.add_parser(sub)
    demo.add_parser(sub)
    frontier.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
