"""The frontier benchmark: how close each training method gets to the best achievable win rate at a given KL, on the
embedded model's openings task (docs/frontier.md).

One method per invocation; each run is evaluated on the held-out prompts of the frontier file as it trains (every
``--eval-every`` steps: K samples of each prompt, win rate against the frontier's own reference samples, KL by k1,
mean reward, each with a bootstrap interval) and read off at KL 0.5, 1 and 2 nats by linear interpolation between
the two evaluations that bracket each KL. Efficiency there is (WR - 1/2)/(WR*(KL) - 1/2).

    F=tilt/assets/frontier_openings_m32.json     # shipped (or: tilt frontier --limit 100 --samples 32 --max-new-tokens 24)
    python benchmarks/frontier.py --method kl-rl --frontier $F --out bench/runs --eval-prompts 24 --threads 2
    python benchmarks/frontier.py --method ctrl  --frontier $F --out bench/runs --eval-prompts 24 --threads 2 --train-prompts 64
    python benchmarks/frontier.py --table --frontier $F --out bench/runs   # tables + plot

docs/frontier.md gives the runs measured (benchmarks/results/frontier_runs/).

Resumable by method: OUT/METHOD.json (OUT/METHOD.TAG.json for a ``--tag``ged variant) holds every evaluation so far
and is rewritten after each; a method whose file says ``done`` is skipped (``--force`` reruns it); an interrupted one
starts again from the initial model. ``--kl-penalty`` and ``--lora`` make the variants of docs/frontier.md's
"Where the KL goes".

Methods (tilt's recipes called directly, not through the command line):

* ``kl-rl``: ``tilt.recipes.kl_rl``, REINFORCE with a leave-one-out baseline, KL (k1) in the reward;
* ``ppo``: the same recipe with ``ppo_epochs`` 4 (PPO-clip, eps 0.2);
* ``ctrl``: the same recipe on the calibrated reward C (InfAlign's identity transform: the exact optimum of the
  win rate at each KL), calibrated with m reference samples of each training prompt;
* ``dpg``: ``tilt.recipes.dpg``, on-policy distributional policy gradient toward pi* ∝ pi_ref exp(r/beta);
* ``online-dpo``: ``tilt.recipes.online_dpo`` (scheme online-dpo) with the reward as the labelling oracle;
* ``bc-bon``: behaviour cloning (``tilt.recipes.bc``) on best-of-N samples of the reference for the training
  prompts (evaluated along the cloning steps);
* ``vbon``: KL-RL at beta = 1 on the best-of-N log-ratio reward (``tilt.bon_target.BestOfNReward``, its CDF from
  m reference samples of each training prompt): vBoN / BOND's backward part;
* ``bond``, ``bonbon``, ``apo``, ``qrpo``: ``tilt.recipes.bond`` (Jeffreys BOND), ``bonbon``, ``apo`` (A*-PO) and
  ``qrpo``, each with its config's own defaults except steps, prompts per step, samples per prompt, N and seed;
* ``trl-rloo``, ``trl-grpo``: TRL's trainers with their documented defaults except precision (bf16 only where the
  CPU has native bfloat16, as tilt's ``auto``) and gradient checkpointing (off, as in tilt); they need the benchmark
  venv (``make bench`` builds .venv-bench) and run there;
* ``merge``: no training. The runs named by ``--of`` (made with ``--keep-weights``, which saves OUT/NAME.safetensors)
  are averaged and interpolated toward the initial model, theta_ref + lam (mean_m theta_m - theta_ref), and each lam
  of ``--scales`` is evaluated like a training step (``tilt.math.merging``: model soups, WiSE-FT, WARP)::

    python benchmarks/frontier.py --method kl-rl --tag s0 --seed 0 --keep-weights ...
    python benchmarks/frontier.py --method kl-rl --tag s1 --seed 1 --keep-weights ...
    python benchmarks/frontier.py --method merge --tag s0s1 --of kl-rl.s0 kl-rl.s1 --scales 0 0.5 1 1.5 ...

The geometry of the step (kl-rl, ppo, ctrl, vbon): ``--optimizer sgd`` (plain SGD, Euclidean steps) or ``--optimizer
kfac`` (``tilt.engine.kfac``: the natural gradient, steepest per unit KL, with K-FAC factors of pi_ref's Fisher and a
trust region of ``--lr`` nats per step) against AdamW's per-coordinate steps::

    python benchmarks/frontier.py --method kl-rl --tag sgd2e-4 --optimizer sgd --lr 2e-4 ...
    python benchmarks/frontier.py --method kl-rl --tag kfac --optimizer kfac --lr 0.005 ...
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

METHODS = ("kl-rl", "ppo", "ctrl", "dpg", "online-dpo", "bc-bon", "vbon", "bond", "bonbon", "apo", "qrpo", "trl-rloo", "trl-grpo",
           "merge")
TARGET_KLS = (0.5, 1.0, 2.0)
DEFAULT_LR = {"kl-rl": 1e-5, "ppo": 1e-5, "ctrl": 1e-5, "dpg": 1.41e-5, "online-dpo": 5e-7, "bc-bon": 2e-5, "vbon": 1e-5,
              "bond": None, "bonbon": None, "apo": None, "qrpo": None, "trl-rloo": 1e-6, "trl-grpo": 1e-6}
"""Each recipe's own default learning rate (its config's documented source), and TRL's documented defaults."""
DEFAULT_BETA = {"kl-rl": 0.05, "ppo": 0.05, "ctrl": 0.05, "dpg": 0.05, "online-dpo": 0.1, "bc-bon": None, "vbon": 1.0,
                "bond": None, "bonbon": None, "apo": None, "qrpo": None, "trl-rloo": 0.05, "trl-grpo": 0.0}
"""None: the recipe config's own sourced default. vBoN is KL-RL at beta = 1 on log pi_BoN/pi_ref (docs/bon_distillation.md)."""


class Stop(Exception):
    """Raised from a step hook once the run is past the largest KL of interest or its time budget."""


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, help="the method to run (one per invocation)")
    p.add_argument("--table", action="store_true", help="print the table of every finished method in --out and save the plot")
    p.add_argument("--frontier", required=True, help="frontier.json of the held-out prompts (tilt frontier), same model, reward, length")
    p.add_argument("--out", required=True, help="output folder: one METHOD.json per method, frontier.png")
    p.add_argument("--force", action="store_true", help="rerun a method that is already done")
    p.add_argument("--model", default="embedded")
    p.add_argument("--reward", default="sentiment")
    p.add_argument("--steps", type=int, default=60, help="most training steps (default 60)")
    p.add_argument("--eval-every", type=int, default=5, help="steps between held-out evaluations (default 5)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt per evaluation (default 4)")
    p.add_argument("--eval-prompts", type=int, default=None, help="evaluate on the frontier's first P held-out prompts, the "
                   "frontier recomputed on them (default: all of them; the shipped frontier has 100)")
    p.add_argument("--train-prompts", type=int, default=None, help="train on the first P training openings (default: all 240; "
                   "ctrl, vbon and bc-bon sample the reference for each)")
    p.add_argument("--train-on-eval", action="store_true", help="train on the evaluated prompts themselves (the frontier's "
                   "first --eval-prompts), not the training openings: how close training gets where it need not generalise")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: the method's own (DEFAULT_LR)")
    p.add_argument("--beta", type=float, default=None, help="default: the method's own (DEFAULT_BETA)")
    p.add_argument("--calibration-samples", type=int, default=16, help="ctrl, vbon, and bond/bonbon/apo/qrpo where they calibrate: m reference samples per training prompt (default 16)")
    p.add_argument("--best-of", type=int, default=8, help="bc-bon, vbon, bond, bonbon: N of best-of-N (default 8)")
    p.add_argument("--stop-kl", type=float, default=2.4, help="stop once a held-out KL estimate passes this (default 2.4)")
    p.add_argument("--max-minutes", type=float, default=15.0, help="stop training after this wall time (default 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--kl-penalty", choices=("reward", "loss", "full"), default="reward",
                   help="kl-rl, ppo, ctrl, vbon: where the KL goes (KLRLConfig.kl_penalty; 'full' = whole-vocabulary per-token KL)")
    p.add_argument("--optimizer", choices=("adamw", "sgd", "kfac"), default="adamw",
                   help="kl-rl, ppo, ctrl, vbon: KLRLConfig.optimizer (default adamw; sgd is plain SGD), or kfac: the natural gradient "
                        "(tilt.engine.kfac, K-FAC factors of the reference's Fisher, linear layers only, embeddings and norms frozen), "
                        "where --lr is the KL per step of its trust region; to compare the geometry of the step")
    p.add_argument("--linear-only", action="store_true", help="kl-rl, ppo, ctrl, vbon: train the weights of the linear layers "
                   "alone, embeddings and norms frozen (what --optimizer kfac trains), to compare optimizers on the same parameters")
    p.add_argument("--fisher-samples", type=int, default=128, help="kfac: reference samples (4 of each training opening) of "
                   "the Fisher at pi_ref (default 128)")
    p.add_argument("--kfac-damping", type=float, default=0.1, help="kfac: relative damping of each Kronecker factor (default 0.1)")
    p.add_argument("--lora", type=int, default=0, help="train a LoRA adapter of this rank (tilt.engine.lora; alpha 2r) instead of "
                                                       "every weight; 0 = full fine-tuning (default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                   help="tilt's compute dtype (float32 weights, forward passes under autocast: docs/runs.md, 'Precision'); the "
                        "reference computes the same way. float32 (default) is what the shipped frontier's reference samples used")
    p.add_argument("--keep-weights", action="store_true", help="save the trained weights at the end as OUT/NAME.safetensors "
                   "(full fine-tuning only), for --method merge")
    p.add_argument("--of", nargs="+", default=[], metavar="NAME", help="merge: the runs (their NAME, as in OUT/NAME.json) whose "
                   "kept weights are averaged (tilt.math.merging)")
    p.add_argument("--coefficients", nargs="+", type=float, default=None, metavar="C",
                   help="merge: c_m of theta_ref + lam sum_m c_m (theta_m - theta_ref), one per --of run (default 1/M each: the "
                        "average; 0.5 -0.5 is two runs' half-difference, the part of their movement they do not share)")
    p.add_argument("--scales", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5],
                   help="merge: the lam of theta_ref + lam sum_m c_m (theta_m - theta_ref) to evaluate, ascending (default 0 to 1.5)")
    p.add_argument("--sampler", default="exact", choices=("exact", "auto", "fp16", "int8-smooth", "bf16"),
                   help="SamplingConfig.sampler of the trained policy (default exact: the sampler every run in docs/frontier.md "
                        "used; evaluations decode with the model itself whatever this says)")
    p.add_argument("--tag", default="", help="a variant's name: the run is saved as OUT/METHOD.TAG.json, so that several settings "
                                             "of one method sit side by side in --table")
    args = p.parse_args(argv)
    if not args.table and not args.method:
        p.error("give --method METHOD (or --table)")
    if args.method == "merge" and not args.of:
        p.error("--method merge needs --of NAME [NAME ...]: runs made with --keep-weights")
    if args.method == "merge" and args.coefficients is not None and len(args.coefficients) != len(args.of):
        p.error(f"--coefficients takes one value per --of run: {len(args.coefficients)} for {len(args.of)}")
    if args.method == "merge" and sorted(args.scales) != args.scales:
        p.error(f"--scales must be ascending, got {args.scales}")
    if (args.optimizer != "adamw" or args.linear_only) and args.method not in ("kl-rl", "ppo", "ctrl", "vbon"):
        p.error(f"--optimizer and --linear-only apply to kl-rl, ppo, ctrl and vbon, not {args.method}")
    if args.optimizer == "kfac" and (args.lr is None or args.lora):
        p.error("--optimizer kfac needs --lr (its KL per step in nats, e.g. 0.005) and full fine-tuning (no --lora)")
    if args.train_on_eval and args.train_prompts is not None:
        p.error("--train-on-eval trains on the evaluated prompts; it does not take --train-prompts")
    if args.keep_weights and args.lora:
        p.error("--keep-weights saves full fine-tuned weights; it does not take --lora")
    return args


# --- evaluation and read-off ----------------------------------------------------------------------------------------
class Evaluator:
    """Held-out evaluation against the frontier's own reference samples (``tilt.frontier.evaluate_on_frontier``)."""

    def __init__(self, frontier, ref, reward_fn, samples: int, seed: int):
        self.frontier, self.ref, self.reward_fn, self.samples, self.seed = frontier, ref, reward_fn, samples, seed

    def __call__(self, policy, step: int, seconds: float) -> dict:
        from tilt.frontier import evaluate_on_frontier
        from tilt.recipes.common import derive_seed

        metrics, draws = evaluate_on_frontier(self.frontier, policy, self.ref, self.reward_fn, samples_per_prompt=self.samples,
                                              seed=derive_seed(self.seed, "bench-eval", step), num_resamples=300)
        return {"step": step, "seconds": seconds, **metrics, "example": draws.completions[0][0]}


def read_off(evals: list[dict], kl: float, frontier) -> dict | None:
    """Values at held-out KL ``kl``: linear interpolation between the first two consecutive evaluations whose KL
    estimates bracket it (None if the run never reached it)."""
    from tilt.math.frontier import efficiency

    for a, b in zip(evals, evals[1:]):
        if a["kl_ref"] <= kl <= b["kl_ref"] and b["kl_ref"] > a["kl_ref"]:
            t = (kl - a["kl_ref"]) / (b["kl_ref"] - a["kl_ref"])

            def mix(key, i=None):
                va, vb = (a[key], b[key]) if i is None else (a[key][i], b[key][i])
                return va + t * (vb - va)

            wr, star = mix("win_rate"), frontier.wr_star(kl)
            return {"kl": kl, "step": mix("step"), "seconds": mix("seconds"), "win_rate": wr,
                    "win_rate_ci": [mix("win_rate_ci", 0), mix("win_rate_ci", 1)], "reward_mean": mix("reward_mean"),
                    "reward_mean_ci": [mix("reward_mean_ci", 0), mix("reward_mean_ci", 1)], "frontier_win_rate": star,
                    "efficiency": efficiency(wr, star),
                    "efficiency_ci": [efficiency(mix("win_rate_ci", 0), star), efficiency(mix("win_rate_ci", 1), star)]}
    return None


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
    tmp.replace(path)


# --- the methods ----------------------------------------------------------------------------------------------------
def run_method(args, frontier, policy, ref, reward_fn, train_prompts, on_step, note) -> None:
    """Train ``policy`` with ``args.method``; ``on_step(step)`` after each optimisation step; ``note(config)`` with the
    settings used, before training (a run stopped early keeps them)."""
    from tilt.recipes import bc, dpg, kl_rl, online_dpo

    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    beta = args.beta if args.beta is not None else DEFAULT_BETA[args.method]
    common = dict(steps=args.steps, prompts_per_step=args.prompts_per_step, lr=lr, seed=args.seed)
    hook = lambda step, metrics: on_step(step + 1, metrics)  # noqa: E731 (the recipes count steps from 0)
    if args.method in ("bond", "bonbon", "apo", "qrpo"):
        import dataclasses
        import importlib

        recipe = importlib.import_module(f"tilt.recipes.{args.method}")
        cls = {"bond": "BONDConfig", "bonbon": "BoNBoNConfig", "apo": "APOConfig", "qrpo": "QRPOConfig"}[args.method]
        names = {f.name for f in dataclasses.fields(getattr(recipe, cls))}
        given = {**common, "samples_per_prompt": args.samples_per_prompt, "n": args.best_of, "beta": beta,
                 "calibration_samples": args.calibration_samples}
        config = getattr(recipe, cls)(**{k: v for k, v in given.items() if k in names and v is not None})
        note(dataclasses.asdict(config))
        recipe.train(config, policy, ref, reward_fn, train_prompts, on_step=hook)
        return
    if args.method == "vbon":
        from tilt.bon_target import BestOfNReward, SampleCDF
        from tilt.infalign import build_calibration
        from tilt.recipes.common import derive_seed

        cal = build_calibration(ref, reward_fn, train_prompts, args.calibration_samples, seed=derive_seed(args.seed, "calibration"))
        optimizer, extra = step_optimizer(args, policy, train_prompts, lr)
        config = kl_rl.KLRLConfig(beta=beta, samples_per_prompt=args.samples_per_prompt, kl_penalty=args.kl_penalty,
                                  optimizer="sgd" if args.optimizer == "sgd" else "adamw", **common)
        note({**kl_rl.config_dict(config), **extra})
        kl_rl.train(config, policy, ref, BestOfNReward(reward_fn, SampleCDF(cal), args.best_of), train_prompts, optimizer=optimizer,
                    on_step=hook)
        return
    if args.method in ("kl-rl", "ppo", "ctrl"):
        reward = reward_fn
        if args.method == "ctrl":
            from tilt.infalign import CalibratedReward, build_calibration
            from tilt.recipes.common import derive_seed

            cal = build_calibration(ref, reward_fn, train_prompts, args.calibration_samples, seed=derive_seed(args.seed, "calibration"))
            reward = CalibratedReward(reward_fn, cal)
        optimizer, extra = step_optimizer(args, policy, train_prompts, lr)
        config = kl_rl.KLRLConfig(beta=beta, samples_per_prompt=args.samples_per_prompt, kl_penalty=args.kl_penalty,
                                  ppo_epochs=4 if args.method == "ppo" else 1, optimizer="sgd" if args.optimizer == "sgd" else "adamw",
                                  **common)
        note({**kl_rl.config_dict(config), **extra})
        kl_rl.train(config, policy, ref, reward, train_prompts, optimizer=optimizer, on_step=hook)
        return
    if args.method == "dpg":
        from tilt.target import TiltedTarget

        config = dpg.DPGConfig(samples_per_prompt=args.samples_per_prompt, **common)
        note({**common, "beta": beta, "samples_per_prompt": args.samples_per_prompt})
        dpg.train(config, policy, TiltedTarget(ref, reward_fn, beta), train_prompts, on_step=hook)
        return
    if args.method == "online-dpo":
        from tilt.preferences import RewardComparison

        config = online_dpo.OnlineDPOConfig(scheme="online-dpo", alpha=0.0, beta=beta, **common)
        note({**common, "beta": beta, "scheme": "online-dpo"})
        online_dpo.train(config, policy, ref, RewardComparison(reward_fn), train_prompts, on_step=hook)
        return
    if args.method == "bc-bon":
        from tilt.bon import best_of_n
        from tilt.recipes.common import derive_seed

        g = torch.Generator().manual_seed(derive_seed(args.seed, "bc-bon"))
        sel = best_of_n(ref, train_prompts, args.best_of, reward_fn, generator=g)
        flat = torch.arange(len(train_prompts)) * args.best_of + sel.index
        demos = sel.rollout.take(flat)
        config = bc.BCConfig(steps=args.steps, sequences_per_step=args.prompts_per_step * args.samples_per_prompt, lr=lr, seed=args.seed)
        note({"steps": args.steps, "lr": lr, "best_of": args.best_of, "demos": len(train_prompts),
              "sequences_per_step": config.sequences_per_step})
        bc.train(config, policy, demos, on_step=hook)
        return
    run_trl(args, policy, reward_fn, train_prompts, on_step, lr, beta, note)


def step_optimizer(args, policy, train_prompts, lr: float):
    """(optimizer, settings to record): None for adamw and sgd, which the recipe builds from its config over the
    trainable parameters (with ``--linear-only``, the linear layers' weights alone); for kfac, the natural gradient on
    the linear layers (everything else frozen) with K-FAC factors fitted to the Fisher
    of the initial policy, pi_ref, from its own samples of the first training openings, and ``lr`` as its KL per
    step. The fitting's time falls in the first step's training time."""
    from tilt.engine.kfac import KFACNaturalGradient, linear_layers

    if args.optimizer != "kfac" and not args.linear_only:
        return None, {}
    layers = linear_layers(policy.model)
    trained = {id(m.weight) for m in layers}
    for p in policy.model.parameters():
        p.requires_grad_(id(p) in trained)
    if args.optimizer != "kfac":  # the recipe builds its optimizer over the parameters left trainable
        return None, {"linear_only": True, "trained_parameters": sum(m.weight.numel() for m in layers)}
    from tilt.recipes.common import derive_seed

    optimizer = KFACNaturalGradient(layers, kl_per_step=lr, damping=args.kfac_damping)
    g = torch.Generator().manual_seed(derive_seed(args.seed, "fisher"))
    k, per_batch = 4, 8
    prompts = [train_prompts[i % len(train_prompts)] for i in range(max(1, args.fisher_samples // k))]
    t0 = time.perf_counter()
    info = optimizer.fit_fisher(policy, (policy.sample(prompts[i:i + per_batch], k, generator=g, exact=True)
                                         for i in range(0, len(prompts), per_batch)))
    seconds = time.perf_counter() - t0
    print(f"  [kfac] Fisher of pi_ref from {info['fisher_sequences']:.0f} samples ({info['fisher_positions']:.0f} positions), "
          f"{len(layers)} linear layers, {seconds:.0f} s", flush=True)
    return optimizer, {"optimizer": "kfac", "kl_per_step": lr, "kfac_damping": args.kfac_damping, "fisher_seconds": seconds,
                       "trained_parameters": sum(m.weight.numel() for m in layers), **info}


def run_trl(args, policy, reward_fn, train_prompts, on_step, lr: float, beta: float, note) -> None:
    """TRL's RLOOTrainer or GRPOTrainer with its documented defaults except the batch, length and steps, which match
    the tilt runs (prompts_per_step x samples_per_prompt completions per step, sampled at temperature 1 without top-k
    or top-p so that the samples are the policy's own). Evaluated through a callback that points the benchmark's
    ``policy`` at the trainer's model. Needs the benchmark venv (``make bench``)."""
    import tempfile

    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        import trl
    except ImportError:
        raise SystemExit(f"{args.method} needs TRL: run this script with the benchmark venv's python (make bench builds .venv-bench)") from None
    if args.method == "trl-rloo":
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    model_path = args.model
    if args.model == "embedded":  # TRL rebuilds the reference from a path: hand it the converted folder
        from tilt.engine.embedded import ensure_embedded_model

        model_path = str(ensure_embedded_model())

    class Evaluate(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            policy.model = model
            was_training = model.training
            model.eval()
            try:
                on_step(state.global_step, {})
            finally:
                model.train(was_training)

    def reward(completions, prompts=None, **kwargs):
        return [float(x) for x in reward_fn(prompts, completions)]

    from tilt.runs.setup import pick_dtype

    # TRL's own defaults are bf16 autocast and gradient checkpointing (RLOOConfig/GRPOConfig notes): bf16 ran a step in
    # 274 s instead of about 25 on a CPU without native bfloat16 (AVX2), so TRL gets the dtype tilt's `auto` picks on
    # the machine at hand, and no checkpointing (a 135M model needs none; tilt does not checkpoint either).
    bf16 = pick_dtype("auto", "cpu") == torch.bfloat16
    batch = args.prompts_per_step * args.samples_per_prompt
    note({"trl_version": trl.__version__, "lr": lr, "beta": beta, "steps": args.steps, "bf16": bf16, "gradient_checkpointing": False,
          "per_device_train_batch_size": batch, "num_generations": args.samples_per_prompt})
    with tempfile.TemporaryDirectory() as out:
        config = Config(output_dir=out, per_device_train_batch_size=batch, num_generations=args.samples_per_prompt,
                        max_completion_length=policy.sampling.max_new_tokens, learning_rate=lr, beta=beta, max_steps=args.steps,
                        bf16=bf16, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, temperature=1.0, top_p=1.0, top_k=0)
        trainer = Trainer(model=model_path, reward_funcs=reward, args=config, train_dataset=Dataset.from_dict({"prompt": list(train_prompts)}),
                          callbacks=[Evaluate()])
        trainer.train()


def save_weights(model, path: Path) -> Path:
    """The model's weights as safetensors (shared tensors, such as tied embeddings, stored once), written atomically."""
    from safetensors.torch import save_model

    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    tmp.replace(path)
    return path


def merge_and_evaluate(args, out: Path, policy, ref, record: dict, evaluate_now, train_seconds: list) -> None:
    """``--method merge``: combine the task vectors of the runs ``--of`` (their kept weights; the average unless
    ``--coefficients``), then evaluate theta_ref + lam sum_m c_m (theta_m - theta_ref) at each of ``--scales``
    (``tilt.math.merging``). Each evaluation's ``step`` is the index of its scale; ``seconds`` is the runs' training
    time added up."""
    from safetensors.torch import load_model

    from tilt.math.merging import interpolate_task_vectors, task_vector_cosine

    ref_state = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    states, seconds = [], 0.0
    for name in args.of:
        rec_path, weights = out / f"{name}.json", out / f"{name}.safetensors"
        if not weights.exists() or not rec_path.exists():
            raise SystemExit(f"merge: {weights} or {rec_path} is missing; run that method with --keep-weights and --out {out}")
        source = json.loads(rec_path.read_text())
        if not source.get("done"):
            raise SystemExit(f"merge: {rec_path} is unfinished; finish that run first")
        load_model(policy.model, str(weights))
        states.append({k: v.detach().clone() for k, v in policy.model.state_dict().items()})
        seconds += source.get("train_seconds", math.nan)
    cosines = [task_vector_cosine(ref_state, states[i], states[j]) for i in range(len(states)) for j in range(i + 1, len(states))]
    record["config"] = {"of": list(args.of), "coefficients": args.coefficients, "scales": list(args.scales), "task_vector_cosines": cosines}
    if cosines:
        print(f"  [merge] cosines of the runs' task vectors: {', '.join(f'{c:.3f}' for c in cosines)}", flush=True)
    train_seconds[0] = seconds
    for i, lam in enumerate(args.scales):
        with torch.no_grad():
            policy.model.load_state_dict(interpolate_task_vectors(ref_state, states, lam, coefficients=args.coefficients))
        evaluate_now(i)
        record["evals"][-1]["scale"] = lam


def run(args) -> int:
    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.loading import load_model_and_tokenizer
    from tilt.frontier import Frontier, task_prompts
    from tilt.reward_fns import reward_from_spec

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.method}.{args.tag}" if args.tag else args.method
    path = out / f"{name}.json"
    if path.exists() and json.loads(path.read_text()).get("done") and not args.force:
        print(f"{name}: already done ({path}); --force reruns it")
        return 0
    frontier = Frontier.load(args.frontier)
    frontier = frontier.head(args.eval_prompts or frontier.data["meta"]["prompts"])
    max_new = frontier.data["meta"].get("max_new_tokens")
    if max_new is None:
        raise SystemExit(f"{args.frontier} does not say its max_new_tokens; rebuild it with `tilt frontier`")
    sampling = SamplingConfig(max_new_tokens=max_new, sampler=args.sampler)
    model, tokenizer = load_model_and_tokenizer(args.model)
    from tilt.runs.setup import pick_dtype

    compute = pick_dtype(args.dtype, "cpu")
    ref = HFPolicy(copy.deepcopy(model).requires_grad_(False), tokenizer, sampling, compute_dtype=compute)
    if args.lora:
        from tilt.engine.lora import LoraSettings, add_lora

        model = add_lora(model, LoraSettings(r=args.lora, alpha=2.0 * args.lora))
    policy = HFPolicy(model, tokenizer, sampling, compute_dtype=compute)
    reward_fn = reward_from_spec(args.reward)
    evaluate = Evaluator(frontier, ref, reward_fn, args.eval_samples, args.seed)
    if args.train_on_eval and not frontier.data.get("prompts"):
        raise SystemExit(f"{args.frontier} does not list its prompts, so --train-on-eval cannot train on them")
    train_prompts = list(frontier.data["prompts"]) if args.train_on_eval else task_prompts("train")[:args.train_prompts]
    start = time.perf_counter()
    record = {"method": args.method, "name": name, "args": vars(args), "frontier": str(args.frontier), "evals": [], "done": False,
              "train_prompts": len(train_prompts),
              "load": open("/proc/loadavg").read().split()[:3]}

    def evaluate_now(step: int) -> None:
        t0 = time.perf_counter()
        row = evaluate(policy, step, train_seconds[0])
        row["eval_seconds"] = time.perf_counter() - t0
        record["evals"].append(row)
        write_atomic(path, record)
        print(f"  [{name}] step {step:3d}  held-out KL {row['kl_ref']:.3f}  win rate {row['win_rate']:.3f} "
              f"[{row['win_rate_ci'][0]:.3f}, {row['win_rate_ci'][1]:.3f}]  WR* {row['frontier_win_rate']:.3f}  "
              f"efficiency {row['efficiency']:.2f}  reward {row['reward_mean']:+.3f}  (train {train_seconds[0]:.0f} s)", flush=True)

    train_seconds = [0.0]  # wall time spent training, evaluations excluded
    last = [time.perf_counter()]

    def on_step(step: int, metrics: dict) -> None:
        train_seconds[0] += time.perf_counter() - last[0]
        if step % args.eval_every == 0:
            evaluate_now(step)
            if record["evals"][-1]["kl_ref"] > args.stop_kl:
                raise Stop
        if train_seconds[0] > 60 * args.max_minutes:
            if record["evals"][-1]["step"] != step:  # the policy the run ends with is evaluated too
                evaluate_now(step)
            raise Stop
        last[0] = time.perf_counter()

    if args.method == "merge":
        merge_and_evaluate(args, out, policy, ref, record, evaluate_now, train_seconds)
    else:
        evaluate_now(0)
        last[0] = time.perf_counter()
        try:
            run_method(args, frontier, policy, ref, reward_fn, train_prompts, on_step, lambda config: record.update(config=config))
        except Stop:
            pass
        if args.keep_weights:
            record["weights"] = str(save_weights(policy.model, out / f"{name}.safetensors"))
    record["read_off"] = {str(kl): read_off(record["evals"], kl, frontier) for kl in TARGET_KLS}
    record.update(done=True, train_seconds=train_seconds[0], wall_seconds=time.perf_counter() - start)
    write_atomic(path, record)
    print(f"{name}: written {path}")
    return 0


GOALS = {"best": 0.9, "kl-rl": 0.7}
"""The frontier issue's goals at KL 1 nat: the best tilt method's efficiency, and KL-RL's (docs/frontier.md)."""
GOAL_KL = 1.0


def goal_check(records: dict[str, dict], kl: float = GOAL_KL) -> list[str]:
    """Lines that say how far the runs of one directory are from the goals at ``kl``: the best tilt run and the best
    KL-RL run (by efficiency; a maximum over noisy runs, so if anything optimistic) against ``GOALS``, and against the
    best TRL run at the same KL, with whether their intervals separate. Runs trained on the evaluated prompts
    (``--train-on-eval``) are not held-out runs and are left out; so are unfinished ones."""
    read = {}
    for name, rec in records.items():
        r = (rec.get("read_off") or {}).get(str(kl))
        if r is not None and rec.get("done") and not rec["args"].get("train_on_eval"):
            read[name] = (rec["method"], r)

    def best(keep):
        cands = [(r["efficiency"], name, r) for name, (method, r) in read.items() if keep(method)]
        return max(cands, key=lambda c: c[0]) if cands else None
    tilt_best = best(lambda m: not m.startswith("trl-"))
    klrl_best = best(lambda m: m == "kl-rl")
    trl_best = best(lambda m: m.startswith("trl-"))
    lines = [f"goals at KL {kl:g} (docs/frontier.md): the best tilt method >= {GOALS['best']}, KL-RL >= {GOALS['kl-rl']}, both ahead of TRL"]
    for label, found, goal in (("best tilt run", tilt_best, GOALS["best"]), ("best KL-RL run", klrl_best, GOALS["kl-rl"])):
        if found is None:
            lines.append(f"  {label}: none reached KL {kl:g}")
            continue
        eff, name, r = found
        lo, hi = r["efficiency_ci"]
        if eff >= goal:
            verdict = "met" if lo >= goal else "met at the estimate, the interval reaching below"
        else:
            verdict = f"short by {goal - eff:.2f}" + (f" (the interval's top is {goal - hi:.2f} short)" if hi < goal else ", within the interval")
        lines.append(f"  {label}: {name} {eff:.2f} [{lo:.2f}, {hi:.2f}] against {goal}: {verdict}")
    if tilt_best is not None and trl_best is not None:
        (e1, n1, r1), (e2, n2, r2) = tilt_best, trl_best
        apart = r1["efficiency_ci"][0] > r2["efficiency_ci"][1] or r2["efficiency_ci"][0] > r1["efficiency_ci"][1]
        lines.append(f"  against TRL: {n1} {e1:.2f} and {n2} {e2:.2f}, difference {e1 - e2:+.2f}: "
                     f"{'the intervals separate' if apart else 'the intervals overlap, so neither is shown ahead'}")
    else:
        lines.append("  against TRL: no TRL run in this directory reached that KL")
    return lines


def table(args) -> int:
    from tilt.cli.output import table as fmt_table
    from tilt.frontier import Frontier, plot_frontier

    out = Path(args.out)
    frontier, rows, runs, records = None, [], {}, {}
    order = {m: i for i, m in enumerate(METHODS)}
    records_read = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    for rec in sorted((r for r in records_read if r.get("method") in order), key=lambda r: (order[r["method"]], r.get("name", ""))):
        method = rec.get("name", rec["method"])
        method = method if rec.get("done") else f"{method} (unfinished)"
        runs[method], records[method] = rec["evals"], rec
        if frontier is None:
            frontier = Frontier.load(args.frontier)
            frontier = frontier.head(rec["args"].get("eval_prompts") or frontier.data["meta"]["prompts"])
        for kl in TARGET_KLS:
            r = (rec.get("read_off") or {}).get(str(kl))
            if r is None:
                rows.append([method, f"{kl:g}", "not reached", "", "", "", ""])
                continue
            rows.append([method, f"{kl:g}", f"{r['efficiency']:.2f} [{r['efficiency_ci'][0]:.2f}, {r['efficiency_ci'][1]:.2f}]",
                         f"{r['win_rate']:.3f} [{r['win_rate_ci'][0]:.3f}, {r['win_rate_ci'][1]:.3f}]", f"{r['frontier_win_rate']:.3f}",
                         f"{r['reward_mean']:+.3f} [{r['reward_mean_ci'][0]:+.3f}, {r['reward_mean_ci'][1]:+.3f}]", f"{r['seconds']:.0f}"])
    if frontier is None:
        raise SystemExit(f"no finished method in {out}")
    print(fmt_table(["method", "KL", "efficiency", "win rate", "WR*(KL)", "mean reward", "train s"], rows))
    print()
    print(fmt_table(["method", "steps", "last held-out KL", "last win rate", "last efficiency", "train s", "s/step", "wall s", "load"],
                    [[m, r["evals"][-1]["step"], f"{r['evals'][-1]['kl_ref']:.3f} [{r['evals'][-1]['kl_ref_ci'][0]:.3f}, {r['evals'][-1]['kl_ref_ci'][1]:.3f}]",
                      f"{r['evals'][-1]['win_rate']:.3f}", f"{r['evals'][-1]['efficiency']:.2f}", f"{r.get('train_seconds', math.nan):.0f}",
                      f"{r.get('train_seconds', math.nan) / max(r['evals'][-1]['step'], 1):.1f}", f"{r.get('wall_seconds', math.nan):.0f}",
                      " ".join(r.get("load", []))] for m, r in records.items()]))
    print()
    print("\n".join(goal_check(records)))
    plot = plot_frontier(frontier, out / "frontier.png", runs=runs)
    print(f"plot: {plot}")
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return table(args) if args.table else run(args)


if __name__ == "__main__":
    sys.exit(main())
