"""Building what a run trains from its resolved config: device and dtype, the policy and its reference (with
LoRA: the adapter-disabled base), the reward, the samples shown in samples.jsonl, and the restore of a checkpoint.
Shared by every ``tilt train`` command; nothing here parses a command line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags under which a CPU computes bfloat16 natively (elsewhere bfloat16 is emulated and slow)."""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, read from /proc/cpuinfo at run time (``cpuinfo``: its text, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def pick_device(name: str) -> str:
    """``cpu``, ``cuda`` (an error when CUDA is unavailable) or ``auto`` (cuda when available)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device is cuda but torch sees no CUDA device; use --device cpu or auto")
    return name


def pick_dtype(name: str, device: str, *, cpuinfo: str | None = None):
    """The torch dtype of ``name``; ``auto``: bfloat16 on a CUDA device that supports it and on a CPU with native
    bfloat16 (AVX-512 BF16 or AMX, read from /proc/cpuinfo), float32 otherwise."""
    import torch

    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS) else torch.float32


def check_models(run, *, ref: bool = True) -> None:
    """The model (and reference) paths exist, before anything is written."""
    from tilt.engine.loading import resolve_model_path

    resolve_model_path(run.model)
    if ref and run.ref:
        resolve_model_path(run.ref)


def load_policy_and_ref(run, lora, sampling, checkpoint: Path | None, *, need_ref: bool = True):
    """(policy, reference, tokenizer) on the run's device, computing in the run's dtype. Without LoRA the policy starts from
    ``checkpoint`` (or run.model) and the reference is run.ref, frozen. With LoRA (lora.r > 0) the policy is run.model
    with an adapter (the checkpoint's, when resuming) and the reference is the same model with the adapter disabled.
    Full fine-tuning keeps float32 weights and runs the forward passes under autocast to the dtype (HFPolicy's
    compute_dtype); with LoRA the frozen base is loaded in the dtype and the adapter is float32 (peft's default)."""
    import torch

    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.loading import load_model, load_tokenizer

    device = pick_device(run.device)
    dtype = pick_dtype(run.dtype, device)
    sampling = sampling if sampling is not None else SamplingConfig()
    trust = run.trust_remote_code
    tokenizer = load_tokenizer(run.model, trust_remote_code=trust)
    settings = lora.settings() if lora is not None else None
    if settings is not None:
        from tilt.engine.lora import AdapterDisabledReference, add_lora

        base = load_model(run.model, trust_remote_code=trust, dtype=dtype).to(device)
        if checkpoint is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
        else:
            model = add_lora(base, settings)
        policy = HFPolicy(model, tokenizer, sampling)
        return policy, AdapterDisabledReference(policy), tokenizer
    # The trained weights stay float32 whatever the dtype: it is the dtype of the forward passes (autocast), as in
    # mixed-precision training. bfloat16 weights would lose most AdamW updates at fine-tuning learning rates.
    source = str(checkpoint) if checkpoint is not None else run.model
    policy = HFPolicy(load_model(source, trust_remote_code=trust, dtype=torch.float32).to(device), tokenizer, sampling, compute_dtype=dtype)
    if not need_ref:
        return policy, None, tokenizer
    ref_tokenizer = load_tokenizer(run.ref, trust_remote_code=trust)
    if len(ref_tokenizer) != len(tokenizer):
        raise ValueError(f"the reference {run.ref!r} has a vocabulary of {len(ref_tokenizer)} tokens and the model "
                         f"{len(tokenizer)}: the reference needs the model's tokenizer")
    # the reference computes exactly as the policy does (same weights' dtype, same autocast): KL 0 at the start
    ref_model = load_model(run.ref, trust_remote_code=trust, dtype=torch.float32).requires_grad_(False).to(device)
    return policy, HFPolicy(ref_model, ref_tokenizer, sampling, compute_dtype=dtype), tokenizer


def final_model(model):
    """What RUN/final holds: the model, with a LoRA update merged in (an ordinary from_pretrained folder)."""
    from tilt.engine.lora import is_lora_model, merged_model

    return merged_model(model) if is_lora_model(model) else model


def build_reward(run, data=None):
    """The run's reward: its specs summed with ``reward_weights`` (1 each when unset), as a ``tilt.rewards.Rewards``
    that also reports each function's values (``rewards/<name>/*``). With ``data`` (a ``tilt.data.Data``) it is
    bound to the rows (``Rewards.for_data``): user functions get each row's other columns by keyword and, for
    conversational data, the prompt's messages and ``[{"role": "assistant", "content": ...}]`` completions."""
    from tilt.reward_fns import reward_from_specs

    weights = None if run.reward_weights is None else list(run.reward_weights)
    reward = reward_from_specs(list(run.reward), weights=weights, trust_remote_code=run.trust_remote_code)
    return reward.for_data(data) if data is not None else reward


def load_run_data(path: str, data_config, tokenizer, *, log=None):
    """The data a run trains on, checked as the shape the command takes (``data_config.fmt``; a command's
    ``data`` section fixes it, None infers it). The file's own shape is inferred from its columns first: when it
    is the command's, the rows are read as inferred (``Data.inferred`` True); otherwise they are read as the
    command's shape (``prompts`` takes the prompt of any shape; a file of another shape fails naming its rows).
    ``log(line)`` receives one line saying what was read. Raises FileNotFoundError, ValueError or DataError."""
    import warnings
    from dataclasses import replace

    from tilt.data import check_rows, infer_format, read_rows

    rows = read_rows(path, split=data_config.split)
    if not rows:
        raise ValueError(f"{str(path)!r} holds no rows")
    first = next((r for _, r in rows if isinstance(r, dict)), None)
    try:
        own = infer_format(first) if first is not None else None
    except ValueError:
        own = None  # check_rows names the row
    wanted = data_config.fmt
    config = replace(data_config, fmt=None) if wanted is None or wanted == own else data_config
    data = check_rows(rows, config, tokenizer=tokenizer, path=str(path))
    for note in data.warnings:
        warnings.warn(note, stacklevel=2)
    if log is not None:
        how = "inferred" if data.inferred else f"columns of {own} rows, read as {data.fmt}" if own else f"read as {data.fmt}"
        log(f"# data: {path}: {len(data.rows)} rows, {data.shape} ({how})")
    return data


def data_summary(data) -> dict:
    """What a run's summary records of its data: the format used, whether it was inferred, TRL's name of the shape."""
    return {"data_format": data.fmt, "data_inferred": data.inferred, "data_shape": data.shape, "data_rows": len(data.rows)}


def check_run_context(data, model_config, tokenizer, *, max_new_tokens: int | None, path: str) -> None:
    """Every prompt of ``data`` (a ``Data`` or a list of prompts) plus its completion budget (``max_new_tokens``; None: the row's longest reply)
    fits the model's context (``tilt.data.check_context``), before the run directory exists. Nothing is checked
    when neither the model's config nor the tokenizer gives a context length."""
    from tilt.data import check_context, model_context_length

    context = model_context_length(model_config, tokenizer)
    if context is not None:
        check_context(data, tokenizer, max_new_tokens=max_new_tokens, context_length=context[0], path=path,
                      source=f"the model's context ({context[1]})")


def draw_samples(policy, reward_fn, prompts: Sequence[Any], count: int, seed: int, step: int) -> list[dict]:
    """One completion of each of the first ``count`` prompts, from a generator that depends only on (seed, step),
    so the rows are the same in a resumed run and do not disturb the training randomness."""
    from tilt.recipes.common import step_generator
    from tilt.rewards import score_rewards

    chosen = list(prompts[:count])
    rollout = policy.sample(chosen, 1, generator=step_generator(seed, step, "samples"), exact=True)
    rewards = score_rewards(reward_fn, rollout.prompts, rollout.completions)
    return [{"step": step, "prompt": p, "completion": c, "reward": float(r)}
            for p, c, r in zip(rollout.prompts, rollout.completions, rewards.tolist())]


def first_samples(policy, reward_fn, prompts, count: int, seed: int) -> list[dict]:
    """The step-0 samples, drawn before the run directory exists: a reward that fails on them is bad input."""
    from tilt.rewards import RewardError

    try:
        return draw_samples(policy, reward_fn, prompts, count, seed, 0)
    except RewardError as exc:
        raise ValueError(str(exc)) from exc


def restore(checkpoint: Path | None, optimizer, total: int, start: int, *, main_rank: bool = True) -> dict | None:
    """Restore the optimizer and RNG states of ``checkpoint``; its trainer state (None without one)."""
    from tilt.runs import directory as runs

    if checkpoint is None:
        return None
    state, tensors = runs.load_trainer_state(checkpoint)
    runs.restore_optimizer(optimizer, state, tensors)
    runs.restore_rng(state, tensors)
    if main_rank:
        print(f"# resuming from {checkpoint} (step {start} of {total})", file=sys.stderr, flush=True)
    return state


def run_fingerprint(config: dict) -> dict:
    """The fingerprint of a run's inputs (``tilt.runs.directory.fingerprint_inputs``): the resolved config, the data
    files, the model and reference, the reward's source files, each under the name ``--accept-changes`` takes."""
    from tilt.runs import directory as runs

    run = config["run"]
    data = {name: run[name] for name in ("prompts", "preferences", "demonstrations") if run.get(name)}
    models = {name: run[name] for name in ("model", "ref") if run.get(name)}
    rewards = {"reward": list(run["reward"])} if run.get("reward") else {}
    return runs.fingerprint_inputs(config, data=data, models=models, rewards=rewards)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (the run's), not one per file transformers reads or writes
    hf_logging.set_verbosity_error()  # a reward model's new scalar head is expected to be missing from the backbone
