"""The options every tabular-lab command shares: the world, and the training of a tabular policy."""
from __future__ import annotations

import argparse


def add_world_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the world")
    g.add_argument("--vocab", type=int, default=3, help="vocabulary size V (default 3)")
    g.add_argument("--length", type=int, default=3, help="sequence length L; the support has V^L sequences (default 3)")
    g.add_argument("--contexts", type=int, default=1, help="number of contexts (prompts), each with its own reference (default 1)")
    g.add_argument("--reward", default="count:2", help="count:K (fraction of token K), contains:K (0/1 filter) or random (default count:2)")
    g.add_argument("--reward-seed", type=int, default=0, help="seed of a random reward (default 0)")
    g.add_argument("--beta", type=float, default=0.3, help="KL coefficient / temperature of the target (default 0.3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the reference logits and of sampling (default 0)")


def add_training_options(p: argparse.ArgumentParser) -> None:
    from tilt.runs.config import module_constant

    LAB_LR = module_constant("tilt.lab.drivers", "LAB_LR")

    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=3000, help="optimisation steps (default 3000)")
    g.add_argument("--batch", type=int, default=64, help="samples per step, split evenly over contexts (default 64)")
    g.add_argument("--lr", type=float, default=LAB_LR, help=f"learning rate (default {LAB_LR}, decayed linearly to 0)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer on the logits (default adamw)")
    g.add_argument("--lr-schedule", choices=["linear", "constant"], default="linear", help="(default linear)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="1 = REINFORCE with leave-one-out baseline; >1 = PPO-clip")
    g.add_argument("--kl-penalty", choices=["reward", "loss"], default="reward", help="where the KL term goes (default reward)")
    g.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default="k1", help="estimator when --kl-penalty loss")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
