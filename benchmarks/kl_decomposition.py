"""Where a trained policy's KL goes, token by token: how much of KL(pi || pi_ref) on held-out openings its change of
next-token entropy alone costs, against what else it spends.

At each position t of the policy's own samples, the exact next-token KL_t = KL(pi_t || q_t) (q = pi_ref, whole
vocabulary) splits into the entropy floor, the least KL any distribution with pi_t's entropy pays (the tempered
q^lam with that entropy, ``tilt.math.kl.entropy_floor_kl``), and the rest. Summed over a completion's positions,
the mean of KL_t is the full-vocabulary KL the frontier benchmark reports. The same for the reference's own samples
at a temperature T (its logits divided by T), which spend KL on sharpening alone: ``--temperatures``.

    python benchmarks/kl_decomposition.py --weights benchmarks/results/frontier_merge/kl-rl.s0.safetensors \\
        --scales 0.5 1 --temperatures 0.8 0.9 --prompts 32 --samples 4 --threads 2 --dtype auto

``--scales`` evaluates theta_ref + lam (theta - theta_ref) (the line back to the reference, tilt.math.merging).
Prints one row per policy: the KL (its interval over prompts), the entropy floor, the mean per-token entropy of the
policy and of the reference at the same positions, and the mean reward.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch


def decompose(policy, ref, prompts, samples: int, reward_fn, seed: int, temperature: float = 1.0) -> dict:
    """Per-sequence sums over the policy's own samples of KL_t, its entropy floor, H(pi_t) and H(q_t), with means
    and 95% intervals over prompts (a normal interval of the per-prompt means); ``temperature`` divides the
    policy's logits (1: the policy itself)."""
    from tilt.math.kl import entropy, entropy_floor_kl, full_token_kl

    g = torch.Generator().manual_seed(seed)
    rows = {"kl": [], "floor": [], "h_pi": [], "h_ref": [], "reward": [], "tokens": []}
    for i in range(0, len(prompts), 8):
        batch = prompts[i:i + 8]
        with torch.no_grad():
            rollout = policy.sample(batch, samples, generator=g, exact=True)  # at the policy's sampling temperature
            log_pi = torch.log_softmax(policy.token_log_softmax(rollout) / temperature, -1)  # = log softmax(logits / T)
            log_q = ref.token_log_softmax(rollout)
        mask = rollout.completion_mask
        h_pi, h_q = entropy(log_pi), entropy(log_q)
        floor_t, _ = entropy_floor_kl(log_q, h_pi)
        rewards = torch.as_tensor(reward_fn(rollout.prompts, rollout.completions), dtype=torch.float64)
        rows["kl"].append(full_token_kl(log_pi, log_q, mask).double().view(len(batch), samples).mean(-1))
        for name, value in (("floor", floor_t), ("h_pi", h_pi), ("h_ref", h_q)):
            rows[name].append(torch.where(mask, value.double(), 0.0).sum(-1).view(len(batch), samples).mean(-1))
        rows["reward"].append(rewards.view(len(batch), samples).mean(-1))
        rows["tokens"].append(mask.sum(-1).double().view(len(batch), samples).mean(-1))
    out = {}
    for name, parts in rows.items():
        per_prompt = torch.cat(parts)
        mean, se = float(per_prompt.mean()), float(per_prompt.std() / len(per_prompt) ** 0.5)
        out[name] = mean
        out[f"{name}_ci"] = [mean - 1.96 * se, mean + 1.96 * se]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="*", default=[], help="safetensors of kept runs (benchmarks/frontier.py --keep-weights)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="lam of theta_ref + lam (theta - theta_ref) (default 1)")
    p.add_argument("--temperatures", type=float, nargs="*", default=[], help="also the reference at these temperatures")
    p.add_argument("--prompts", type=int, default=32, help="the first P held-out openings (default 32)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--model", default="embedded", help="the reference model the kept weights were trained from (default embedded)")
    p.add_argument("--reward", default="sentiment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not args.weights and not args.temperatures:
        p.error("give --weights FILE ... and/or --temperatures T ...")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from safetensors.torch import load_model

    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.loading import load_model_and_tokenizer
    from tilt.frontier import task_prompts
    from tilt.math.merging import interpolate_task_vectors
    from tilt.reward_fns import reward_from_spec
    from tilt.runs.setup import pick_dtype

    model, tokenizer = load_model_and_tokenizer(args.model)
    compute = pick_dtype(args.dtype, "cpu")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    ref = HFPolicy(copy.deepcopy(model).requires_grad_(False), tokenizer, sampling, compute_dtype=compute)
    policy = HFPolicy(model.requires_grad_(False), tokenizer, sampling, compute_dtype=compute)
    reward_fn = reward_from_spec(args.reward)
    prompts = task_prompts("heldout")[:args.prompts]
    ref_state = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}; load {' '.join(open('/proc/loadavg').read().split()[:3])}; {len(prompts)} held-out openings x {args.samples}")
    print(f"{'policy':<44} {'KL':>22} {'entropy floor':>14} {'share':>6} {'H(pi)/tok':>9} {'H(ref)/tok':>10} {'reward':>7}")
    results = []

    def show(name, row):
        share = row["floor"] / row["kl"] if row["kl"] > 0 else float("nan")
        print(f"{name:<44} {row['kl']:7.3f} [{row['kl_ci'][0]:6.3f}, {row['kl_ci'][1]:6.3f}] {row['floor']:14.3f} {share:6.2f} "
              f"{row['h_pi'] / row['tokens']:9.3f} {row['h_ref'] / row['tokens']:10.3f} {row['reward']:+7.3f}", flush=True)
        results.append({"policy": name, **row, "floor_share": share})

    for t in args.temperatures:
        tempered = HFPolicy(ref.model, tokenizer, SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=t), compute_dtype=compute)
        show(f"reference at temperature {t}", decompose(tempered, ref, prompts, args.samples, reward_fn, args.seed, temperature=t))
    for path in args.weights:
        load_model(policy.model, path)
        trained = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
        for lam in args.scales:
            policy.model.load_state_dict(interpolate_task_vectors(ref_state, [trained], lam))
            show(f"{os.path.basename(path)} lam {lam:g}", decompose(policy, ref, prompts, args.samples, reward_fn, args.seed))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "cpu": cpu, "rows": results, "time": time.time()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
