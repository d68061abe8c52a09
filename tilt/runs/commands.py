"""Every ``tilt train`` command as a thin assembly over the run layer: check the inputs, build model, reference,
reward and data (``tilt.runs.setup``), create or reopen the run directory, hand the recipe's ``train`` to the run
loop (``tilt.runs.loop.RunLoop``), and return the summary (or the exit code of a run that stopped early).

Every assembly has the signature ``(config, sections, run_dir, *, resume, signals, resume_flags)``: ``config`` is
the resolved nested dict (RUN/config.yaml), ``sections`` its dataclasses (``tilt.runs.config.build``). Nothing
is written before every check that bad input can fail has passed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from tilt.runs import directory as runs
from tilt.runs.loop import PhaseProgress, RunLoop, Signals, Stop, progress_or_stop
from tilt.runs.setup import (build_reward, check_models, check_run_context, data_summary, draw_samples, final_model,
                             first_samples, load_policy_and_ref, load_run_data, restore)

BEFORE_FILE = "before.json"
"""RUN/before.json: metrics measured on the initial model, kept so that a resumed run's summary reports them."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _open(run_dir: Path, config: dict, resume: bool, initial: Sequence[dict] = (), before: dict | None = None, *,
          stack=None) -> Path:
    """The run directory: reopened on resume (its lock is already held), else created with its config, the
    fingerprint of its inputs and the step-0 samples, then locked for the rest of the run (``stack``)."""
    if resume:
        runs.clear_failed(run_dir)
        return run_dir
    from tilt.runs.setup import run_fingerprint

    run = runs.create_run(run_dir, config, list(initial), fingerprint=run_fingerprint(config))
    if stack is not None:
        stack.enter_context(runs.lock_run(run))
    if before is not None:
        runs.write_atomic(run / BEFORE_FILE, json.dumps(before) + "\n")
    return run


def _before(run: Path) -> dict:
    path = run / BEFORE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _prompt_data(path: str, data_config, policy, tokenizer, max_new_tokens: int, *, main_rank: bool = True):
    """(data, prompts) of a sampling recipe: the rows read (shape inferred, shown on stderr), every prompt checked
    to fit the model's context with ``max_new_tokens``, before anything is written."""
    data = load_run_data(path, data_config, tokenizer, log=log if main_rank else None)
    check_run_context(data, policy.model.config, tokenizer, max_new_tokens=max_new_tokens, path=path)
    return data, [row["prompt"] for row in data.rows]


def _replicated(model):
    """``model`` for several processes (``torchrun``): rank 0's weights broadcast to every rank, then wrapped in DDP
    (the recipes reduce the gradients themselves, tilt.distributed); in one process, ``model`` unchanged."""
    from tilt import distributed

    return distributed.wrap_ddp(distributed.replicate(model))


def _save_on_main(main_rank: bool, save):
    """``save`` on rank 0, a no-op elsewhere (rank 0 writes every checkpoint; the loop's barrier keeps ranks together)."""
    return save if main_rank else (lambda step: None)


def _save_fn(run: Path, policy_model, tokenizer, optimizer, keep: int, extra_fn, tensors_fn=None):
    def save(step: int) -> None:
        runs.save_checkpoint(run, step, policy_model(), tokenizer, optimizer, keep=keep, extra=extra_fn(),
                             extra_tensors=tensors_fn() if tensors_fn is not None else None)
    return save


# --- kl-rl ------------------------------------------------------------------------------------------------------------
def train_kl_rl(config: dict, secs: dict, run_dir: Path, *, resume: bool, signals: Signals, resume_flags=(),
                stack=None) -> int | dict:
    from tilt import distributed
    from tilt.recipes import kl_rl
    from tilt.recipes.common import build_optimizer
    from tilt.runs.calibration import CALIBRATION_FILE, calibrated_reward_for_run, calibration_fingerprint, check_calibration_cache

    run, cfg, sampling, calibration, lora = secs["run"], secs["kl_rl"], secs["sampling"], secs["calibration"], secs["lora"]
    run.require("kl-rl", ("model", "reward", "prompts"))
    distributed.init()  # under torchrun (WORLD_SIZE > 1) only
    main_rank = distributed.is_main()
    runs.check_tracker(run.tracker)
    check_calibration_cache(calibration)
    check_models(run)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    policy, ref, tokenizer = load_policy_and_ref(run, lora, sampling, checkpoint)
    data, prompts = _prompt_data(run.prompts, secs["data"], policy, tokenizer, sampling.max_new_tokens, main_rank=main_rank)
    reward_fn = build_reward(run, data)
    initial = first_samples(policy, reward_fn, prompts, run.sample_prompts, cfg.seed) if not resume and main_rank else []
    out = _open(run_dir, config, resume, initial, stack=stack) if main_rank else run_dir
    distributed.barrier()
    policy.model = _replicated(policy.model)
    optimizer = build_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad], cfg.lr)
    steps = kl_rl.num_steps(cfg)
    restore(checkpoint, optimizer, steps, start, main_rank=main_rank)
    # the adaptive-beta controller's state goes into every checkpoint and comes back on resume (an exact resume)
    kl_state = restored_kl_state(cfg, checkpoint)
    # with a KL budget every step is checkpointed, and the three newest kept, so that the last policy measured within
    # the budget (two updates before the step that exceeded it; docs/kl_rl.md) is on disk when the budget stops the run
    budget = cfg.kl_budget > 0
    checkpoint_every = 1 if budget else run.checkpoint_every
    keep = max(run.keep_checkpoints, 3) if budget and run.keep_checkpoints else run.keep_checkpoints
    tracker = runs.open_tracker(run.tracker if main_rank else "none", out, config)
    ctrl: dict[str, Any] = {"reward": None}

    def extra(metrics: dict) -> dict:
        if ctrl["reward"] is None:
            return metrics
        raw_sum, calibrated_sum, count = distributed.all_sum(ctrl["reward"].take_sums())
        return {**metrics, "reward_raw": raw_sum / count, "reward_calibrated": calibrated_sum / count}

    loop = RunLoop("kl-rl", out, steps=steps, start=start, signals=signals, tracker=tracker, main_rank=main_rank,
                   save=_save_on_main(main_rank, _save_fn(out, lambda: distributed.unwrap(policy.model), tokenizer, optimizer, keep,
                                                          lambda: {"recipe": "kl-rl"}, kl_state.state_tensors)),
                   checkpoint_every=checkpoint_every, sample_every=run.sample_every,
                   sample=lambda step: draw_samples(policy, reward_fn, prompts, run.sample_prompts, cfg.seed, step),
                   extra=extra, shown=("reward", "kl_ref"), resume_flags=resume_flags, barrier=distributed.barrier)
    train_reward = reward_fn
    if calibration.active:  # CTRL: the recipe trains on Phi(C); samples.jsonl keeps the raw reward
        from tilt.infalign import distinct_prompts

        counted = PhaseProgress(ref, calibration.calibration_samples * len(distinct_prompts(prompts)), "calibration", signals, start)
        try:  # the calibration samples the reference (minutes on a real model): progress, and SIGTERM stops it
            ctrl["reward"], source = calibrated_reward_for_run(out, calibration, calibration_fingerprint(run, sampling), counted,
                                                               reward_fn, prompts, main_rank=main_rank)
        except Stop:
            counted.close()
            return loop.stopped(start)
        counted.close()
        train_reward = ctrl["reward"]
        if main_rank:
            cal = ctrl["reward"].calibration
            log(f"# calibration: {source}: m = {cal.samples_per_prompt} reference samples for each of {len(cal.prompts)} "
                f"prompts ({out / CALIBRATION_FILE})\n# training on {calibration.describe()}")
    code = loop.run(lambda on_step: kl_rl.train(cfg, policy, ref, train_reward, prompts, optimizer=optimizer,
                                                start_step=start, on_step=on_step, kl_state=kl_state))
    if code is not None:
        return code
    if not main_rank:
        distributed.shutdown()
        return 0
    summary: dict[str, Any] = {"steps": steps, "world_size": distributed.world_size()}
    if kl_state.budget_exceeded_step is None:
        final = runs.save_final(out, final_model(distributed.unwrap(policy.model)), tokenizer)
    else:  # RUN/final is the last policy measured within the budget, read back from its checkpoint
        kept, summary["kl_budget"] = within_budget(cfg, kl_state.budget_exceeded_step)
        final = None
        if kept is not None:
            source = out / runs.CHECKPOINTS / runs.checkpoint_name(kept) if kept else None  # 0: the initial model
            within = load_policy_and_ref(run, lora, sampling, source, need_ref=False)[0]
            final = runs.save_final(out, final_model(within.model), tokenizer)
        log(f"# {summary['kl_budget']}")
    distributed.shutdown()
    rows = runs.read_jsonl(out / "metrics.jsonl")
    summary.update(data_summary(data))
    if rows:
        summary.update({k: rows[-1][k] for k in ("reward", "kl_ref", "reward_raw", "reward_calibrated", "beta") if k in rows[-1]})
    return {**summary, "run_dir": str(out), "final": str(final) if final is not None else None}


def restored_kl_state(cfg, checkpoint: Path | None):
    """The KL controller's state (``KLControlState``): the config's beta on a fresh run, the checkpoint's on resume
    (refused, naming the missing tensor, when an adaptive-beta run's checkpoint lacks it)."""
    from tilt.recipes.common import KLControlState

    if checkpoint is None:
        return KLControlState(beta=cfg.beta)
    _, tensors = runs.load_trainer_state(checkpoint)
    if cfg.kl_target == 0 and "kl_control.beta" not in tensors:  # a fixed beta: nothing to restore
        return KLControlState(beta=cfg.beta)
    return KLControlState.from_tensors(tensors)


def within_budget(cfg, exceeded: int) -> tuple[int | None, str]:
    """(updates done by the last policy measured within the KL budget, or None when even the initial one was not;
    the summary's sentence). Step ``exceeded`` (0-based) measured the policy after ``exceeded`` updates; the one before
    it was measured by step ``exceeded - 1`` (tilt.recipes.kl_rl.train)."""
    if exceeded == 0:
        return None, (f"stopped at step 1: the initial policy's KL estimate already exceeds kl_budget {cfg.kl_budget}; "
                      "no final model is written")
    kept = exceeded - 1
    where = f"checkpoint {runs.checkpoint_name(kept)}" if kept else "the initial model"
    return kept, (f"stopped by kl_budget {cfg.kl_budget} at step {exceeded + 1} (metrics row {exceeded + 1}); final/ holds the "
                  f"last policy measured within the budget, the one of step {kept} ({where}), not the newest checkpoint")


# --- dpo --------------------------------------------------------------------------------------------------------------
def preference_pairs(policy, rows: list[dict]):
    """dpo.PreferencePairs from rows {prompt, chosen, rejected}: each completion tokenised without special
    tokens, with the policy's EOS appended (the pair's texts are complete answers)."""
    from tilt.recipes.dpo import PreferencePairs

    eos = policy.eos_ids[0]
    prompts = [r["prompt"] for r in rows]

    def ids(text: str) -> list[int]:
        return list(policy.tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]

    return PreferencePairs(chosen=policy.rollout_from_ids(prompts, [ids(r["chosen"]) for r in rows]),
                           rejected=policy.rollout_from_ids(prompts, [ids(r["rejected"]) for r in rows]))


def pair_margins(policy, pairs, ref_logprobs, beta: float, micro_batch_size: int = 0) -> tuple[float, float]:
    """(mean beta*h, share of pairs with h > 0) over all pairs under ``policy``; h is DPO's log-ratio margin."""
    import torch

    from tilt.math.masking import masked_sum
    from tilt.math.preference import dpo_margin
    from tilt.recipes.common import micro_batches

    margins = []
    with torch.no_grad():
        for part in micro_batches(len(pairs), micro_batch_size):  # the batches of reference_logprobs
            c, r = pairs.chosen.take(part), pairs.rejected.take(part)
            lp_c = masked_sum(policy.token_logprobs(c), c.completion_mask)
            lp_r = masked_sum(policy.token_logprobs(r), r.completion_mask)
            margins.append(dpo_margin(lp_c, lp_r, ref_logprobs[0][part], ref_logprobs[1][part]))
    h = torch.cat(margins).double()
    return beta * h.mean().item(), (h > 0).double().mean().item()


def train_dpo(config: dict, secs: dict, run_dir: Path, *, resume: bool, signals: Signals, resume_flags=(),
                stack=None) -> int | dict:
    from tilt import distributed
    from tilt.recipes import dpo
    from tilt.recipes.common import build_optimizer

    run, cfg, lora = secs["run"], secs["dpo"], secs["lora"]
    run.require("dpo", ("model", "preferences"))
    distributed.init()  # under torchrun (WORLD_SIZE > 1) only
    main_rank = distributed.is_main()
    check_models(run)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    policy, ref, tokenizer = load_policy_and_ref(run, lora, None, checkpoint)
    data = load_run_data(run.preferences, secs["data"], tokenizer, log=log)
    check_run_context(data, policy.model.config, tokenizer, max_new_tokens=None, path=run.preferences)
    train_rows, eval_rows = split_pairs(data.rows, secs["eval"].held_out, cfg.seed)  # held_out 0: every row trains
    pairs = preference_pairs(policy, train_rows)
    eval_pairs = preference_pairs(policy, eval_rows) if eval_rows else None
    ref_logprobs = dpo.reference_logprobs(ref, pairs, cfg.micro_batch_size)  # once, reused by every step
    eval_ref_logprobs = dpo.reference_logprobs(ref, eval_pairs, cfg.micro_batch_size) if eval_pairs is not None else None
    before = None
    if not resume:
        margin, accuracy = pair_margins(policy, pairs, ref_logprobs, cfg.beta, cfg.micro_batch_size)
        before = {"reward_margin_before": margin, "accuracy_before": accuracy}
    out = _open(run_dir, config, resume, before=before, stack=stack) if main_rank else run_dir
    distributed.barrier()
    policy.model = _replicated(policy.model)
    steps = dpo.num_steps(cfg, len(pairs))
    optimizer = build_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad], cfg.lr)
    restore(checkpoint, optimizer, steps, start, main_rank=main_rank)
    loop = RunLoop("dpo", out, steps=steps, start=start, signals=signals, main_rank=main_rank, barrier=distributed.barrier,
                   tracker=runs.open_tracker(run.tracker if main_rank else "none", out, config),
                   save=_save_on_main(main_rank, _save_fn(out, lambda: distributed.unwrap(policy.model), tokenizer, optimizer,
                                                          run.keep_checkpoints, lambda: {"recipe": "dpo"})),
                   checkpoint_every=run.checkpoint_every, shown=("loss", "reward_margin", "accuracy"), resume_flags=resume_flags)
    code = loop.run(lambda on_step: dpo.train(cfg, policy, policy, pairs, ref_logprobs=ref_logprobs, eval_pairs=eval_pairs,
                                              eval_ref_logprobs=eval_ref_logprobs, optimizer=optimizer, start_step=start,
                                              on_step=on_step))
    if code is not None:
        return code
    policy.model = distributed.unwrap(policy.model)
    if not main_rank:
        distributed.shutdown()
        return 0
    final = runs.save_final(out, final_model(policy.model), tokenizer)
    margin_after, accuracy_after = pair_margins(policy, pairs, ref_logprobs, cfg.beta, cfg.micro_batch_size)
    before = _before(out)
    summary = {"pairs": len(pairs), "held_out_pairs": len(eval_rows), "steps": steps, **data_summary(data), "reward_margin_before": before.get("reward_margin_before"),
               "reward_margin_after": margin_after, "accuracy_before": before.get("accuracy_before"),
               "accuracy_after": accuracy_after, "world_size": distributed.world_size()}
    distributed.shutdown()
    runs.write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return {**summary, "run_dir": str(out), "final": str(final)}


# --- online-dpo / xpo -------------------------------------------------------------------------------------------------
def build_oracle(oracle_config, reward_fn):
    from tilt.preferences import BradleyTerry, RewardComparison

    if oracle_config.oracle == "bradley-terry":
        return BradleyTerry(reward_fn, scale=oracle_config.scale)
    return RewardComparison(reward_fn, ties=oracle_config.ties)


def stored_pairs_extra(stored) -> dict:
    """The cumulative regime's pairs for a checkpoint's JSON state: texts as JSON, tensors as one safetensors
    blob (base64), so nothing is pickled."""
    import base64

    from safetensors.torch import save

    from tilt.recipes.online_dpo import stored_pairs_state

    rows, tensors = stored_pairs_state(stored)
    return {"rows": rows, "tensors": base64.b64encode(save(tensors)).decode("ascii")}


def stored_pairs_from_extra(extra: dict, device) -> list:
    """The pairs ``stored_pairs_extra`` saved, on ``device``."""
    import base64

    from safetensors.torch import load

    from tilt.recipes.online_dpo import restore_stored_pairs

    return restore_stored_pairs(extra["rows"], load(base64.b64decode(extra["tensors"])), device)


SCHEMES_OF = {"online-dpo": ("online-dpo", "pairs"), "xpo": ("xpo",)}


def train_online(config: dict, secs: dict, run_dir: Path, *, resume: bool, signals: Signals, resume_flags=(),
                stack=None) -> int | dict:
    from tilt import distributed
    from tilt.evaluation import EvalConfig, evaluate
    from tilt.recipes import online_dpo
    from tilt.recipes.common import build_optimizer

    command = config["recipe"]
    section = command.replace("-", "_")
    run, cfg, sampling, final_eval, lora = secs["run"], secs[section], secs["sampling"], secs["eval"], secs["lora"]
    run.require(command, ("model", "prompts", "reward"))
    if cfg.scheme not in SCHEMES_OF[command]:
        other = "xpo" if cfg.scheme == "xpo" else "online-dpo"
        raise ValueError(f"tilt train {command} takes scheme {' or '.join(SCHEMES_OF[command])}; for scheme "
                         f"{cfg.scheme!r} use tilt train {other}")
    if final_eval.eval_samples_per_prompt and not sampling.exact:
        raise ValueError("the final evaluation needs samples of the policy itself (temperature 1, no top-k/top-p); "
                         "set eval.eval_samples_per_prompt: 0 to train with a modified sampler")
    if cfg.regime == "cumulative" and distributed.launched():
        raise ValueError(f"tilt train {command} with regime cumulative runs in one process (each rank's stored pairs would "
                         "need a checkpoint of their own); use regime fresh under torchrun")
    distributed.init()  # under torchrun (WORLD_SIZE > 1) only
    main_rank = distributed.is_main()
    check_models(run)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    policy, ref, tokenizer = load_policy_and_ref(run, lora, sampling, checkpoint)
    data, prompts = _prompt_data(run.prompts, secs["data"], policy, tokenizer, sampling.max_new_tokens)
    reward_fn = build_reward(run, data)
    oracle = build_oracle(secs["labels"], reward_fn)
    initial = first_samples(policy, reward_fn, prompts, run.sample_prompts, cfg.seed) if not resume and main_rank else []
    out = _open(run_dir, config, resume, initial, stack=stack) if main_rank else run_dir
    distributed.barrier()
    policy.model = _replicated(policy.model)
    steps = online_dpo.num_steps(cfg)
    optimizer = build_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad], cfg.lr)
    state = restore(checkpoint, optimizer, steps, start, main_rank=main_rank)
    stored: list = []  # the cumulative regime's pairs, appended to by the recipe, saved with every checkpoint
    if state is not None and cfg.regime == "cumulative":
        if "stored_pairs" not in state["extra"]:
            raise ValueError(f"{checkpoint} holds no stored pairs, which the cumulative regime needs to resume")
        stored = stored_pairs_from_extra(state["extra"]["stored_pairs"], policy.device)

    def extra() -> dict:
        return {"recipe": command, **({"stored_pairs": stored_pairs_extra(stored)} if cfg.regime == "cumulative" else {})}

    loop = RunLoop(command, out, steps=steps, start=start, signals=signals, main_rank=main_rank, barrier=distributed.barrier,
                   tracker=runs.open_tracker(run.tracker if main_rank else "none", out, config),
                   save=_save_on_main(main_rank, _save_fn(out, lambda: distributed.unwrap(policy.model), tokenizer, optimizer,
                                                          run.keep_checkpoints, extra)),
                   checkpoint_every=run.checkpoint_every, sample_every=run.sample_every,
                   sample=lambda step: draw_samples(policy, reward_fn, prompts, run.sample_prompts, cfg.seed, step),
                   shown=("loss", "policy_sample_win_rate", "kl_ref"), resume_flags=resume_flags)
    code = loop.run(lambda on_step: online_dpo.train(cfg, policy, ref, oracle, prompts, optimizer=optimizer,
                                                     start_step=start, stored=stored, on_step=on_step))
    if code is not None:
        return code
    policy.model = distributed.unwrap(policy.model)
    world = distributed.world_size()
    distributed.shutdown()
    if not main_rank:
        return 0
    final = runs.save_final(out, final_model(policy.model), tokenizer)
    rows = runs.read_jsonl(out / "metrics.jsonl")
    summary: dict[str, Any] = {"steps": steps, "scheme": cfg.scheme, "world_size": world, **data_summary(data)}
    if rows:
        summary["last_policy_sample_win_rate"] = rows[-1]["policy_sample_win_rate"]
    if final_eval.eval_samples_per_prompt:
        chosen = prompts[: final_eval.eval_prompts] if final_eval.eval_prompts else prompts
        from tqdm import tqdm

        bar = tqdm(total=2 * len(chosen) * final_eval.eval_samples_per_prompt, desc="final evaluation", unit="sample",
                   file=sys.stderr, dynamic_ncols=True, leave=False)
        try:
            m = evaluate(EvalConfig(samples_per_prompt=final_eval.eval_samples_per_prompt, seed=cfg.seed), policy, ref, reward_fn,
                         chosen, progress=progress_or_stop(bar, signals, steps)).metrics
        except Stop:
            bar.close()
            log(f"# stopped by {signals.name} during the final evaluation; the trained model is in {final}: "
                f"evaluate it with tilt eval {out}")
            return signals.exit_code
        bar.close()
        summary.update(eval_prompts=len(chosen), win_rate=m["win_rate"], win_rate_ci=m["win_rate_ci"], reward_mean=m["reward_mean"],
                       ref_reward_mean=m["ref_reward_mean"], kl_ref=m["kl_ref"])
    runs.write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return {**summary, "run_dir": str(out), "final": str(final)}


# --- reward-model -----------------------------------------------------------------------------------------------------
def split_pairs(rows: list[dict], held_out: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows: a seeded permutation, the first round(held_out * n) rows (at least 1 when held_out
    > 0) held out. Raises when either side would be empty."""
    import torch

    from tilt.recipes.common import derive_seed

    n = len(rows)
    n_held = max(1, round(held_out * n)) if held_out > 0 else 0
    if n - n_held < 1:
        raise ValueError(f"held_out {held_out} of {n} pairs leaves no pair to train on; lower held_out or add pairs")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "held_out"))).tolist()
    return [rows[i] for i in sorted(order[n_held:])], [rows[i] for i in sorted(order[:n_held])]


def train_reward_model(config: dict, secs: dict, run_dir: Path, *, resume: bool, signals: Signals, resume_flags=(),
                stack=None) -> int | dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from tilt.engine.loading import check_no_custom_code, check_safe_weights, load_tokenizer, resolve_model_path
    from tilt.recipes import reward_model
    from tilt.recipes.common import build_optimizer, derive_seed
    from tilt.reward_fns import SequenceClassifierReward
    from tilt.runs.setup import pick_device, pick_dtype

    from tilt import distributed

    run, cfg, held = secs["run"], secs["reward_model"], secs["eval"]
    run.require("reward-model", ("model", "preferences"))
    distributed.init()  # under torchrun (WORLD_SIZE > 1) only
    main_rank = distributed.is_main()
    path = resolve_model_path(run.model)
    if Path(path).is_dir():
        check_safe_weights(path)
        check_no_custom_code(path, trust_remote_code=run.trust_remote_code)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    tokenizer = load_tokenizer(run.model, trust_remote_code=run.trust_remote_code)
    data = load_run_data(run.preferences, secs["data"], tokenizer, log=log)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data.rows]
    train_pairs, held_out = split_pairs(rows, held.held_out, cfg.seed)
    torch.manual_seed(derive_seed(cfg.seed, "reward_head"))  # the new scalar head's initialisation
    device = pick_device(run.device)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(checkpoint) if checkpoint is not None else path, num_labels=1, use_safetensors=True,
        dtype=torch.float32, trust_remote_code=run.trust_remote_code).to(device)  # float32 weights; run.dtype is the compute dtype
    if held.max_length is None:  # longer texts are cut from the left to max_length, which then must fit
        check_run_context(data, model.config, tokenizer, max_new_tokens=None, path=run.preferences)
    reward = SequenceClassifierReward(model, tokenizer, max_length=held.max_length, compute_dtype=pick_dtype(run.dtype, device))
    before = {"accuracy_held_out_before": reward_model.accuracy(reward, held_out)} if held_out and not resume else None
    out = _open(run_dir, config, resume, before=before, stack=stack) if main_rank else run_dir
    distributed.barrier()
    reward.model = _replicated(reward.model)
    steps = reward_model.num_steps(cfg, len(train_pairs))
    optimizer = build_optimizer("adamw", reward.model.parameters(), cfg.lr)
    restore(checkpoint, optimizer, steps, start, main_rank=main_rank)
    loop = RunLoop("reward-model", out, steps=steps, start=start, signals=signals, main_rank=main_rank, barrier=distributed.barrier,
                   tracker=runs.open_tracker(run.tracker if main_rank else "none", out, config),
                   save=_save_on_main(main_rank, _save_fn(out, lambda: distributed.unwrap(reward.model), tokenizer, optimizer,
                                                          run.keep_checkpoints, lambda: {"recipe": "reward-model"})),
                   checkpoint_every=run.checkpoint_every, shown=("loss", "accuracy"), resume_flags=resume_flags)
    code = loop.run(lambda on_step: reward_model.train(cfg, reward, train_pairs, optimizer=optimizer, start_step=start,
                                                       on_step=on_step))
    if code is not None:
        return code
    reward.model = distributed.unwrap(reward.model)
    world = distributed.world_size()
    distributed.shutdown()
    if not main_rank:
        return 0
    reward.model.eval()
    final = runs.save_final(out, reward.model, tokenizer)
    summary: dict[str, Any] = {"train_pairs": len(train_pairs), "held_out_pairs": len(held_out), "steps": steps, **data_summary(data),
                               "accuracy_train": reward_model.accuracy(reward, train_pairs), "world_size": world}
    if held_out:
        summary["accuracy_held_out"] = reward_model.accuracy(reward, held_out)
        summary.update(_before(out))
    runs.write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return {**summary, "run_dir": str(out), "final": str(final), "use_as_reward": f"--reward {final}"}


# --- bond / bonbon / apo / qrpo ---------------------------------------------------------------------------------------
SHOWN = {"bond": ("loss", "kl_bon", "kl_ref"), "bonbon": ("loss", "margin", "best_reward"),
         "apo": ("loss", "reward", "residual_abs"), "qrpo": ("loss", "quantile", "residual_abs")}
"""The metrics the progress bar shows, per command (every metric goes to metrics.jsonl)."""
SUMMARY_KEYS = ("loss", "kl_ref", "kl_bon", "bon_reward", "best_reward", "worst_reward", "margin", "reward", "quantile",
                "raw_reward", "residual_abs")


def reference_phase(command: str, cfg, ref, reward_fn, prompts) -> tuple[int, Any]:
    """(reference samples drawn, function of the counting reference -> the recipe's extra keyword arguments) of the
    phase that samples and scores pi_ref once before the first step: A*-PO's V*, QRPO's and BOND's CDF. Each is what
    the recipe itself builds from the same seed (so a resumed run rebuilds it identically and no checkpoint holds it);
    the run only draws it outside the recipe to show progress and stop cleanly on SIGTERM. BoNBoN has no such phase."""
    from tilt.infalign import distinct_prompts

    count = len(distinct_prompts(prompts))
    if command == "apo":
        from tilt.recipes.apo import estimate_values

        return cfg.value_samples * count, lambda counted: {"values": estimate_values(cfg, counted, reward_fn, prompts)}
    if command == "qrpo":
        from tilt.recipes.qrpo import build_cdf

        return cfg.calibration_samples * count, lambda counted: {"cdf": build_cdf(cfg, counted, reward_fn, prompts)}
    if command == "bond" and cfg.jeffreys_weight > 0:
        from tilt.bon_target import SampleCDF
        from tilt.infalign import build_calibration

        return cfg.calibration_samples * count, lambda counted: {"cdf": SampleCDF(build_calibration(
            counted, reward_fn, distinct_prompts(prompts), cfg.calibration_samples, seed=cfg.calibration_seed))}
    return 0, lambda counted: {}


def train_distilled(config: dict, secs: dict, run_dir: Path, *, resume: bool, signals: Signals, resume_flags=(),
                    stack=None) -> int | dict:
    """tilt train bond | bonbon | apo | qrpo: recipes of the form ``train(config, policy, ref, reward_fn, prompts, *,
    optimizer, start_step, on_step)``, one process. A checkpoint holds the policy and the optimizer: everything else
    they use (V*, the calibration samples, each step's prompts and samples) is a pure function of the config's seeds
    and of the frozen reference, rebuilt on resume."""
    import importlib

    from tilt import distributed
    from tilt.recipes.common import build_optimizer

    command = config["recipe"]
    recipe = importlib.import_module(f"tilt.recipes.{command}")
    run, cfg, sampling, lora = secs["run"], secs[command], secs["sampling"], secs["lora"]
    run.require(command, ("model", "reward", "prompts"))
    if distributed.launched():  # before anything is written: the recipe does not shard its steps
        raise ValueError(f"tilt train {command} runs in one process (its recipe does not shard steps across ranks); "
                         "launch it without torchrun or with --nproc_per_node 1")
    check_models(run)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    policy, ref, tokenizer = load_policy_and_ref(run, lora, sampling, checkpoint)
    data, prompts = _prompt_data(run.prompts, secs["data"], policy, tokenizer, sampling.max_new_tokens)
    reward_fn = build_reward(run, data)
    initial = first_samples(policy, reward_fn, prompts, run.sample_prompts, cfg.seed) if not resume else []
    out = _open(run_dir, config, resume, initial, stack=stack)
    steps = recipe.num_steps(cfg)
    optimizer = build_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad], cfg.lr)
    restore(checkpoint, optimizer, steps, start)
    loop = RunLoop(command, out, steps=steps, start=start, signals=signals, tracker=runs.open_tracker(run.tracker, out, config),
                   save=_save_fn(out, lambda: policy.model, tokenizer, optimizer, run.keep_checkpoints, lambda: {"recipe": command}),
                   checkpoint_every=run.checkpoint_every, sample_every=run.sample_every,
                   sample=lambda step: draw_samples(policy, reward_fn, prompts, run.sample_prompts, cfg.seed, step),
                   shown=SHOWN[command], resume_flags=resume_flags)
    total, phase = reference_phase(command, cfg, ref, reward_fn, prompts)
    kwargs: dict[str, Any] = {}
    if total and start < steps:
        counted = PhaseProgress(ref, total, "reference samples", signals, start)
        try:
            kwargs = phase(counted)
        except Stop:
            counted.close()
            return loop.stopped(start)
        counted.close()
    code = loop.run(lambda on_step: recipe.train(cfg, policy, ref, reward_fn, prompts, optimizer=optimizer, start_step=start,
                                                 on_step=on_step, **kwargs))
    if code is not None:
        return code
    final = runs.save_final(out, final_model(policy.model), tokenizer)
    rows = runs.read_jsonl(out / "metrics.jsonl")
    summary: dict[str, Any] = {"steps": steps, **data_summary(data)}
    if rows:
        summary.update({k: rows[-1][k] for k in SUMMARY_KEYS if k in rows[-1]})
    runs.write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return {**summary, "run_dir": str(out), "final": str(final)}


ASSEMBLIES = {"kl-rl": train_kl_rl, "dpo": train_dpo, "online-dpo": train_online, "xpo": train_online,
              "reward-model": train_reward_model, "bond": train_distilled, "bonbon": train_distilled,
              "apo": train_distilled, "qrpo": train_distilled}
"""The single-recipe commands (the pipelines are in tilt.pipelines.demo_rl)."""
