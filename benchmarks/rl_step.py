"""One online step of KL-regularised RL with a leave-one-out baseline: tilt (``tilt.recipes.kl_rl``) against
TRL's ``RLOOTrainer``, on the same model, prompts, reward, completions per prompt, completion length,
optimizer (AdamW, no weight decay, no clipping; each side's default kernel, fused on both) and learning rate.

Each side runs in its own process, the two alternating (tilt, TRL, tilt, TRL, ...), and reports seconds per
step (median over the steps after the first), the reward of its last steps, its peak resident memory, the
load average during its run, and the step's achieved FLOP/s against the matrix-multiply rate measured in
the same process. Not a test: the verdict is the printed ratio.

    python benchmarks/rl_step.py                       # tiny Llama (32k vocabulary), 4 prompts x 4 completions x 32 tokens
    python benchmarks/rl_step.py --steps 20 --rounds 2 # reward after 20 steps, each side twice
    python benchmarks/rl_step.py --model embedded --completions-per-prompt 4 --prompts-per-step 2
    python benchmarks/rl_step.py --model embedded --sampler exact int8 --reward letter-e   # tilt twice: exact and int8

``--sampler`` runs one tilt side per sampler (``SamplingConfig.sampler``), interleaved with TRL in every round
(tilt:exact, tilt:int8, TRL, ...). The reward columns then also compare the fast sampler's learning with the
exact sampler's: the mean reward of the last five steps with its standard error over those steps. ``--dtype float32
auto`` adds one tilt side per compute dtype (float32 weights, forward passes under autocast: docs/runs.md,
"Precision"); TRL keeps its own defaults (bf16 autocast and gradient checkpointing, printed with its side).

Needs TRL (``benchmarks/requirements-bench.txt``); run with the benchmark environment's Python.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def step_flops(n_params: int, sequences: int, prompt_tokens: float, completion_tokens: float) -> float:
    """The work of one step by the 2N/6N rule, the same for both sides: generation (a forward pass per new
    token), the reference's and the policy's scoring forward passes and the policy's backward pass over
    prompt + completion. Attention and embedding look-ups are left out."""
    full = sequences * (prompt_tokens + completion_tokens)
    return 2 * n_params * sequences * completion_tokens + 2 * n_params * full + 6 * n_params * full


def load(model_arg: str, folder: str):
    from tilt.engine.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(model_arg if model_arg == "embedded" else folder)


def run_tilt(args, folder: str) -> dict:
    import torch

    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.recipes.kl_rl import KLRLConfig, train
    from tilt.recipes.common import build_optimizer

    model, tokenizer = load(args.model, folder)
    ref_model, _ = load(args.model, folder)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    from tilt.runs.setup import pick_dtype

    sampling = SamplingConfig(max_new_tokens=args.completion_length, sampler=args.sampler[0])  # one sampler per tilt side
    compute = pick_dtype(args.dtype[0], "cpu")  # float32 weights, forward passes in this dtype (docs/runs.md, "Precision")
    policy, ref = HFPolicy(model, tokenizer, sampling, compute_dtype=compute), HFPolicy(ref_model, tokenizer, sampling, compute_dtype=compute)
    samplers = {"kind": policy.sampler_kind, "reason": policy.sampler_reason, "compute": str(compute).removeprefix("torch.")}
    config = KLRLConfig(beta=args.beta, steps=args.steps, prompts_per_step=args.prompts_per_step,
                        samples_per_prompt=args.completions_per_prompt, lr=args.lr, seed=args.seed)
    optimizer = build_optimizer("adamw", model.parameters(), args.lr)  # tilt's default: fused AdamW, no weight decay
    stamps, rewards, lengths, logged = [time.perf_counter()], [], [], []
    reward_fn = common.REWARDS[args.reward]

    def on_step(step, metrics):
        stamps.append(time.perf_counter())
        rewards.append(metrics["reward"])
        lengths.append(metrics["completion_length"])
        logged.append({k: metrics[k] for k in ("sampler/kl_q_pi", "sampler/ess_fraction", "sampler/refresh_seconds")})

    train(config, policy, ref, lambda prompts, completions: reward_fn(completions), common.PROMPTS, optimizer=optimizer, on_step=on_step)
    return {"step_times": [b - a for a, b in zip(stamps, stamps[1:])], "rewards": rewards, "completion_length": lengths,
            "n_params": sum(p.numel() for p in model.parameters()), "prompt_tokens": common.prompt_tokens(tokenizer),
            "sampler": samplers, "sampler_metrics": logged}


def run_trl(args, folder: str) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    model_path = folder
    if args.model == "embedded":  # TRL rebuilds the reference from a path: hand it the converted folder
        from tilt.engine.embedded import ensure_embedded_model

        model_path = str(ensure_embedded_model())
    stamps, lengths = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = RLOOConfig(
            output_dir=out, per_device_train_batch_size=args.prompts_per_step * args.completions_per_prompt,
            num_generations=args.completions_per_prompt, max_completion_length=args.completion_length,
            learning_rate=args.lr, beta=args.beta, max_steps=args.steps, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, seed=args.seed, weight_decay=0.0, max_grad_norm=0.0,
            lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=True, dataloader_num_workers=0,
            temperature=1.0, top_p=1.0, top_k=0,
        )
        dataset = Dataset.from_dict({"prompt": common.PROMPTS * 8})

        def reward(completions, **kwargs):
            return common.REWARDS[args.reward](completions)

        trainer = RLOOTrainer(model=model_path, reward_funcs=reward, args=config, train_dataset=dataset, callbacks=[Clock()])
        trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        lengths = [h.get("completions/mean_length", float("nan")) for h in trainer.state.log_history if "reward" in h]
        n_params = sum(p.numel() for p in trainer.model.parameters())
    return {"step_times": [b - a for a, b in zip(stamps, stamps[1:])], "rewards": rewards, "completion_length": lengths,
            "n_params": n_params, "trl_version": trl.__version__, "bf16": bool(config.bf16),
            "gradient_checkpointing": bool(config.gradient_checkpointing),
            "optim": str(getattr(config.optim, "value", config.optim))}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = common.build_model_folder(args.folder, args.vocab)
    gflops = common.matmul_gflops(args.threads)
    load_before = common.load1()
    result = (run_tilt if args.side == "tilt" else run_trl)(args, folder)
    result.update(side=args.side, matmul_gflops=gflops, load=[load_before, common.load1()], peak_rss_mb=common.peak_rss_mb())
    common.emit(result)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (a Llama built from a config) or 'embedded'")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the tiny model")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--completions-per-prompt", type=int, default=4)
    ap.add_argument("--completion-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="steps per side per round; the first is not timed")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (tilt, TRL)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.05, help="KL coefficient (TRL's RLOO default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampler", nargs="+", default=["auto"], help="tilt sides to run, one per sampler: exact, int8, bf16, auto")
    ap.add_argument("--reward", choices=sorted(common.REWARDS), default="sevens", help="'letter-e' has signal on a real model's text")
    ap.add_argument("--dtype", nargs="+", default=["float32"], help="tilt's compute dtypes, one tilt side per sampler and dtype: "
                                                                   "float32, bfloat16 or auto (bfloat16 where the CPU has it natively)")
    ap.add_argument("--side", choices=["tilt", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)

    folder = args.folder or tempfile.mkdtemp(prefix="tilt-bench-")
    print(common.machine_line(), flush=True)
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("side", "folder", "rounds", "sampler", "dtype")]
    sides = {**{f"tilt:{s}" + (f"/{d}" if d != "float32" else ""): ["--side=tilt", f"--sampler={s}", f"--dtype={d}"]
                for s in args.sampler for d in args.dtype}, "trl": ["--side=trl"]}
    results = {side: [] for side in sides}
    for r in range(args.rounds):
        for side, extra in sides.items():
            res = common.run_side(sys.executable, os.path.abspath(__file__), [*passthrough, *extra, f"--folder={folder}"])
            results[side].append(res)
            times = res["step_times"][1:]
            used = (f" (sampler {res['sampler']['kind']}: {res['sampler']['reason']}; compute {res['sampler']['compute']})" if "sampler" in res
                    else f" (its defaults: bf16 {res.get('bf16')}, gradient checkpointing {res.get('gradient_checkpointing')}, optimizer {res.get('optim')})")
            print(f"round {r} {side:>10}{used}: {common.median(times):.3f} s/step (median of {len(times)}), final reward "
                  f"{res['rewards'][-1]:.3f}, peak RSS {res['peak_rss_mb']:.0f} MB, matmul {res['matmul_gflops']:.0f} GFLOP/s, "
                  f"load {res['load'][0]:.2f}-{res['load'][1]:.2f}", flush=True)
            if res.get("sampler_metrics") and (res["sampler"]["kind"] != "exact" or res["sampler"]["compute"] != "float32"):
                m = res["sampler_metrics"]
                refreshes = [x["sampler/refresh_seconds"] for x in m[1:] if x["sampler/refresh_seconds"] > 0]
                print(f"{'':>19}sampler/kl_q_pi median {common.median([x['sampler/kl_q_pi'] for x in m]):.4f}, ess_fraction median "
                      f"{common.median([x['sampler/ess_fraction'] for x in m]):.3f}, {len(refreshes)} refreshes after step 0, "
                      f"median {common.median(refreshes):.2f} s", flush=True)
    report(args, results)


def report(args, results) -> None:
    per = {}
    for side, runs in results.items():
        times = [t for res in runs for t in res["step_times"][1:]]
        last = [sum(res["rewards"][-3:]) / len(res["rewards"][-3:]) for res in runs]
        tail = [x for res in runs for x in res["rewards"][-5:]]
        stderr = statistics.stdev(tail) / len(tail) ** 0.5 if len(tail) > 1 else float("nan")
        per[side] = {"s_per_step": common.median(times), "mean_s_per_step": statistics.mean(times), "reward_last3": common.median(last),
                     "reward_last5": f"{statistics.mean(tail):.3f} ± {stderr:.3f}",
                     "reward_first": common.median([res["rewards"][0] for res in runs]),
                     "peak_rss_mb": max(res["peak_rss_mb"] for res in runs), "matmul_gflops": common.median([res["matmul_gflops"] for res in runs]),
                     "n_params": runs[0]["n_params"]}
    b = args.prompts_per_step * args.completions_per_prompt
    first_tilt = next(side for side in per if side.startswith("tilt"))
    flops = step_flops(per[first_tilt]["n_params"], b, results[first_tilt][0]["prompt_tokens"], args.completion_length)
    trl_version = results["trl"][0].get("trl_version")
    print(f"\nTRL {trl_version}; {b} completions of {args.completion_length} tokens per step; {args.threads} threads; reward {args.reward}")
    print(f"{'':>10}  {'s/step':>7}  {'mean':>7}  {'reward@1':>8}  {'reward@end':>10}  {'last 5 ± se':>13}  {'peak RSS MB':>11}  {'GFLOP/s':>7}  {'% of matmul':>11}")
    for side, v in per.items():
        achieved = flops / v["s_per_step"] / 1e9
        print(f"{side:>10}  {v['s_per_step']:>7.3f}  {v['mean_s_per_step']:>7.3f}  {v['reward_first']:>8.3f}  {v['reward_last3']:>10.3f}  {v['reward_last5']:>13}  "
              f"{v['peak_rss_mb']:>11.0f}  {achieved:>7.1f}  {100 * achieved / v['matmul_gflops']:>10.1f}%")
    for side in per:
        if side.startswith("tilt"):
            print(f"{side}: speed-up (TRL s/step / tilt s/step) {per['trl']['s_per_step'] / per[side]['s_per_step']:.2f}x "
                  f"(means, refreshes included: {per['trl']['mean_s_per_step'] / per[side]['mean_s_per_step']:.2f}x); "
                  f"memory ratio (tilt / TRL peak RSS) {per[side]['peak_rss_mb'] / per['trl']['peak_rss_mb']:.2f}")
    print(common.machine_line())


if __name__ == "__main__":
    main()
