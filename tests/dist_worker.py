"""A training job launched by ``torchrun`` in tests/test_distributed.py (also importable: the tests build the same
single-process job from ``build_kl_rl`` / ``build_dpo``).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT JOB [JOB ...]

The jobs run one after the other in the same processes (each launch costs seconds of imports). JOB is
RECIPE:MODE[:resume][:crashS] with RECIPE in {kl_rl, dpo} and MODE in {plain, ddp, fsdp}, ``other:RECIPE`` with
RECIPE one of ``OTHER`` (the remaining recipes, replicated, written to OUT/other-RECIPE), or ``errors`` (last: it
ends the launch). Each job trains in OUT/RECIPE-MODE (OUT/RECIPE-MODE-restarted with resume or crash): rank 0 writes metrics.jsonl and result.json, every rank
writes distributed checkpoints after each step, and the trained model is exported to OUT/RECIPE-MODE/final (a
from_pretrained folder). ``resume`` continues from the latest checkpoint; ``crashS``: rank 1 SIGKILLs itself in
the middle of step S (0-based), after the checkpoint of S completed steps.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tilt import distributed  # noqa: E402
from tilt.engine.hf import HFPolicy, SamplingConfig  # noqa: E402
from tilt.engine.tiny import char_tokenizer, tiny_gpt2  # noqa: E402
from tilt.recipes import bc, dpg, dpo, kl_rl, online_dpo, reward_model  # noqa: E402
from tilt.preferences import BradleyTerry  # noqa: E402
from tilt.recipes.common import build_optimizer  # noqa: E402
from tilt.reward_fns import SequenceClassifierReward  # noqa: E402
from tilt.target import TiltedTarget  # noqa: E402

PROMPTS = ["the", "cat", "dog", "why", "sun", "map"]  # one length: no padding differences between batch splits
STEPS = 4


def share_of_a(prompts, completions):
    return [c.count("a") / max(len(c), 1) for c in completions]


def tiny_policy(tok, seed: int = 0) -> HFPolicy:
    return HFPolicy(tiny_gpt2(len(tok), n_layer=2, n_embd=16, n_head=2, n_positions=32, seed=seed), tok,
                    SamplingConfig(max_new_tokens=6))


def build_kl_rl():
    tok = char_tokenizer()
    config = kl_rl.KLRLConfig(beta=0.1, steps=STEPS, prompts_per_step=4, samples_per_prompt=3, lr=1e-2, micro_batch_size=4,
                              max_grad_norm=1.0)
    return config, tiny_policy(tok), tiny_policy(tok), tok


def build_dpo(policy: HFPolicy) -> tuple[dpo.DPOConfig, dpo.PreferencePairs]:
    tok = policy.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    prompts = PROMPTS + ["hat", "bee"]
    chosen = [ids("a" * (1 + i % 3)) for i in range(len(prompts))]
    rejected = [ids("xyz"[: 1 + i % 3]) for i in range(len(prompts))]
    pairs = dpo.PreferencePairs(policy.rollout_from_ids(prompts, chosen), policy.rollout_from_ids(prompts, rejected))
    config = dpo.DPOConfig(beta=0.5, epochs=2, pairs_per_step=4, micro_batch_size=1, lr=1e-2)  # 4 steps
    return config, pairs


OTHER = ("bc", "reward_model", "dpg", "dpg_adaptive", "online_dpo", "xpo")
"""The recipes beyond KL-RL and DPO that must give the one-process result under several processes."""


def train_other(recipe: str, on_step) -> tuple[torch.nn.Module, dict]:
    """Train ``recipe`` (one of OTHER) on tiny seeded inputs, replicated on every rank; returns the trained module and
    a copy of its initial weights.
    Every step's global batch (4 prompts, pairs or demonstrations) splits evenly over 1, 2 or 4 processes."""
    tok = char_tokenizer()
    prompts = PROMPTS + ["hat", "bee"]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    if recipe == "reward_model":
        from transformers import GPT2Config, GPT2ForSequenceClassification

        torch.manual_seed(0)
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=16, n_head=2, n_positions=32,
                                                         num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # dropout: rank-dependent masks
        distributed.replicate(model)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        pairs = [{"prompt": p + " ", "chosen": "a" * (1 + i % 3), "rejected": "xyz"[: 1 + i % 3]} for i, p in enumerate(prompts)]
        reward_model.train(reward_model.RewardModelConfig(epochs=2, pairs_per_step=4, lr=1e-2), SequenceClassifierReward(model, tok),
                           pairs, on_step=on_step)
        return model, initial
    policy = tiny_policy(tok)
    distributed.replicate(policy.model)
    initial = {k: v.clone() for k, v in policy.model.state_dict().items()}
    if recipe == "bc":
        demos = policy.rollout_from_ids(prompts, [ids("a" * (1 + i % 4)) for i in range(len(prompts))])
        bc.train(bc.BCConfig(steps=4, sequences_per_step=4, lr=1e-2, micro_batch_size=1, max_grad_norm=1.0), policy, demos,
                 on_step=on_step)
    elif recipe.startswith("dpg"):
        ref = tiny_policy(tok)
        mode = "adaptive" if recipe == "dpg_adaptive" else "on-policy"
        config = dpg.DPGConfig(steps=STEPS, prompts_per_step=4, samples_per_prompt=3, lr=1e-2, mode=mode, proposal_update_interval=2,
                               max_grad_norm=1.0)
        dpg.train(config, policy, TiltedTarget(ref, share_of_a, beta=0.5), PROMPTS, on_step=on_step)
    else:
        ref = tiny_policy(tok)
        scheme = "online-dpo" if recipe == "online_dpo" else "xpo"
        config = online_dpo.OnlineDPOConfig(steps=STEPS, prompts_per_step=4, lr=1e-2, scheme=scheme, alpha=0.1 if scheme == "xpo" else 0.0,
                                            beta=0.5, regime="streaming")
        online_dpo.train(config, policy, ref, BradleyTerry(share_of_a, scale=5.0), PROMPTS, on_step=on_step)
    return policy.model, initial


def run_other(recipe: str, out: Path) -> None:
    run_dir = out / f"other-{recipe}"
    rows = []
    model, _ = train_other(recipe, lambda step, metrics: rows.append({"step": step, **metrics}))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # tied weights: one copy each
    if distributed.is_main():
        from safetensors.torch import save_file

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        save_file(state, str(run_dir / "final.safetensors"))
        (run_dir / "result.json").write_text(json.dumps({"world_size": distributed.world_size()}))


def prepare(policy: HFPolicy, mode: str):
    """The policy as the job trains it: replicated (plain), DDP-wrapped, or FSDP2-sharded."""
    model = distributed.replicate(policy.model)
    if mode == "plain":
        return policy
    if mode == "ddp":
        policy.model = distributed.wrap_ddp(model)
        return policy
    distributed.shard_fsdp(model, blocks=distributed.transformer_blocks(model))
    return distributed.ShardedPolicy(policy)


def run_job(recipe: str, mode: str, out: Path, *, resume: bool, crash_at: int | None) -> None:
    run_dir = out / (f"{recipe}-{mode}" + ("-restarted" if resume or crash_at is not None else ""))
    config, policy, ref, tok = build_kl_rl()
    policy = prepare(policy, mode)
    if mode == "fsdp":
        ref = prepare(ref, mode)
    optimizer = build_optimizer("adamw", policy.parameters(), config.lr)
    start = 0
    if resume and distributed.latest_checkpoint(run_dir) is not None:
        start = distributed.load_checkpoint(distributed.latest_checkpoint(run_dir), policy.model, optimizer)["step"]
    metrics_path = run_dir / "metrics.jsonl"
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] < start))
    current = {"step": start}

    def on_step(step: int, metrics: dict) -> None:
        if distributed.is_main():
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        distributed.save_checkpoint(run_dir, step + 1, policy.model, optimizer)
        current["step"] = step + 1

    def reward(prompts, completions):
        if crash_at is not None and distributed.rank() == 1 and current["step"] == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9, mid-step
        return share_of_a(prompts, completions)

    if recipe == "kl_rl":
        kl_rl.train(config, policy, ref, reward, PROMPTS, optimizer=optimizer, start_step=start, on_step=on_step)
    else:
        dpo_config, pairs = build_dpo(policy)
        dpo.train(dpo_config, policy, ref, pairs, optimizer=optimizer, on_step=on_step, start_step=start)
    distributed.export_pretrained(policy.model, run_dir / "final", tok)
    if distributed.is_main():
        (run_dir / "result.json").write_text(json.dumps({"world_size": distributed.world_size(), "start_step": start}))


def errors(out: Path) -> None:
    """Ranks with different configs, then a rank that dies before a collective."""
    try:
        distributed.check_same_config({"recipe": "kl_rl", "lr": 0.1 * (1 + distributed.rank())})
    except distributed.ConfigMismatchError as e:
        (out / f"mismatch-rank{distributed.rank()}.txt").write_text(str(e))
    if distributed.rank() == 1:
        os._exit(0)  # dies without a word
    try:
        distributed.all_sum([1.0])
    except distributed.RankFailure as e:
        (out / "died-rank0.txt").write_text(str(e))
        os._exit(3)  # the process group is broken: skip the interpreter's teardown of it


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    out, jobs = Path(argv[0]), argv[1:]
    distributed.init()
    if distributed.world_size() != int(os.environ.get("WORLD_SIZE", "1")):
        raise RuntimeError("the launcher's world size was not honoured")
    for job in jobs:
        if job == "errors":
            errors(out)
        elif job.startswith("other:"):
            run_other(job.split(":", 1)[1], out)
        else:
            recipe, mode, *flags = job.split(":")
            crash = [int(f[len("crash"):]) for f in flags if f.startswith("crash")]
            run_job(recipe, mode, out, resume="resume" in flags, crash_at=crash[0] if crash else None)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
