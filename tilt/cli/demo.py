"""``tilt demo``: align the embedded SmolLM2-135M-Instruct toward positive reviews, and show what changed.

KL-regularised RL (REINFORCE with a leave-one-out baseline) with a VADER sentiment reward on short review
openings; before and after training, on held-out openings: mean reward, KL to the reference and win rate
against the reference, each with a 95% bootstrap interval; three sample pairs; a report in the run directory.
Sized for about 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import textwrap
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tilt import runs
from tilt.cli.output import table
from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.loading import load_model_and_tokenizer
from tilt.evaluation import EvalConfig, evaluate
from tilt.recipes import kl_rl
from tilt.report import build_report
from tilt.reward_fns import reward_from_spec


def demo_prompts() -> list[str]:
    """The shipped review openings (32): the first 24 train, the last 8 are held out for evaluation."""
    text = (Path(__file__).resolve().parent.parent / "assets" / "review_openings.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="align the embedded model toward positive reviews and show before/after",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="model folder or 'embedded' (default: SmolLM2-135M-Instruct, shipped)")
    p.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (default 0.05)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="(default 4)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="(default 4)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="completion length limit (default 20)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt, per side, in evaluation (default 4)")
    p.add_argument("--run-dir", default=None, help="where to write the run (default runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_demo)


def _ci(m: dict, key: str) -> str:
    low, high = m[f"{key}_ci"]
    return f"{m[key]:.3f}  [{low:.3f}, {high:.3f}]"


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    prompts = demo_prompts()
    train_prompts, held_out = prompts[:24], prompts[24:]
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")

    print(f"[1/5] loading {args.model!r} (the first use converts the shipped GGUF file once, ~30-60 s)", flush=True)
    model, tokenizer = load_model_and_tokenizer(args.model)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    policy, ref = HFPolicy(model, tokenizer, sampling), HFPolicy(ref_model, tokenizer, sampling)
    reward = reward_from_spec("sentiment")
    eval_config = EvalConfig(samples_per_prompt=args.eval_samples, seed=args.seed)
    config = kl_rl.KLRLConfig(beta=args.beta, steps=args.steps, prompts_per_step=args.prompts_per_step,
                              samples_per_prompt=args.samples_per_prompt, lr=args.lr, seed=args.seed)

    print(f"[2/5] evaluating the reference on {len(held_out)} held-out openings", flush=True)
    before = evaluate(eval_config, ref, ref, reward, held_out)
    initial = [{"step": 0, "prompt": p, "completion": c, "reward": float(r)}
               for p, cs, rs in zip(held_out, before.policy.completions, before.policy.rewards.tolist()) for c, r in zip(cs, rs)]
    resolved = {"recipe": "kl-rl (demo)", "model": args.model, "reward": "sentiment", "prompts": "tilt/assets/review_openings.jsonl",
                "max_new_tokens": args.max_new_tokens, **kl_rl.config_dict(config)}
    run = runs.create_run(run_dir, resolved, initial_samples=initial)

    print(f"[3/5] training {args.steps} steps of KL-regularised RL (beta {args.beta}), "
          f"{args.prompts_per_step} x {args.samples_per_prompt} completions per step", flush=True)
    bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True)

    def log(step: int, metrics: dict) -> None:
        runs.append_jsonl(run / "metrics.jsonl", {"step": step + 1, **metrics})
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl_ref']:.3f}")
        bar.update()

    kl_rl.train(config, policy, ref, reward, train_prompts, on_step=log)
    bar.close()

    print("[4/5] evaluating the trained policy against the reference", flush=True)
    after = evaluate(eval_config, policy, ref, reward, held_out)
    for p, cs, rs in zip(held_out, after.policy.completions, after.policy.rewards.tolist()):
        for c, r in zip(cs, rs):
            runs.append_jsonl(run / "samples.jsonl", {"step": args.steps, "prompt": p, "completion": c, "reward": float(r)})
    for name, ev in (("before", before), ("after", after)):
        runs.append_jsonl(run / "evals.jsonl", {"step": 0 if name == "before" else args.steps, "name": name, **ev.metrics})

    print("[5/5] writing the trained model and the report", flush=True)
    runs.save_final(run, model, tokenizer)
    page, _ = build_report(run)

    rows = [
        ("mean reward (VADER compound, -1..1)", _ci(before.metrics, "reward_mean"), _ci(after.metrics, "reward_mean")),
        ("KL(pi || pi_ref), nats", _ci(before.metrics, "kl_ref"), _ci(after.metrics, "kl_ref")),
        ("win rate against pi_ref", _ci(before.metrics, "win_rate"), _ci(after.metrics, "win_rate")),
    ]
    print(f"\nOn {len(held_out)} held-out openings, {args.eval_samples} samples each per side (95% bootstrap intervals):\n")
    print(table(["", "before (the reference)", f"after {args.steps} steps"], rows))
    print("\nThree openings, one sample before and after (same opening, same random seed):\n")
    for i in range(3):
        b, a = before.policy.completions[i][0], after.policy.completions[i][0]
        rb, ra = before.policy.rewards[i][0].item(), after.policy.rewards[i][0].item()
        print(f"  {held_out[i]!r}")
        print(textwrap.indent(textwrap.fill(f"before ({rb:+.2f}): {b.strip()}", 100), "    "))
        print(textwrap.indent(textwrap.fill(f"after  ({ra:+.2f}): {a.strip()}", 100), "    "))
    print(f"\nRun directory: {run}   (model in {run / 'final'})")
    print(f"Report: {page}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0
