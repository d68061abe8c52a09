"""``tilt frontier``: the KL–win-rate frontier of a task, from reference samples alone (docs/frontier.md)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tilt.cli.output import table


def add_parser(sub) -> None:
    p = sub.add_parser(
        "frontier",
        help="the best achievable win rate against the reference at each KL, from reference samples alone",
        description="Draw --samples completions of each prompt from the reference model, score them once, and compute, "
        "exactly on each prompt's empirical reference distribution, the win rate against the reference and the mean "
        "reward as functions of KL(pi || ref) for best-of-N, the tilt by the reward, and the tilt by the calibrated "
        "reward (the best achievable win rate at each KL, WR*), with bootstrap intervals and the ESS. Saves "
        "frontier.json (read by `tilt eval --frontier`) and a plot. See docs/frontier.md.",
        epilog="Example: tilt frontier --model embedded --reward sentiment --limit 100 --samples 32 --max-new-tokens 24 --out frontier.json",
    )
    p.add_argument("--model", default="embedded", metavar="PATH", help="the reference model: a from_pretrained folder or 'embedded' (default)")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="held-out prompts (JSONL/CSV/Parquet with a 'prompt' column; default: the shipped held-out openings)")
    p.add_argument("--limit", type=int, default=0, metavar="P", help="use only the first P prompts (default: all)")
    p.add_argument("--reward", action="append", metavar="SPEC", default=None, help="reward spec as in tilt eval (default: sentiment)")
    p.add_argument("--samples", type=int, default=32, metavar="M", help="reference samples per prompt, m (default 32; the frontier "
                   "is resolved up to KL log(m) - 1)")
    p.add_argument("--max-new-tokens", type=int, default=24, metavar="T", help="completion length limit (default 24); use the "
                   "evaluation's own")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="sequences per sampling call (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference samples and of the bootstrap (default 0)")
    p.add_argument("--resamples", type=int, default=500, help="bootstrap resamples (default 500)")
    p.add_argument("--level", type=float, default=0.95, help="coverage of the intervals (default 0.95)")
    p.add_argument("--from-rewards", metavar="FILE", default=None,
                   help="skip sampling: recompute from the reference rewards of an earlier frontier.json")
    p.add_argument("--out", default="frontier.json", metavar="FILE", help="where to write the frontier (default frontier.json)")
    p.add_argument("--plot", default=None, metavar="PNG", help="where to save the plot (default: next to --out, .png)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off by default)")
    p.set_defaults(run=run_frontier)


def run_frontier(args: argparse.Namespace) -> int:
    import torch

    from tilt.frontier import Frontier, FrontierConfig, draw_reference_rewards, frontier_from_rewards, plot_frontier, task_prompts

    config = FrontierConfig(num_resamples=args.resamples, level=args.level, seed=args.seed)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: folder not found: {str(out.parent)!r}")
    start = time.perf_counter()
    if args.from_rewards:
        old = Frontier.load(args.from_rewards)
        rewards, prompts, meta = torch.tensor(old.data["ref_rewards"], dtype=torch.float64), old.data["prompts"], dict(old.data["meta"])
        meta = {k: v for k, v in meta.items() if k in ("model", "reward", "max_new_tokens", "sample_seed", "sampling_seconds")}
    else:
        from tilt.cli.evaluate import _load_policy, _reward
        from tilt.engine.hf import SamplingConfig

        reward_specs = args.reward or ["sentiment"]
        reward_fn = _reward(reward_specs, trust_remote_code=args.trust_remote_code)
        ref = _load_policy(args.model, SamplingConfig(max_new_tokens=args.max_new_tokens), trust_remote_code=args.trust_remote_code)
        if args.prompts:
            from tilt.data import DataConfig, load_data

            prompts = [r["prompt"] for r in load_data(args.prompts, DataConfig(fmt="prompts"), tokenizer=ref.tokenizer).rows]
        else:
            prompts = task_prompts("heldout")
        if args.limit:
            prompts = prompts[: args.limit]
        from tqdm import tqdm

        with tqdm(total=len(prompts) * args.samples, unit="seq", desc="reference samples", file=sys.stderr, disable=None, leave=False) as bar:
            rewards = draw_reference_rewards(ref, prompts, args.samples, reward_fn, seed=args.seed, batch_size=args.batch_size,
                                             progress=bar.update)
        meta = {"model": args.model, "reward": reward_specs if len(reward_specs) > 1 else reward_specs[0],
                "max_new_tokens": args.max_new_tokens, "sample_seed": args.seed, "sampling_seconds": time.perf_counter() - start}
    frontier = frontier_from_rewards(rewards, config, meta=meta, prompts=prompts)
    frontier.save(out)
    plot = plot_frontier(frontier, args.plot or out.with_suffix(".png"))
    m = frontier.data["meta"]
    print(f"\nFrontier of {m['prompts']} prompts x {m['samples_per_prompt']} reference samples "
          f"(reward {m.get('reward', '?')}; {100 * m['tie_fraction']:.0f}% of sample pairs tie; "
          f"reference mean reward {m['ref_reward_mean']:.3f}); {round(100 * m['level'])}% bootstrap intervals\n")
    print(table(*frontier.table()))
    print(f"\nWR* is the calibrated tilt: the most win rate any policy gets at that KL. Past KL {frontier.reach_kl:.2f} "
          f"(log m - 1) the m samples cannot resolve the frontier, and it is under-stated there.")
    print(f"written {out} and {plot} in {time.perf_counter() - start:.0f} s")
    return 0
