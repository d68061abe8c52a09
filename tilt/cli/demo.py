"""``tilt demo``: align the embedded SmolLM2-135M-Instruct toward positive reviews, and show how close it got.

KL-regularised RL (REINFORCE with a leave-one-out baseline) with a VADER sentiment reward on the openings task
(240 training openings); evaluated during training on held-out openings against the task's frontier, the best
win rate against the reference achievable at each KL (docs/frontier.md): mean reward, KL to the reference, win
rate against the reference, WR*(KL) and the efficiency (WR - 1/2)/(WR*(KL) - 1/2), each with a 95% bootstrap
interval; three sample pairs; the frontier plot and a report in the run directory. Sized for under 10 minutes on
2 CPU cores.

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


class OutOfTime(Exception):
    """Raised from the step hook to stop training once the time budget has run out (after that step's evaluation)."""


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


def demo_frontier(d, run, ref, reward, held_out: list[str], log):
    """The frontier of the demo's held-out openings: the given file, the shipped one, or drawn here."""
    from tilt.frontier import Frontier, FrontierConfig, draw_reference_rewards, frontier_from_rewards
    from tilt.pipelines.demo import SHIPPED_FRONTIER, uses_shipped_frontier

    if d.frontier or uses_shipped_frontier(d, run.model, run.ref, tuple(run.reward)):
        path = d.frontier or SHIPPED_FRONTIER
        frontier = Frontier.load(path)
        if frontier.data.get("prompts") is None:
            raise ValueError(f"{path} does not list its prompts; rebuild it with `tilt frontier`")
        length = frontier.data["meta"].get("max_new_tokens")
        if length is not None and length != d.max_new_tokens:
            raise ValueError(f"{path} was drawn with max_new_tokens {length}, the demo samples {d.max_new_tokens}: "
                             "set --max_new_tokens to match or leave --frontier empty to draw one here")
        print(f"      frontier: {path} (first {d.eval_prompts} openings, m = {frontier.data['meta']['samples_per_prompt']} "
              "reference samples each)", file=log, flush=True)
        return frontier.for_prompts(held_out, where=str(path))  # the demo's held-out openings, first and in order
    print(f"      drawing the frontier here: {d.frontier_samples} reference samples of each of {len(held_out)} held-out "
          "openings (the shipped one is for model embedded, reward sentiment, 24 tokens)", file=log, flush=True)
    rewards = draw_reference_rewards(ref, held_out, d.frontier_samples, reward, seed=d.seed)
    return frontier_from_rewards(rewards, FrontierConfig(num_resamples=200), prompts=held_out,
                                 meta={"model": run.model, "reward": ",".join(run.reward), "max_new_tokens": d.max_new_tokens})


def demo(config: dict, sections: dict, run_dir: Path, signals, log) -> dict | int:
    from tilt.engine.hf import SamplingConfig
    from tilt.evaluation import draw_scored
    from tilt.frontier import evaluate_on_frontier, plot_frontier, task_prompts
    from tilt.math.bootstrap import bootstrap_mean
    from tilt.recipes import kl_rl
    from tilt.recipes.common import build_optimizer, derive_seed
    from tilt.report import build_report
    from tilt.runs import directory as runs
    from tilt.runs.loop import RunLoop
    from tilt.runs.setup import build_reward, check_models, check_run_context, final_model, load_policy_and_ref

    import torch
    from tqdm import tqdm

    run, d = sections["run"], sections["demo"]
    run.require("demo", ("model", "reward"))
    check_models(run)
    train_prompts, held_out = task_prompts("train"), task_prompts("heldout")[:d.eval_prompts]
    print(f"[1/4] loading {run.model!r} (the first use of embedded converts the shipped GGUF file once, ~30-60 s)", file=log, flush=True)
    policy, ref, tokenizer = load_policy_and_ref(run, sections["lora"], SamplingConfig(max_new_tokens=d.max_new_tokens), None)
    check_run_context(train_prompts + held_out, policy.model.config, tokenizer, max_new_tokens=d.max_new_tokens,
                      path="the demo's openings")
    reward = build_reward(run)
    frontier = demo_frontier(d, run, ref, reward, held_out, log)
    recipe = kl_rl.KLRLConfig(beta=d.beta, steps=d.steps, prompts_per_step=d.prompts_per_step, warmup_steps=d.warmup_steps,
                              samples_per_prompt=d.samples_per_prompt, lr=d.lr, seed=d.seed)
    out = runs.create_run(run_dir, config)
    frontier.save(out / "frontier.json")
    budget = f", or when {d.minutes:g} minutes have passed" if d.minutes > 0 else ""
    print(f"[2/4] training at most {d.steps} steps of KL-regularised RL (beta {d.beta}, lr {d.lr:g}), {d.prompts_per_step} x "
          f"{d.samples_per_prompt} completions per step from {len(train_prompts)} training openings\n      evaluated on "
          f"{len(held_out)} held-out openings every {d.eval_every} steps; training stops early if the KL "
          f"estimate exceeds the budget of {d.kl_budget:g} nats{budget}\n      training rollouts drawn by the "
          f"{policy.sampler_kind!r} sampler ({policy.sampler_reason}){', weighted by pi/q' if policy.sampler_kind != 'exact' else ''}; "
          "evaluations sample the policy itself", file=log, flush=True)
    trajectory: list[tuple[int, dict]] = []  # (step, evaluation metrics)
    latest: dict = {}
    started = time.perf_counter()

    def evaluate_at(done: int) -> None:
        out_of_time = d.minutes > 0 and time.perf_counter() - started > 60 * d.minutes
        if not d.evaluates_at(done, out_of_time):
            return
        metrics, draws = evaluate_on_frontier(frontier, policy, ref, reward, samples_per_prompt=d.eval_samples,
                                              seed=derive_seed(d.seed, "demo-eval", done))
        trajectory.append((done, metrics))
        runs.append_jsonl(out / "evals.jsonl", {"step": done, "model": f"the policy at step {done}", "ref": run.ref or run.model,
                                                "reward": ",".join(run.reward), **metrics})
        tqdm.write(f"      step {done}: held-out KL {metrics['kl_ref']:.3f}, win rate {metrics['win_rate']:.3f}, best achievable "
                   f"at that KL {metrics['frontier_win_rate']:.3f}, efficiency {metrics['efficiency']:.2f}", file=log)
        if metrics["kl_ref"] > d.kl_budget:
            raise OverBudget(done)
        # the newest policy within the budget is the one the demo keeps
        latest.update(metrics=metrics, draws=draws, step=done,
                      state={k: v.detach().clone() for k, v in policy.model.state_dict().items()})
        if out_of_time and done < d.steps:
            raise OutOfTime(done)

    optimizer = build_optimizer(recipe.optimizer, [p for p in policy.parameters() if p.requires_grad], recipe.lr)
    loop = RunLoop("demo", out, steps=d.steps, start=0, signals=signals, save=None, checkpoint_every=0,
                   shown=("reward", "kl_ref"), passthrough=(OverBudget, OutOfTime))
    stopped = ""
    try:
        code = loop.run(lambda on_step: kl_rl.train(recipe, policy, ref, reward, train_prompts, optimizer=optimizer,
                                                    on_step=lambda s, m: (on_step(s, m), evaluate_at(s + 1))))
        if code is not None:
            return code
    except OverBudget as over:
        if "state" not in latest:
            raise ValueError(f"the first evaluation (step {over.args[0]}) is already over the KL budget of {d.kl_budget} "
                             "nats: raise --kl_budget or --beta, lower --lr, or evaluate earlier (--eval_every)") from None
        policy.model.load_state_dict(latest["state"])
        stopped = (f" (at step {over.args[0]} the KL estimate exceeded the {d.kl_budget:g}-nat budget: "
                   f"kept the policy of step {latest['step']})")
    except OutOfTime as late:
        stopped = f" (training stopped after step {late.args[0]}: the {d.minutes:g}-minute budget had run out)"
    m, draws, last_step = latest["metrics"], latest["draws"], latest["step"]
    ref_rewards = torch.tensor(frontier.data["ref_rewards"], dtype=torch.float64)
    ref_mean = bootstrap_mean(ref_rewards, generator=torch.Generator().manual_seed(derive_seed(d.seed, "demo-ref")), num_resamples=500)
    before = draw_scored(ref, held_out[:3], 1, reward, generator=torch.Generator().manual_seed(derive_seed(d.seed, "demo-before")))
    for p, c, r in zip(held_out[:3], before.completions, before.rewards.tolist()):
        runs.append_jsonl(out / "samples.jsonl", {"step": 0, "prompt": p, "completion": c[0], "reward": float(r[0])})
    for p, cs, rs in zip(held_out, draws.completions, draws.rewards.tolist()):
        for c, r in zip(cs, rs):
            runs.append_jsonl(out / "samples.jsonl", {"step": last_step, "prompt": p, "completion": c, "reward": float(r)})
    print("[3/4] writing the trained model, the frontier plot and the report", file=log, flush=True)
    final = runs.save_final(out, final_model(policy.model), tokenizer)
    plot = plot_frontier(frontier, out / "frontier.png", runs={"tilt demo (KL-RL)": [e for _, e in trajectory]},
                         title=f"tilt demo: {len(held_out)} held-out openings against the frontier")
    page, _ = build_report(out)
    summary = {"run_dir": str(out), "final": str(final), "report": str(page), "frontier_plot": str(plot), "step": last_step,
               "stopped_early": bool(stopped), "ref_reward_mean": ref_mean[0], "ref_reward_mean_ci": [ref_mean[1], ref_mean[2]],
               **{k: m[k] for k in ("reward_mean", "reward_mean_ci", "kl_ref", "kl_ref_ci", "kl_estimator", "kl_ref_k1", "kl_ref_k1_ci",
                                     "win_rate", "win_rate_ci", "efficiency",
                                     "efficiency_ci", "frontier_win_rate", "frontier_win_rate_ci", "beyond_reach")},
               "frontier": {str(kl): frontier.wr_star(kl) for kl in (0.5, 1.0, 2.0)},
               "trajectory": [{"step": s, **{k: e[k] for k in ("kl_ref", "reward_mean", "win_rate", "frontier_win_rate", "efficiency")}}
                              for s, e in trajectory]}
    return {"summary": summary, "metrics": m, "draws": draws, "before": before, "held_out": held_out, "trajectory": trajectory,
            "stopped": stopped, "last_step": last_step, "run": out, "page": page, "plot": plot, "frontier": frontier}


def show(result: dict, d, seconds: float) -> None:
    from tilt.report import show_divergence

    m, s, held_out, frontier = result["metrics"], result["summary"], result["held_out"], result["frontier"]
    m_ref = frontier.data["meta"]["samples_per_prompt"]
    rows = [  # before training the policy is the reference: KL is 0 and the win rate 1/2 exactly
        ("mean reward (VADER compound, -1..1)", _ci(s, "ref_reward_mean"), _ci(m, "reward_mean")),
        ("KL(pi || pi_ref), nats", "0 (exactly)", show_divergence(m["kl_ref"], m["kl_ref_ci"], estimator=m["kl_estimator"], digits=3)),
        ("win rate against pi_ref", "0.5 (exactly)", _ci(m, "win_rate")),
        ("best achievable win rate at this KL (WR*)", "0.5", _ci(m, "frontier_win_rate")),
        ("efficiency (WR - 1/2) / (WR* - 1/2)", "", _ci(m, "efficiency")),
    ]
    print(f"\n[4/4] On {len(held_out)} held-out openings, {d.eval_samples} policy samples each against {m_ref} reference "
          f"samples each (95% bootstrap intervals){result['stopped']}:\n")
    print(table(["", "before (the reference)", f"after {result['last_step']} steps"], rows))
    if m["beyond_reach"]:
        print(f"(the KL is past what {m_ref} reference samples resolve: WR* is under-stated there, the efficiency over-stated)")
    def star(kl: float) -> str:
        value = frontier.wr_star(kl)
        return f"{value:.3f}" if value == value else f"beyond reach of {m_ref} samples"

    print(f"\nThe frontier of these openings: the best win rate against pi_ref is {star(0.5)} at KL 0.5, "
          f"{star(1.0)} at KL 1 and {star(2.0)} at KL 2 (the calibrated tilt; docs/frontier.md)."
          f"\nReward, win rate and efficiency as KL grows (KL budget {d.kl_budget:g} nats):\n")
    print(table(["step", "KL(pi || pi_ref)", "mean reward", "win rate", "WR*(KL)", "efficiency"],
                [(0, "0", f"{s['ref_reward_mean']:.3f}", "0.5", "0.5", "")]
                + [(st, show_divergence(e["kl_ref"], estimator=e["kl_estimator"], digits=3), f"{e['reward_mean']:.3f}", f"{e['win_rate']:.3f}",
                    f"{e['frontier_win_rate']:.3f}", f"{e['efficiency']:.2f}") for st, e in result["trajectory"]]))
    print("\nThree held-out openings, a sample of the reference (before) and of the trained policy (after):\n")
    before, after = result["before"], result["draws"]
    for i in range(min(3, len(held_out))):
        b, a = before.completions[i][0], after.completions[i][0]
        rb, ra = before.rewards[i][0].item(), after.rewards[i][0].item()
        print(f"  {held_out[i]!r}")
        print(textwrap.indent(textwrap.fill(f"before ({rb:+.2f}): {b.strip()}", 100), "    "))
        print(textwrap.indent(textwrap.fill(f"after  ({ra:+.2f}): {a.strip()}", 100), "    "))
    print(f"\nRun directory: {result['run']}   (model in {result['run'] / 'final'})")
    print(f"Frontier plot: {result['plot']}")
    print(f"Report: {result['page']}")
    print(f"Done in {seconds:.0f} s.")
