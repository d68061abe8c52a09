"""The ``tilt`` command. Each command group lives in its own module and adds its parser here; only the module of
the command being run is imported (``tilt --help`` imports none of them, and no module imports torch or
transformers before its command runs)."""
from __future__ import annotations

import argparse
import importlib
import sys

from tilt.cli.output import run_parsed

GROUPS = {
    "train": ("tilt.cli.train", "train a model from a YAML config, in a run directory you can stop and resume"),
    "lab": ("tilt.cli.lab", "small exact worlds where pi* is known: check a method against the truth"),
    "eval": ("tilt.cli.evaluate", "evaluate a policy against a reference: reward, KL, win rate, distance to pi*"),
    "report": ("tilt.cli.report", "an HTML report of a run directory"),
    "infalign": ("tilt.cli.infalign", "InfAlign's analytic tool: tune t, analyse a transform, the CTRL lab"),
    "data": ("tilt.cli.data", "check a data file the way training would read it"),
    "demo": ("tilt.cli.demo", "align the embedded model toward positive reviews and show before/after"),
}
"""Command -> (module that adds its parser, one-line help)."""


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
    for name, (module, help_text) in GROUPS.items():
        if argv is None or name == chosen:
            importlib.import_module(module).add_parser(sub)
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
