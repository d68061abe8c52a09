"""``tilt demo``: align the embedded SmolLM2-135M-Instruct toward positive reviews, and show what changed.

KL-regularised RL (REINFORCE with a leave-one-out baseline) with a VADER sentiment reward on short review
openings; before and after training, on held-out openings: mean reward, KL to the reference and win rate
against the reference, each with a 95% bootstrap interval; three sample pairs; a report in the run directory.
Sized for about 10 minutes on 2 CPU cores.

The config is the one shape of every tilt train command (a run: section, here with model embedded and reward
sentiment, then the demo: and lora: sections); every field is also a flag (--steps 8, --run.model DIR).
SIGTERM or Ctrl-C stops after the current step (exit 143 or 130); the demo does not resume: run it again.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from tilt.cli.output import print_json, table


def add_parser(sub) -> None:
    from tilt.runs.config import fields_help

    p = sub.add_parser("demo", help="align the embedded model toward positive reviews and show before/after",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                       epilog=f"Config fields (YAML sections, or flags):\n{fields_help('demo')}")
    p.add_argument("--config", metavar="FILE.yaml", help="a config file (optional: every field has a default)")
    p.add_argument("--run-dir", default=None, help="where to write the run (default runs/demo-<time>)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the measurements) on stdout; logs go to stderr")
    p.set_defaults(run=run_demo, takes_fields=True)


class OverBudget(Exception):
    """Raised from the step hook to stop training once the KL estimate exceeds the budget."""


def _ci(m: dict, key: str) -> str:
    low, high = m[f"{key}_ci"]
    return f"{m[key]:.3f}  [{low:.3f}, {high:.3f}]"


def run_demo(args: argparse.Namespace) -> int:
    from tilt.runs import config as cfg

    start = time.perf_counter()
    flags = cfg.parse_flags("demo", getattr(args, "fields", []))
    from_file = cfg.load_yaml(args.config) if args.config else {}
    config = cfg.resolve("demo", from_file, flags, base_dir=Path(args.config).resolve().parent if args.config else None,
                         where=str(args.config or "command line"))
    sections = cfg.build(config)
    from tilt.runs.setup import quiet_transformers

    quiet_transformers()
    from tilt.runs.loop import Signals

    log = sys.stderr if args.json else sys.stdout
    with Signals("finishing this step, then stopping") as signals:
        result = demo(config, sections, Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"), signals, log)
    if isinstance(result, int):
        return result
    if args.json:
        print_json(result["summary"])
        return 0
    show(result, sections["demo"], time.perf_counter() - start)
    return 0


def demo(config: dict, sections: dict, run_dir: Path, signals, log) -> dict | int:
    from tilt.engine.hf import SamplingConfig
    from tilt.evaluation import EvalConfig, evaluate
    from tilt.pipelines.demo import demo_prompts
    from tilt.recipes import kl_rl
    from tilt.recipes.common import build_optimizer
    from tilt.report import build_report
    from tilt.runs import directory as runs
    from tilt.runs.loop import RunLoop
    from tilt.runs.setup import build_reward, check_models, check_run_context, final_model, load_policy_and_ref

    run, d = sections["run"], sections["demo"]
    run.require("demo", ("model", "reward"))
    check_models(run)
    prompts = demo_prompts()
    train_prompts, held_out = prompts[:24], prompts[24:]
    print(f"[1/4] loading {run.model!r} (the first use of embedded converts the shipped GGUF file once, ~30-60 s)", file=log, flush=True)
    policy, ref, tokenizer = load_policy_and_ref(run, sections["lora"], SamplingConfig(max_new_tokens=d.max_new_tokens), None)
    check_run_context(prompts, policy.model.config, tokenizer, max_new_tokens=d.max_new_tokens, path="the demo's prompts")
    reward = build_reward(run)
    eval_config = EvalConfig(samples_per_prompt=d.eval_samples, seed=d.seed)
    recipe = kl_rl.KLRLConfig(beta=d.beta, steps=d.steps, prompts_per_step=d.prompts_per_step,
                              samples_per_prompt=d.samples_per_prompt, lr=d.lr, seed=d.seed)
    out = runs.create_run(run_dir, config)
    eval_steps = d.eval_steps()
    print(f"[2/4] training {d.steps} steps of KL-regularised RL (beta {d.beta}), {d.prompts_per_step} x "
          f"{d.samples_per_prompt} completions per step\n      evaluated on {len(held_out)} held-out openings at steps "
          f"{', '.join(map(str, eval_steps))}; training stops early if the KL estimate exceeds the budget of {d.kl_budget} nats",
          file=log, flush=True)
    trajectory: list[tuple[int, dict]] = []  # (step, evaluation metrics)
    latest: dict = {}

    def evaluate_at(done: int) -> None:
        if done not in eval_steps:
            return
        ev = evaluate(eval_config, policy, ref, reward, held_out)  # samples both sides: the reference's are "before"
        trajectory.append((done, ev.metrics))
        runs.append_jsonl(out / "evals.jsonl", {"step": done, "model": f"the policy at step {done}", "ref": run.model,
                                                "reward": ",".join(run.reward), **ev.metrics})
        if ev.metrics["kl_ref"] > d.kl_budget:
            raise OverBudget(done)
        # the newest policy within the budget is the one the demo keeps
        latest.update(evaluation=ev, step=done, state={k: v.detach().clone() for k, v in policy.model.state_dict().items()})

    optimizer = build_optimizer(recipe.optimizer, [p for p in policy.parameters() if p.requires_grad], recipe.lr)
    loop = RunLoop("demo", out, steps=d.steps, start=0, signals=signals, save=None, checkpoint_every=0,
                   shown=("reward", "kl_ref"), passthrough=(OverBudget,))
    stopped = ""
    try:
        code = loop.run(lambda on_step: kl_rl.train(recipe, policy, ref, reward, train_prompts, optimizer=optimizer,
                                                    on_step=lambda s, m: (on_step(s, m), evaluate_at(s + 1))))
        if code is not None:
            return code
    except OverBudget as over:
        if "state" not in latest:
            raise ValueError(f"the first evaluation (step {over.args[0]}) is already over the KL budget of {d.kl_budget} "
                             "nats: raise --kl_budget or --beta, or lower --lr") from None
        policy.model.load_state_dict(latest["state"])
        stopped = (f" (at step {over.args[0]} the KL estimate exceeded the {d.kl_budget}-nat budget: "
                   f"kept the policy of step {latest['step']})")
    after, last_step = latest["evaluation"], latest["step"]
    for step, draws in ((0, after.ref), (last_step, after.policy)):
        for p, cs, rs in zip(held_out, draws.completions, draws.rewards.tolist()):
            for c, r in zip(cs, rs):
                runs.append_jsonl(out / "samples.jsonl", {"step": step, "prompt": p, "completion": c, "reward": float(r)})
    print("[3/4] writing the trained model and the report", file=log, flush=True)
    final = runs.save_final(out, final_model(policy.model), tokenizer)
    page, _ = build_report(out)
    m = after.metrics
    summary = {"run_dir": str(out), "final": str(final), "report": str(page), "step": last_step, "stopped_early": bool(stopped),
               **{k: m[k] for k in ("reward_mean", "reward_mean_ci", "ref_reward_mean", "ref_reward_mean_ci", "kl_ref",
                                     "kl_ref_ci", "win_rate", "win_rate_ci")},
               "trajectory": [{"step": s, "kl_ref": e["kl_ref"], "reward_mean": e["reward_mean"], "win_rate": e["win_rate"]}
                              for s, e in trajectory]}
    return {"summary": summary, "after": after, "held_out": held_out, "trajectory": trajectory, "stopped": stopped,
            "last_step": last_step, "run": out, "page": page}


def show(result: dict, d, seconds: float) -> None:
    from tilt.report import show_divergence

    after, held_out, m = result["after"], result["held_out"], result["after"].metrics
    rows = [  # before training the policy is the reference: KL is 0 and the win rate 1/2 exactly
        ("mean reward (VADER compound, -1..1)", _ci(m, "ref_reward_mean"), _ci(m, "reward_mean")),
        ("KL(pi || pi_ref), nats", "0 (exactly)", show_divergence(m["kl_ref"], m["kl_ref_ci"], estimator="k1", digits=3)),
        ("win rate against pi_ref", "0.5 (exactly)", _ci(m, "win_rate")),
    ]
    print(f"\n[4/4] On {len(held_out)} held-out openings, {d.eval_samples} samples each per side "
          f"(95% bootstrap intervals){result['stopped']}:\n")
    print(table(["", "before (the reference)", f"after {result['last_step']} steps"], rows))
    print(f"\nReward and win rate as KL grows (KL budget {d.kl_budget:g} nats):\n")
    print(table(["step", "KL(pi || pi_ref)", "mean reward", "win rate"],
                [(0, "0", m["ref_reward_mean"], 0.5)]
                + [(st, show_divergence(e["kl_ref"], estimator="k1", digits=3), e["reward_mean"], e["win_rate"])
                   for st, e in result["trajectory"]]))
    print("\nThree openings, a sample of the reference (before) and of the trained policy (after):\n")
    for i in range(3):
        b, a = after.ref.completions[i][0], after.policy.completions[i][0]
        rb, ra = after.ref.rewards[i][0].item(), after.policy.rewards[i][0].item()
        print(f"  {held_out[i]!r}")
        print(textwrap.indent(textwrap.fill(f"before ({rb:+.2f}): {b.strip()}", 100), "    "))
        print(textwrap.indent(textwrap.fill(f"after  ({ra:+.2f}): {a.strip()}", 100), "    "))
    print(f"\nRun directory: {result['run']}   (model in {result['run'] / 'final'})")
    print(f"Report: {result['page']}")
    print(f"Done in {seconds:.0f} s.")
