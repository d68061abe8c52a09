"""One step of online DPO: tilt (``tilt.recipes.online_dpo``, scheme ``online-dpo``) against TRL's online DPO
trainer (``trl.experimental.online_dpo``), on the same model, prompts, reward (the preferred response of a
pair is the one with the higher reward), pairs per step, completion length, beta, optimizer (AdamW, no
weight decay, no clipping; each side's default kernel, fused on both) and learning rate.

Each side runs in its own process, alternating (tilt, TRL, tilt, TRL, ...); the report has the same columns
as ``rl_step.py``. Not a test: the verdict is the printed ratio.

    python benchmarks/online_dpo_step.py               # tiny Llama, 8 prompts x 2 completions x 32 tokens

Needs TRL (``benchmarks/requirements-bench.txt``); run with the benchmark environment's Python.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from rl_step import load  # noqa: E402


def step_flops(n_params: int, pairs: int, prompt_tokens: float, completion_tokens: float) -> float:
    """Work of one step by the 2N/6N rule, the same for both sides: generating 2 completions per prompt, the
    reference's forward and the policy's forward and backward over both."""
    sequences = 2 * pairs
    full = sequences * (prompt_tokens + completion_tokens)
    return 2 * n_params * sequences * completion_tokens + 2 * n_params * full + 6 * n_params * full


def run_tilt(args, folder: str) -> dict:
    import torch

    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.preferences import RewardComparison
    from tilt.recipes.online_dpo import OnlineDPOConfig, train
    from tilt.recipes.common import build_optimizer

    model, tokenizer = load(args.model, folder)
    ref_model, _ = load(args.model, folder)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    sampling = SamplingConfig(max_new_tokens=args.completion_length)
    policy, ref = HFPolicy(model, tokenizer, sampling), HFPolicy(ref_model, tokenizer, sampling)
    config = OnlineDPOConfig(scheme="online-dpo", alpha=0.0, beta=args.beta, steps=args.steps, prompts_per_step=args.prompts_per_step,
                             lr=args.lr, seed=args.seed)
    optimizer = build_optimizer("adamw", model.parameters(), args.lr)  # tilt's default: fused AdamW, no weight decay
    stamps, rewards = [time.perf_counter()], []
    def on_step(step, metrics):
        stamps.append(time.perf_counter())

    class Recording(RewardComparison):  # records the mean reward of the step's responses, as TRL logs it
        def __call__(self, prompts, a, b, *, generator):
            rewards.append(sum(common.sevens(a) + common.sevens(b)) / (2 * len(a)))
            return super().__call__(prompts, a, b, generator=generator)

    oracle = Recording(lambda prompts, completions: common.sevens(completions))
    train(config, policy, ref, oracle, common.PROMPTS, optimizer=optimizer, on_step=on_step)
    return {"step_times": [b - a for a, b in zip(stamps, stamps[1:])], "rewards": rewards,
            "n_params": sum(p.numel() for p in model.parameters()), "prompt_tokens": common.prompt_tokens(tokenizer)}


def run_trl(args, folder: str) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    model, tokenizer = load(args.model, folder)
    ref_model, _ = load(args.model, folder)
    stamps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = OnlineDPOConfig(
            output_dir=out, per_device_train_batch_size=args.prompts_per_step, max_new_tokens=args.completion_length,
            learning_rate=args.lr, beta=args.beta, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, seed=args.seed, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
            warmup_steps=0, disable_tqdm=True, dataloader_num_workers=0, temperature=1.0, top_p=1.0, top_k=0,
        )
        dataset = Dataset.from_dict({"prompt": common.PROMPTS * 8})

        def reward(completions, **kwargs):
            return common.sevens(completions)

        trainer = OnlineDPOTrainer(model=model, ref_model=ref_model, reward_funcs=reward, args=config, train_dataset=dataset,
                                   processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        rewards = [h.get("objective/scores", float("nan")) for h in logs]  # mean reward of the step's responses
        n_params = sum(p.numel() for p in trainer.model.parameters())
    return {"step_times": [b - a for a, b in zip(stamps, stamps[1:])], "rewards": rewards, "n_params": n_params,
            "trl_version": trl.__version__}


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
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompts-per-step", type=int, default=8, help="pairs per step (two completions each)")
    ap.add_argument("--completion-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta (TRL's online DPO default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=["tilt", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)
    folder = args.folder or tempfile.mkdtemp(prefix="tilt-bench-")
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("side", "folder", "rounds")]
    results = {"tilt": [], "trl": []}
    for r in range(args.rounds):
        for side in ("tilt", "trl"):
            res = common.run_side(sys.executable, os.path.abspath(__file__), [*passthrough, f"--side={side}", f"--folder={folder}"])
            results[side].append(res)
            print(f"round {r} {side:>4}: {common.median(res['step_times'][1:]):.3f} s/step, peak RSS {res['peak_rss_mb']:.0f} MB, "
                  f"matmul {res['matmul_gflops']:.0f} GFLOP/s, load {res['load'][0]:.2f}-{res['load'][1]:.2f}", flush=True)
    per = {}
    for side, runs in results.items():
        per[side] = {"s": common.median([t for res in runs for t in res["step_times"][1:]]),
                     "reward": common.median([res["rewards"][-1] for res in runs]),
                     "rss": max(res["peak_rss_mb"] for res in runs), "mm": common.median([res["matmul_gflops"] for res in runs]),
                     "n": runs[0]["n_params"]}
    flops = step_flops(per["tilt"]["n"], args.prompts_per_step, results["tilt"][0]["prompt_tokens"], args.completion_length)
    print(f"\nTRL {results['trl'][0]['trl_version']}; {args.prompts_per_step} pairs of {args.completion_length} tokens per step; {args.threads} threads")
    print(f"{'':>5}  {'s/step':>7}  {'last reward':>11}  {'peak RSS MB':>11}  {'GFLOP/s':>7}  {'% of matmul':>11}")
    for side, v in per.items():
        achieved = flops / v["s"] / 1e9
        print(f"{side:>5}  {v['s']:>7.3f}  {v['reward']:>11.3f}  {v['rss']:>11.0f}  {achieved:>7.1f}  {100 * achieved / v['mm']:>10.1f}%")
    print(f"speed-up (TRL s/step / tilt s/step): {per['trl']['s'] / per['tilt']['s']:.2f}x; "
          f"memory ratio (tilt / TRL peak RSS): {per['tilt']['rss'] / per['trl']['rss']:.2f}")


if __name__ == "__main__":
    main()
