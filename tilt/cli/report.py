"""``tilt report RUN_DIR [--compare RUN_DIR ...]``: PNG plots and one HTML page per report: reward and KL over
training with smoothed lines and bands, the posterior diagnostics, the plots of the run's recipe (every recipe and
pipeline), win rate against KL across evaluations and runs, and samples before and after training. Prints the path of
the HTML page."""
from __future__ import annotations

import argparse

from tilt.cli.output import print_json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="an HTML page of plots and numbers: reward, KL, posterior diagnostics, the recipe's metrics, evaluations, samples",
        description="Read a run directory (metrics.jsonl, samples.jsonl, config.yaml, evals.jsonl, summary.json; a pipeline "
        "run stage by stage) and write PNG plots and report.html: reward and KL over steps (moving average with a band "
        "of one rolling standard deviation), the posterior diagnostics (log Z, KL both ways, TV, JS with intervals, ESS "
        "fraction), the plots of the run's recipe (KL-RL/CTRL, DPG, DPO, online DPO/XPO, reward model, pipelines), win "
        "rate against KL across evaluations, and the completions of the first logged step next to those of the last. "
        "With --compare, runs of the same reward share each plot (for example a sweep over beta); runs of different "
        "rewards are flagged and drawn apart. See docs/eval_and_sample.md.",
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
