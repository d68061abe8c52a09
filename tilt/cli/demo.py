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

from tilt.runs import directory as runs
from tilt.cli.output import table
from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.loading import load_model_and_tokenizer
from tilt.evaluation import EvalConfig, evaluate
from tilt.recipes import kl_rl
from tilt.report import build_report, show_divergence
from tilt.reward_fns import reward_from_spec


def demo_prompts() -> list[str]:
    """The shipped review openings (32): the first 24 train, the last 8 are held out for evaluation."""
    text = (Path(__file__).resolve().parent.parent / "assets" / "review_openings.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="align the embedded model toward positive reviews and show before/after",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="model folder or 'embedded' (default: SmolLM2-135M-Instruct, shipped)")
    p.add_argument("--steps", type=int, default=24, help="training steps (default 24)")
    p.add_argument("--beta", type=float, default=0.1, help="KL coefficient (default 0.1)")
    p.add_argument("--kl-budget", type=float, default=4.0,
                   help="KL(pi || pi_ref) budget in nats: training stops at the first evaluation whose KL estimate exceeds it, "
                        "and the demo keeps the policy of the evaluation before (default 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--evals", type=int, default=6, help="evaluations during training, evenly spaced (default 6)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="(default 4)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="(default 4)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="completion length limit (default 16)")
    p.add_argument("--eval-samples", type=int, default=12, help="samples per held-out prompt, per side, in evaluation (default 12)")
    p.add_argument("--run-dir", default=None, help="where to write the run (default runs/demo-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_demo)


class OverBudget(Exception):
    """Raised from the step hook to stop training once the KL estimate exceeds the budget."""


def _ci(m: dict, key: str) -> str:
    low, high = m[f"{key}_ci"]
    return f"{m[key]:.3f}  [{low:.3f}, {high:.3f}]"


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    prompts = demo_prompts()
    train_prompts, held_out = prompts[:24], prompts[24:]
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")

    print(f"[1/4] loading {args.model!r} (the first use converts the shipped GGUF file once, ~30-60 s)", flush=True)
    model, tokenizer = load_model_and_tokenizer(args.model)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    policy, ref = HFPolicy(model, tokenizer, sampling), HFPolicy(ref_model, tokenizer, sampling)
    reward = reward_from_spec("sentiment")
    eval_config = EvalConfig(samples_per_prompt=args.eval_samples, seed=args.seed)
    config = kl_rl.KLRLConfig(beta=args.beta, steps=args.steps, prompts_per_step=args.prompts_per_step,
                              samples_per_prompt=args.samples_per_prompt, lr=args.lr, seed=args.seed)

    resolved = {"recipe": "kl-rl (demo)", "model": args.model, "reward": "sentiment", "prompts": "tilt/assets/review_openings.jsonl",
                "max_new_tokens": args.max_new_tokens, **kl_rl.config_dict(config)}
    run = runs.create_run(run_dir, resolved)

    eval_steps = sorted({max(1, round(args.steps * (i + 1) / args.evals)) for i in range(args.evals)})
    print(f"[2/4] training {args.steps} steps of KL-regularised RL (beta {args.beta}), "
          f"{args.prompts_per_step} x {args.samples_per_prompt} completions per step", flush=True)
    print(f"      evaluated on {len(held_out)} held-out openings at steps {', '.join(map(str, eval_steps))}; "
          f"training stops early if the KL estimate exceeds the budget of {args.kl_budget} nats", flush=True)
    bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True)
    trajectory: list[tuple[int, dict]] = []  # (step, evaluation metrics)
    latest: dict = {}

    def log(step: int, metrics: dict) -> None:
        done = step + 1
        runs.append_jsonl(run / "metrics.jsonl", {"step": done, **metrics})
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl_ref']:.3f}")
        bar.update()
        if done in eval_steps:
            ev = evaluate(eval_config, policy, ref, reward, held_out)  # samples both sides: the reference's are "before"
            trajectory.append((done, ev.metrics))
            runs.append_jsonl(run / "evals.jsonl", {"step": done, "model": f"the policy at step {done}", "ref": args.model,
                                                    "reward": "sentiment", **ev.metrics})
            if ev.metrics["kl_ref"] > args.kl_budget:
                raise OverBudget(done)
            # the newest policy within the budget is the one the demo keeps
            latest.update(evaluation=ev, step=done, state={k: v.detach().clone() for k, v in model.state_dict().items()})

    try:
        kl_rl.train(config, policy, ref, reward, train_prompts, on_step=log)
        stopped = ""
    except OverBudget as over:
        if "state" not in latest:
            raise ValueError(f"the first evaluation (step {over.args[0]}) is already over the KL budget of {args.kl_budget} "
                             "nats: raise --kl-budget or --beta, or lower --lr") from None
        model.load_state_dict(latest["state"])
        stopped = (f" (at step {over.args[0]} the KL estimate exceeded the {args.kl_budget}-nat budget: "
                   f"kept the policy of step {latest['step']})")
    bar.close()
    after, last_step = latest["evaluation"], latest["step"]
    for step, draws in ((0, after.ref), (last_step, after.policy)):
        for p, cs, rs in zip(held_out, draws.completions, draws.rewards.tolist()):
            for c, r in zip(cs, rs):
                runs.append_jsonl(run / "samples.jsonl", {"step": step, "prompt": p, "completion": c, "reward": float(r)})

    print("[3/4] writing the trained model and the report", flush=True)
    runs.save_final(run, model, tokenizer)
    page, _ = build_report(run)

    m = after.metrics
    rows = [  # before training the policy is the reference: KL is 0 and the win rate 1/2 exactly
        ("mean reward (VADER compound, -1..1)", _ci(m, "ref_reward_mean"), _ci(m, "reward_mean")),
        ("KL(pi || pi_ref), nats", "0 (exactly)", show_divergence(m["kl_ref"], m["kl_ref_ci"], estimator="k1", digits=3)),
        ("win rate against pi_ref", "0.5 (exactly)", _ci(m, "win_rate")),
    ]
    print(f"\n[4/4] On {len(held_out)} held-out openings, {args.eval_samples} samples each per side "
          f"(95% bootstrap intervals){stopped}:\n")
    print(table(["", "before (the reference)", f"after {last_step} steps"], rows))
    print("\nReward and win rate as KL grows (KL budget {:g} nats):\n".format(args.kl_budget))
    print(table(["step", "KL(pi || pi_ref)", "mean reward", "win rate"],
                [(0, "0", m["ref_reward_mean"], 0.5)]
                + [(st, show_divergence(e["kl_ref"], estimator="k1", digits=3), e["reward_mean"], e["win_rate"]) for st, e in trajectory]))
    print("\nThree openings, a sample of the reference (before) and of the trained policy (after):\n")
    for i in range(3):
        b, a = after.ref.completions[i][0], after.policy.completions[i][0]
        rb, ra = after.ref.rewards[i][0].item(), after.policy.rewards[i][0].item()
        print(f"  {held_out[i]!r}")
        print(textwrap.indent(textwrap.fill(f"before ({rb:+.2f}): {b.strip()}", 100), "    "))
        print(textwrap.indent(textwrap.fill(f"after  ({ra:+.2f}): {a.strip()}", 100), "    "))
    print(f"\nRun directory: {run}   (model in {run / 'final'})")
    print(f"Report: {page}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0
