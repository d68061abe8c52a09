"""``tilt report RUN_DIR [--compare RUN_DIR ...]``: plots of reward, KL and their trade-off (PNG), and an HTML page
with the plots and samples before and after training. Prints the path of the HTML page."""
from __future__ import annotations

import argparse

from tilt.cli.output import print_json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="plots of reward, KL and their trade-off, and an HTML page with samples before and after training",
        description="Read RUN_DIR/metrics.jsonl (one JSON object per step) and RUN_DIR/samples.jsonl, write reward.png, "
        "kl.png, tradeoff.png (reward against KL) and, when the run logs win rates, win_rate.png (win rate against KL), "
        "then report.html with the plots embedded, a summary, and the completions of the first logged step next to "
        "those of the last. With --compare, every run goes on the same plots (for example a sweep over beta).",
        epilog="Example: tilt report runs/beta-0.05 --compare runs/beta-0.1 runs/beta-0.2",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by training")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR", help="other runs to draw on the same plots")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write the report (default RUN_DIR/report)")
    p.add_argument("--max-prompts", type=int, default=20, metavar="N", help="prompts shown in the sample tables (default 20)")
    p.add_argument("--json", action="store_true", help="print {html, plots} as JSON instead of the path alone")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from tilt.report import build_report

    if args.max_prompts < 0:
        raise ValueError(f"--max-prompts must be >= 0, got {args.max_prompts}")
    page, plots = build_report(args.run_dir, args.compare, out_dir=args.out, max_prompts=args.max_prompts)
    if args.json:
        print_json({"html": str(page), "plots": {name: str(path) for name, path in plots.items()}})
    else:
        print(page)
    return 0
