"""Where the KL goes in the first steps: held-out KL(pi || pi_ref) of the embedded model after each of the first few
KL-RL steps, for several learning rates and for Adam against SGD, with the spread of the k1 and k3 estimates.

Adam's first update moves every parameter by about lr in the direction of its gradient's sign, whatever the
gradient's size (m_1/sqrt(v_1) = g/|g|), so the KL of the first steps is set by lr and the parameter count, not by
the reward's signal. This measures it.

    python benchmarks/kl_first_steps.py --lrs 1e-5 3e-6 1e-6 --steps 4 --out bench/kl_first_steps.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-6, 1e-6])
    p.add_argument("--optimizers", nargs="+", default=["adamw"], help="adamw and/or sgd")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.loading import load_model_and_tokenizer
    from tilt.evaluation import draw_scored, sequence_kl_terms
    from tilt.frontier import task_prompts
    from tilt.recipes import kl_rl
    from tilt.reward_fns import reward_from_spec

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    model0, tok = load_model_and_tokenizer("embedded")
    ref = HFPolicy(copy.deepcopy(model0).requires_grad_(False), tok, sampling)
    reward = reward_from_spec("sentiment")
    held, train = task_prompts("heldout")[: args.eval_prompts], task_prompts("train")
    results = []
    for opt in args.optimizers:
        for lr in args.lrs:
            policy = HFPolicy(copy.deepcopy(model0), tok, sampling)
            rows = []

            def on_step(step, metrics):
                g = torch.Generator().manual_seed(1234)
                d = draw_scored(policy, held, args.eval_samples, reward, generator=g, ref=ref)
                terms = sequence_kl_terms(d.seq_log_ratio)
                row = {"step": step + 1, "batch_kl": metrics["kl_ref"], "heldout_kl_k1": terms["k1"].mean().item(),
                       "heldout_kl_k3": terms["k3"].mean().item(), "k1_sd": terms["k1"].std().item(), "k3_sd": terms["k3"].std().item(),
                       "reward": d.rewards.mean().item(), "t": time.perf_counter()}
                rows.append(row)
                print(opt, lr, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

            config = kl_rl.KLRLConfig(beta=args.beta, steps=args.steps, prompts_per_step=args.prompts_per_step,
                                      samples_per_prompt=args.samples_per_prompt, lr=lr, optimizer=opt)
            kl_rl.train(config, policy, ref, reward, train, on_step=on_step)
            results.append({"optimizer": opt, "lr": lr, "rows": rows})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "load": open("/proc/loadavg").read().split()[:3], "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
