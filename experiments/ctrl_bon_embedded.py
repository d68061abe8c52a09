"""CTRL for best-of-N against plain KL-regularised RL on a real model, compared at matched KL (InfAlign, digest §5).

The question (docs/infalign.md, "On a real model"): if the aligned model will be used through best-of-N, does
calibrate-and-transform RL (CTRL: the KL-regularised recipe on exp(t * C(x, y)), C the quantile of the reward
among reference samples of the prompt) give a higher best-of-N win rate against best-of-N of the reference than
the same recipe on the raw reward, at the same KL(pi || pi_ref)?

Protocol (every number printed is measured, nothing is assumed):

1. Calibration: m reference samples of each training prompt, scored once (cached in OUT/calibration.json).
2. Two runs of ``tilt.recipes.kl_rl`` from the same initial model, with the same seed, beta, lr and batch: ``kl-rl``
   on the raw reward, ``ctrl`` on the transformed calibrated reward, t tuned analytically for N and the KL target
   (``tilt.infalign.tune_t``). Once a run's training KL (a rolling mean of the on-policy batch estimate) passes
   half the target, every step probes its KL on the held-out prompts and keeps a snapshot of its weights; the run
   stops once a probe passes 1.4 times the target.
3. Choosing the matched checkpoints: each snapshot's KL on the held-out prompts is probed with a small sample (a
   seed of its own, so that the choice does not bias the final estimate); the snapshot whose probe KL is nearest
   the target goes to the final evaluation. The target is a held-out KL: on the training prompts KL runs higher.
4. Final evaluation on held-out prompts: K samples of each prompt from each policy and from pi_ref. Both policies
   are sampled with the same seed, so their draws share their uniforms (the engine samples by inverse CDF) and the
   two KL estimates' noise is largely common. If their KL estimates differ by more than the tolerance, the next
   candidate of the run that is further from the other is evaluated (at most ``--rematch`` times).
5. Report: KL (k1, with a bootstrap interval), mean reward, standard win rate, best-of-N and worst-of-N win rates
   against pi_ref (groups of N consecutive samples), each with a 95% two-level bootstrap interval, and the gap in
   best-of-N win rate between the two runs with a paired bootstrap interval (the same reference draws).

Run (about 15-25 minutes on 2 CPU cores; the calibration and the reference draws are cached in OUT and reused):

    python experiments/ctrl_bon_embedded.py --seed 0 --out runs/ctrl-bon-s0

and ``python experiments/ctrl_bon_summary.py runs/ctrl-bon-s*`` pools several training seeds.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from tilt.pipelines.demo import demo_prompts
from tilt.cli.output import table
from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.loading import load_model_and_tokenizer
from tilt.evaluation import bootstrap_mean, draw_scored
from tilt.infalign import CalibratedReward, analyze, inference_key, load_or_build_calibration, procedure_transform, tune_t
from tilt.math.infalign import best_of_n_values, bootstrap_win_rate, bootstrap_win_rate_difference, worst_of_n_values
from tilt.recipes import kl_rl
from tilt.recipes.common import derive_seed
from tilt.reward_fns import reward_from_spec


PROBE_FROM = 0.5
"""Held-out probes (and snapshots) start once the trailing training KL passes this fraction of the target."""
STOP_AT = 1.4
"""A run stops once a held-out probe passes this multiple of the target."""
MAX_SNAPSHOTS = 8
"""Weight snapshots kept per run (about 0.5 GB each for a 135M-parameter model in float32)."""


class Stop(Exception):
    """Raised from the step hook once a run's training KL is well past the target."""


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="model folder or 'embedded' (SmolLM2-135M-Instruct, shipped)")
    p.add_argument("--reward", default="sentiment", help="reward spec (default: the demo's VADER sentiment)")
    p.add_argument("--n", type=int, default=4, help="N of best-of-N (default 4)")
    p.add_argument("--kl", type=float, default=0.5, help="KL(pi || pi_ref) target in nats (default 0.5, the analytic example of docs/infalign.md)")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest accepted KL gap between the runs (default 0.05)")
    p.add_argument("--t", type=float, default=None, help="t of exp(t c); default: tuned analytically for N and the KL target")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient of both runs (default 0.05, TRL's RLOO default)")
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate of both runs (default 3e-5: steps of about 0.1 nats "
                   "of held-out KL near 0.5, so that checkpoints of the two runs can be matched within the tolerance)")
    p.add_argument("--max-steps", type=int, default=40, help="most steps per run (default 40)")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--samples-per-prompt", type=int, default=8, help="completions per prompt per step (RLOO group; default 8)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--train-prompts", type=int, default=16, help="the first this many review openings train, the rest are held out")
    p.add_argument("--calibration-samples", type=int, default=32, help="m reference samples per training prompt (default 32)")
    p.add_argument("--probe-samples", type=int, default=8, help="samples per held-out prompt when choosing checkpoints (default 8)")
    p.add_argument("--eval-samples", type=int, default=64, help="samples per held-out prompt per side in the final evaluation (default 64)")
    p.add_argument("--rematch", type=int, default=2, help="extra final evaluations allowed to match the KLs (default 2)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of training (prompt order, samples) and of the bootstrap")
    p.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration samples (shared across training seeds)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out draws and probes (shared across training seeds)")
    p.add_argument("--out", default="runs/ctrl-bon", help="output folder (calibration cache, result.json)")
    args = p.parse_args(argv)
    if args.eval_samples % args.n:
        p.error(f"--eval-samples must be a multiple of --n ({args.n})")
    return args


def train_run(name, args, model0, tokenizer, ref, reward_fn, train_prompts, held_out, raw, sampling):
    """One KL-RL run. Once the trailing training KL passes ``PROBE_FROM`` times the target, every step probes the
    held-out KL of the current policy and keeps a snapshot (at most ``MAX_SNAPSHOTS``, those nearest the target);
    the run stops once a probe passes ``STOP_AT`` times the target. Returns (policy, {updates: snapshot},
    {updates: probe KL}, per-step log)."""
    model = copy.deepcopy(model0).requires_grad_(True)
    policy = HFPolicy(model, tokenizer, sampling)
    config = kl_rl.KLRLConfig(beta=args.beta, steps=args.max_steps, prompts_per_step=args.prompts_per_step,
                              samples_per_prompt=args.samples_per_prompt, lr=args.lr, seed=args.seed)
    batch_kl: list[float] = []  # on-policy batch estimate of each step (of the policy before that step's update)
    snapshots: dict[int, dict] = {}
    probes: dict[int, float] = {}  # held-out KL estimate of the policy after u updates
    log = []
    start = time.perf_counter()

    def on_step(step: int, metrics: dict) -> None:
        batch_kl.append(metrics["kl_ref"])
        trailing = sum(batch_kl[-3:]) / len(batch_kl[-3:])
        row = {"step": step + 1, "reward": metrics["reward"], "kl_batch": metrics["kl_ref"], "kl_trailing": trailing}
        probe = ""
        if trailing >= PROBE_FROM * args.kl:  # the step's update is done: probe the policy after step + 1 updates
            d = draw_scored(policy, held_out, args.probe_samples, raw, ref=ref,
                            generator=torch.Generator().manual_seed(derive_seed(args.eval_seed, "probe")))
            probes[step + 1] = row["kl_probe"] = d.seq_log_ratio.mean().item()
            snapshots[step + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if len(snapshots) > MAX_SNAPSHOTS:  # memory: drop the one furthest from the target
                drop = max(snapshots, key=lambda u: abs(probes[u] - args.kl))
                del snapshots[drop]
            probe = f"  held-out KL {probes[step + 1]:.3f}"
        log.append(row)
        print(f"  [{name}] step {step + 1:3d}  reward {metrics['reward']:+.4f}  batch KL {metrics['kl_ref']:.3f}  "
              f"trailing KL {trailing:.3f}{probe}  ({time.perf_counter() - start:.0f} s)", flush=True)
        if probes.get(step + 1, 0.0) >= STOP_AT * args.kl:
            raise Stop

    try:
        kl_rl.train(config, policy, ref, reward_fn, train_prompts, on_step=on_step)
    except Stop:
        pass
    return policy, snapshots, {u: probes[u] for u in snapshots}, log


def evaluate_snapshot(policy, state, prompts, k, reward_fn, ref, seed):
    policy.model.load_state_dict(state)
    g = torch.Generator().manual_seed(seed)
    return draw_scored(policy, prompts, k, reward_fn, generator=g, ref=ref)


def reference_rewards(path: Path, ref, held_out, reward_fn, args) -> torch.Tensor:
    """(P, K) rewards of K reference samples of each held-out prompt, cached at ``path`` for reruns with the same
    model, reward, prompts, K, length and seed (only the rewards enter the win rates)."""
    key = {"model": args.model, "reward": args.reward, "prompts": held_out, "k": args.eval_samples,
           "max_new_tokens": args.max_new_tokens, "seed": args.eval_seed}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            print(f"# reference draws: read from {path}", flush=True)
            return torch.tensor(cached["rewards"], dtype=torch.float64)
    print(f"# reference draws: {args.eval_samples} samples of each of {len(held_out)} held-out prompts", flush=True)
    g = torch.Generator().manual_seed(derive_seed(args.eval_seed, "eval", "ref"))
    rewards = draw_scored(ref, held_out, args.eval_samples, reward_fn, generator=g).rewards
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "rewards": rewards.tolist()}))
    tmp.replace(path)
    return rewards


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    prompts = demo_prompts()
    train_prompts, held_out = prompts[: args.train_prompts], prompts[args.train_prompts:]
    if not held_out:
        raise SystemExit(f"--train-prompts leaves no held-out prompt (there are {len(prompts)})")
    tuned = tune_t("bon", args.n, args.kl)
    identity = analyze(procedure_transform("bon", "identity"), args.n, args.kl)[inference_key("bon")]
    t = args.t if args.t is not None else tuned.t
    print(f"# best-of-{args.n}, KL target {args.kl} nats: t = {t:.3f} (analytic tuning gives t = {tuned.t:.3f}, "
          f"best-of-{args.n} win rate {tuned.win_rate_inference:.3f} against {identity:.3f} "
          "for the identity, in calibrated space)", flush=True)

    model0, tokenizer = load_model_and_tokenizer(args.model)
    model0.requires_grad_(False)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    ref = HFPolicy(copy.deepcopy(model0), tokenizer, sampling)
    raw = reward_from_spec(args.reward)

    print(f"# calibration: {args.calibration_samples} reference samples of each of {len(train_prompts)} training prompts", flush=True)
    calibration = load_or_build_calibration(
        out / "calibration.json", ref, raw, train_prompts, args.calibration_samples, seed=derive_seed(args.calibration_seed, "calibration"),
        fingerprint={"ref": args.model, "reward": args.reward, "max_new_tokens": args.max_new_tokens})
    ctrl_reward = CalibratedReward(raw, calibration, procedure_transform("bon", "exp", t))

    ref_rewards = reference_rewards(out / "reference_rewards.json", ref, held_out, raw, args)

    runs = {}
    for name, reward_fn in (("kl-rl", raw), ("ctrl", ctrl_reward)):
        print(f"# training {name}", flush=True)
        policy, snapshots, probes, log = train_run(name, args, model0, tokenizer, ref, reward_fn, train_prompts, held_out, raw, sampling)
        if not snapshots:
            raise SystemExit(f"{name}: the training KL never reached {PROBE_FROM} times the target in {args.max_steps} steps: "
                             "raise --max-steps or --lr")
        order = sorted(probes, key=lambda u: abs(probes[u] - args.kl))
        runs[name] = {"policy": policy, "snapshots": snapshots, "probes": probes, "order": order, "log": log, "finals": {}}

    def final(name: str, u: int):
        run = runs[name]
        if u not in run["finals"]:
            print(f"# final evaluation of {name} after {u} steps", flush=True)
            run["finals"][u] = evaluate_snapshot(run["policy"], run["snapshots"][u], held_out, args.eval_samples, raw, ref,
                                                 derive_seed(args.eval_seed, "eval", "policy"))
        return run["finals"][u]

    chosen = {name: runs[name]["order"][0] for name in runs}
    kl = {name: final(name, chosen[name]).seq_log_ratio.mean().item() for name in runs}
    for _ in range(args.rematch):
        if abs(kl["kl-rl"] - kl["ctrl"]) <= args.tolerance:
            break
        best = None  # the untried candidate that brings the two KLs closest
        for name, other in (("kl-rl", "ctrl"), ("ctrl", "kl-rl")):
            for u in runs[name]["order"]:
                if u in runs[name]["finals"]:
                    continue
                gap = abs(runs[name]["probes"][u] - kl[other])
                if best is None or gap < best[0]:
                    best = (gap, name, u)
        if best is None:
            break
        _, name, u = best
        new_kl = final(name, u).seq_log_ratio.mean().item()
        other = "ctrl" if name == "kl-rl" else "kl-rl"
        if abs(new_kl - kl[other]) < abs(kl[name] - kl[other]):
            chosen[name], kl[name] = u, new_kl

    g = torch.Generator().manual_seed(derive_seed(args.seed, "bootstrap"))
    boot = dict(generator=g, num_resamples=args.resamples)
    n = args.n
    ref_bon, ref_won = best_of_n_values(ref_rewards, n), worst_of_n_values(ref_rewards, n)
    rows, result = [], {"args": vars(args), "t": t, "analytic": {"t": tuned.t, "win_rate_bon_ctrl": tuned.win_rate_inference,
                                                                "win_rate_bon_identity": identity}}
    for name in runs:
        d = final(name, chosen[name])
        m = {"steps": chosen[name],
             "kl_ref": bootstrap_mean(d.seq_log_ratio, **boot),
             "reward_mean": bootstrap_mean(d.rewards, **boot),
             "win_rate": bootstrap_win_rate(d.rewards, ref_rewards, **boot),
             "win_rate_bon": bootstrap_win_rate(best_of_n_values(d.rewards, n), ref_bon, **boot),
             "win_rate_won": bootstrap_win_rate(worst_of_n_values(d.rewards, n), ref_won, **boot),
             "probes": runs[name]["probes"], "training_log": runs[name]["log"]}
        result[name] = m
        rows.append([name, m["steps"]] + [f"{m[k][0]:.3f} [{m[k][1]:.3f}, {m[k][2]:.3f}]"
                                          for k in ("kl_ref", "reward_mean", "win_rate", "win_rate_bon", "win_rate_won")])
    a, b = final("ctrl", chosen["ctrl"]), final("kl-rl", chosen["kl-rl"])
    gap = bootstrap_win_rate_difference(best_of_n_values(a.rewards, n), best_of_n_values(b.rewards, n), ref_bon, **boot)
    kl_gap = abs(kl["ctrl"] - kl["kl-rl"])
    result.update(ref_reward_mean=bootstrap_mean(ref_rewards, **boot), bon_gap_ctrl_minus_klrl=gap, kl_gap=kl_gap,
                  matched=kl_gap <= args.tolerance, seconds=time.perf_counter() - began)
    (out / "result.json").write_text(json.dumps(result, indent=2))

    print(f"\nHeld-out: {len(held_out)} prompts x {args.eval_samples} samples per side; best-of-{n} = groups of {n}; "
          f"95% bootstrap intervals.\n")
    print(table(["run", "steps", "KL(pi||pi_ref)", "mean reward", "win rate", f"best-of-{n} win rate", f"worst-of-{n} win rate"], rows))
    print(f"\nreference mean reward {result['ref_reward_mean'][0]:.3f}; KL gap between the runs {kl_gap:.3f} nats "
          f"({'matched' if result['matched'] else 'NOT matched'} within {args.tolerance})")
    print(f"best-of-{n} win rate, CTRL minus KL-RL (paired bootstrap): {gap[0]:+.3f} [{gap[1]:+.3f}, {gap[2]:+.3f}]")
    print(f"written {out / 'result.json'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
