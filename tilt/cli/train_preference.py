"""``tilt train dpo | online-dpo | xpo | reward-model``: learning from preferences on Hugging Face causal LMs, from a
YAML config, in a run directory (docs/runs.md).

* ``dpo``: offline DPO (sigmoid or IPO loss) on a preferences file (rows {prompt, chosen, rejected}); the reference
  (default: the model itself) scores every pair once, before training (docs/dpo.md).
* ``online-dpo``: two responses from the policy (``scheme: online-dpo``) or one from the policy and one from the
  reference (``scheme: pairs``), labelled by an oracle built from a reward: a deterministic comparison or a
  Bradley-Terry draw with a scale (docs/xpo.md).
* ``xpo``: the ``pairs`` sampling plus alpha * log pi(y~) on the reference sample y~ (docs/xpo.md).
* ``reward-model``: a Bradley-Terry reward model, a scalar head on any causal-LM folder, trained on a preferences
  file with a held-out share for accuracy; RUN/final is usable as a reward spec (docs/reward_model.md).

One source of truth: the YAML file, with any field overridden on the command line (``--beta 0.1``), resolved,
printed and saved as RUN/config.yaml. Every check that bad input can fail (config keys and values, model and data
paths, the reward on a first sample) runs before the run directory exists. RUN/summary.json holds the numbers
measured after training, which are also printed.

Stopping and resuming: every command saves checkpoints and continues a stopped run with ``--resume RUN``
(SIGTERM or Ctrl-C saves a checkpoint first, exit 143 or 130). An ``online-dpo`` / ``xpo`` checkpoint of the
cumulative regime also holds the pairs collected so far, which every later step re-fits on.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from tilt.runs import directory as runs
from tilt.cli.train import EXIT_FAILED, EXIT_SIGNAL, Stop, _coerce, load_yaml
from tilt.cli.output import run_parsed

COMMANDS = ("dpo", "online-dpo", "xpo", "reward-model")
RESUMABLE = ("dpo", "online-dpo", "xpo", "reward-model")
RESUME_OVERRIDABLE = ("checkpoint_every", "keep_checkpoints")
"""Fields that ``--resume`` may change: neither alters the steps already taken."""
ORACLES = ("comparison", "bradley-terry")


@dataclass(frozen=True)
class DPORun:
    """What ``tilt train dpo`` reads and how it keeps its records."""

    model: str = field(default="", metadata={"help": "the policy to train: a from_pretrained folder, a cached hub id, or 'embedded'"})
    ref: str = field(default="", metadata={"help": "the reference pi_ref (same tokenizer); default: the same as model"})
    preferences: str = field(default="", metadata={"help": "preferences data file, rows {prompt, chosen, rejected} (or chats)"})
    held_out: float = field(default=0.0, metadata={"help": "share of the pairs kept out of training (a seeded split), evaluated every eval_every steps and at the end as eval/* metrics; 0 = none"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a checkpoint every this many steps (and at the end); 0 = only at the end"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints; 0 = keep all"})

    def __post_init__(self):
        _need(self, ("model", "preferences"))
        _check_checkpointing(self)
        if not 0 <= self.held_out < 1:
            raise ValueError(f"held_out must be in [0, 1), got {self.held_out}")


@dataclass(frozen=True)
class OnlineRun:
    """What ``tilt train online-dpo`` / ``xpo`` read: prompts, the reward behind the oracle, the final evaluation."""

    model: str = field(default="", metadata={"help": "the policy to train: a from_pretrained folder, a cached hub id, or 'embedded'"})
    ref: str = field(default="", metadata={"help": "the reference pi_ref (same tokenizer); default: the same as model"})
    prompts: str = field(default="", metadata={"help": "prompts data file, rows {prompt} or {messages}"})
    reward: tuple = field(default=(), metadata={"help": "the reward the oracle compares: a spec or a list of WEIGHT*SPEC terms (as in kl-rl)"})
    oracle: str = field(default="comparison", metadata={"help": "'comparison' (A wins when r(A) > r(B)) or 'bradley-terry' (A wins with prob. sigma(scale*(r(A)-r(B))))"})
    scale: float = field(default=1.0, metadata={"help": "Bradley-Terry scale (oracle bradley-terry only)"})
    ties: str = field(default="tie", metadata={"help": "comparison oracle on equal rewards: 'tie' (dropped from the DPO term), 'first' or 'random'"})
    sample_prompts: int = field(default=4, metadata={"help": "how many prompts (the first ones) samples.jsonl shows, at step 0 and at the end"})
    eval_prompts: int = field(default=0, metadata={"help": "after training, evaluate on the first N prompts (0 = all of them)"})
    eval_samples_per_prompt: int = field(default=8, metadata={"help": "completions per prompt from the policy and from pi_ref in the final evaluation; 0 = no evaluation"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a checkpoint every this many steps (and at the end); 0 = only at the end"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints; 0 = keep all"})

    def __post_init__(self):
        _need(self, ("model", "prompts"))
        _check_checkpointing(self)
        if not self.reward:
            raise ValueError("the config must set reward (the oracle compares completions by it), in the YAML file or as --reward SPEC")
        if self.oracle not in ORACLES:
            raise ValueError(f"oracle must be one of {', '.join(ORACLES)}; got {self.oracle!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.sample_prompts < 1 or self.eval_prompts < 0 or self.eval_samples_per_prompt < 0:
            raise ValueError("sample_prompts must be >= 1, eval_prompts and eval_samples_per_prompt >= 0")


@dataclass(frozen=True)
class RewardModelRun:
    """What ``tilt train reward-model`` reads."""

    model: str = field(default="", metadata={"help": "the backbone: any causal-LM from_pretrained folder, cached hub id or 'embedded'; a new scalar head is added"})
    preferences: str = field(default="", metadata={"help": "preferences data file, rows {prompt, chosen, rejected} (or chats)"})
    held_out: float = field(default=0.1, metadata={"help": "share of the pairs kept out of training to measure accuracy (a seeded split); 0 = none"})
    max_length: int | None = field(default=None, metadata={"help": "token limit of prompt + completion (cut from the left); None = no limit"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a checkpoint every this many steps (and at the end); 0 = only at the end"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints; 0 = keep all"})

    def __post_init__(self):
        _need(self, ("model", "preferences"))
        if not 0 <= self.held_out < 1:
            raise ValueError(f"held_out must be in [0, 1), got {self.held_out}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens or None, got {self.max_length}")
        _check_checkpointing(self)


def _need(settings, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not getattr(settings, n)]
    if missing:
        raise ValueError(f"the config must set {', '.join(missing)} (in the YAML file or as --{missing[0]} ...)")


def _check_checkpointing(settings) -> None:
    if settings.checkpoint_every < 0 or settings.keep_checkpoints < 0:
        raise ValueError("checkpoint_every and keep_checkpoints must be >= 0")


# --- the config: YAML + overrides -> checked dataclasses ----------------------------------------------------------
def classes(command: str) -> tuple[type, type]:
    """(run settings, recipe config) dataclasses of a command."""
    if command == "dpo":
        from tilt.recipes.dpo import DPOConfig

        return DPORun, DPOConfig
    if command in ("online-dpo", "xpo"):
        from tilt.recipes.online_dpo import OnlineDPOConfig

        return OnlineRun, OnlineDPOConfig
    if command == "reward-model":
        from tilt.recipes.reward_model import RewardModelConfig

        return RewardModelRun, RewardModelConfig
    raise ValueError(f"unknown command {command!r}; tilt train knows: {', '.join(COMMANDS)}")


def sections(command: str) -> dict[str, type]:
    from tilt.data import DataConfig
    from tilt.engine.hf import SamplingConfig

    out: dict[str, type] = {"data": DataConfig}
    if command in ("online-dpo", "xpo"):
        out["sampling"] = SamplingConfig
    return out


COMMAND_DEFAULTS = {"online-dpo": {"scheme": "online-dpo", "alpha": 0.0}, "xpo": {"scheme": "xpo"}}
"""Recipe defaults that differ by command (OnlineDPOConfig's own defaults are XPO's)."""
SCHEMES_OF = {"online-dpo": ("online-dpo", "pairs"), "xpo": ("xpo",)}


def _section_fields(cls) -> list:
    return [f for f in fields(cls) if f.name != "fmt"]  # the data format is fixed by the command


def flat_fields(command: str) -> dict[str, tuple[str | None, Any]]:
    settings_cls, recipe_cls = classes(command)
    out: dict[str, tuple[str | None, Any]] = {}
    for cls in (settings_cls, recipe_cls):
        for f in fields(cls):
            if f.name in out:
                raise AssertionError(f"field {f.name} of {cls.__name__} collides with another config field")
            out[f.name] = (None, f)
    for name, cls in sections(command).items():
        for f in _section_fields(cls):
            if f.name in out:
                raise AssertionError(f"field {f.name} of {name} collides with another config field")
            out[f.name] = (name, f)
    return out


def _schedule(name: str, value: Any, *, from_text: bool) -> float | list[float]:
    """alpha / beta: a number or a per-step list; on the command line ``0.1`` or ``0.1,0.05,0.01``."""
    if from_text:
        try:
            values = [float(v) for v in str(value).split(",")]
        except ValueError:
            raise ValueError(f"{name} must be a number or a comma-separated list of numbers; got {value!r}") from None
        return values[0] if len(values) == 1 else values
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be a number or a list of numbers (a per-step schedule); got {value!r}")


def _value(name: str, value: Any, f, *, from_text: bool) -> Any:
    if f.type == "Any":
        return _schedule(name, value, from_text=from_text)
    return _coerce(name, value, f.type, from_text=from_text and name != "reward")


def resolve(command: str, from_file: dict, overrides: dict[str, Any]) -> dict:
    """The resolved config (saved as config.yaml): file values, then command-line overrides (text), then the
    command's defaults. Unknown keys are an error naming the valid ones."""
    known = flat_fields(command)
    secs = sections(command)
    valid = sorted(set(known) | set(secs) | {"recipe"})
    flat: dict[str, Any] = {}
    if "recipe" in from_file and from_file["recipe"] != command:
        raise ValueError(f"the config file is for recipe {from_file['recipe']!r}, not {command!r}")
    for key, value in from_file.items():
        if key == "recipe":
            continue
        if key in secs:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be a mapping of its fields; got {value!r}")
            names = [f.name for f in _section_fields(secs[key])]
            for sub, v in value.items():
                if sub not in names:
                    raise ValueError(f"unknown config key {key}.{sub!s}; {key} takes: {', '.join(names)}")
                flat[sub] = _value(f"{key}.{sub}", v, known[sub][1], from_text=False)
            continue
        if key not in known or known[key][0] is not None:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        flat[key] = _value(key, value, known[key][1], from_text=False)
    for key, value in overrides.items():
        flat[key] = _value(key, value, known[key][1], from_text=True)
    if "ref" in known and not flat.get("ref"):
        flat["ref"] = flat.get("model", "")
    defaults = COMMAND_DEFAULTS.get(command, {})
    out: dict[str, Any] = {"recipe": command}
    for name, (section, f) in known.items():
        if section is None:
            default = defaults.get(name, f.default if f.default is not MISSING else f.default_factory())
            value = flat.get(name, default)
            out[name] = list(value) if isinstance(value, tuple) else value
    for name, cls in secs.items():
        out[name] = {f.name: flat.get(f.name, f.default) for f in _section_fields(cls)}
    build(out)  # every dataclass checks its values now, before anything is loaded
    return out


def build(config: dict) -> tuple:
    """(run settings, recipe config, {section: dataclass}) from a resolved config."""
    from tilt.data import DataConfig

    command = config["recipe"]
    settings_cls, recipe_cls = classes(command)
    settings = settings_cls(**{f.name: tuple(config[f.name]) if f.name == "reward" else config[f.name] for f in fields(settings_cls)})
    recipe_config = recipe_cls(**{f.name: config[f.name] for f in fields(recipe_cls)})
    if command in SCHEMES_OF and recipe_config.scheme not in SCHEMES_OF[command]:
        other = "xpo" if recipe_config.scheme == "xpo" else "online-dpo"
        raise ValueError(f"tilt train {command} takes scheme {' or '.join(SCHEMES_OF[command])}; for scheme "
                         f"{recipe_config.scheme!r} use tilt train {other}")
    built = {}
    for name, cls in sections(command).items():
        extra = {"fmt": "prompts" if command in ("online-dpo", "xpo") else "preferences"} if cls is DataConfig else {}
        built[name] = cls(**config[name], **extra)
    return settings, recipe_config, built


# --- the command line ----------------------------------------------------------------------------------------------
SUMMARIES = {
    "dpo": "offline DPO (sigmoid or IPO loss) on a preferences file, against a reference scored once",
    "online-dpo": "online DPO: fresh pairs from the policy (or policy and reference) each step, labelled by a reward-based oracle",
    "xpo": "XPO: online DPO with pairs (policy, reference) and the exploration bonus alpha * log pi(y~) on the reference sample",
    "reward-model": "a Bradley-Terry reward model (scalar head on a causal-LM backbone) from a preferences file, with held-out accuracy",
}
EXAMPLES = {"dpo": "examples/dpo_tiny.yaml", "online-dpo": "examples/xpo_tiny.yaml --scheme online-dpo --alpha 0",
            "xpo": "examples/xpo_tiny.yaml",
            "reward-model": "FILE.yaml  (or: --model tiny-model --preferences examples/tiny_preferences.jsonl --held-out 0.25)"}


def add_train_parsers(train_sub) -> None:
    """Add ``dpo``, ``online-dpo``, ``xpo`` and ``reward-model`` to the ``tilt train`` subparsers."""
    for command in COMMANDS:
        add_command_parser(train_sub, command)


def add_command_parser(train_sub, command: str) -> argparse.ArgumentParser:
    summary = SUMMARIES[command]
    resume = (f"         tilt train {command} --resume runs/my-run            (continue a stopped run)\n"
              if command in RESUMABLE else "")
    example = EXAMPLES[command]
    p = train_sub.add_parser(
        command, help=summary, description=f"{summary}.\n\n{__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Example: tilt train {command} --config {example}\n{resume}"
        "Every config field below may be set in the YAML file (sampling and data fields in their sections) or overridden here.",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="the run config (YAML)")
    if command in RESUMABLE:
        p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint")
    p.add_argument("--run-dir", metavar="DIR", help="where the run is written (default: runs/<recipe>-<date>-<time>)")
    groups = {None: p.add_argument_group("run settings and recipe fields (override the config file)")}
    for name in sections(command):
        groups[name] = p.add_argument_group(f"{name} fields (the config file's {name}: section)")
    for name, (section, f) in flat_fields(command).items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        kwargs: dict[str, Any] = {"dest": f"cfg_{name}", "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if name == "reward":
            kwargs.update(nargs="+", metavar="SPEC")
        else:
            kwargs["metavar"] = "FLOAT[,FLOAT...]" if f.type == "Any" else f.type.replace(" | None", "").upper()
        groups[section].add_argument(*flags, **kwargs)
    p.set_defaults(run=run_command, preference_command=command)
    return p


def run_command(args: argparse.Namespace) -> int:
    command = args.preference_command
    overrides = {k[len("cfg_"):]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    resume = getattr(args, "resume", None)
    if resume:
        if args.config or args.run_dir:
            raise ValueError("--resume continues a run with its own config.yaml in its own directory; drop --config and --run-dir")
        fixed = sorted(set(overrides) - set(RESUME_OVERRIDABLE))
        if fixed:
            raise ValueError(f"cannot change {', '.join(fixed)} when resuming (the run would no longer be one run); "
                             f"--resume accepts: {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDABLE)}")
        config = resolve(command, runs.read_config(resume), overrides)
        run_dir = Path(resume)
    else:
        if not args.config and not overrides:
            raise ValueError("give a run config with --config FILE.yaml (see examples/), or set the fields on the command line")
        config = resolve(command, load_yaml(args.config) if args.config else {}, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the reward model's new scalar head is expected to be missing from the backbone
    print(f"# tilt train {command}: resolved config" + (f" (resuming {run_dir})" if resume else ""))
    print(runs.dump_config(config), end="", flush=True)
    if command == "dpo":
        return train_dpo(config, run_dir, resume=bool(resume))
    if command == "reward-model":
        return train_reward_model(config, run_dir, resume=bool(resume))
    return train_online(config, run_dir, resume=bool(resume))


# --- the training loop shared by the commands ----------------------------------------------------------------------
def run_steps(command: str, run: Path, steps: int, start: int, train_fn: Callable[[Callable], None], *,
              save: Callable[[int], None] | None, checkpoint_every: int, shown: tuple[str, ...]) -> int | None:
    """Call ``train_fn(on_step)``; on_step appends metrics.jsonl rows, saves checkpoints (``save``, None when the
    command does not resume) and turns SIGTERM/SIGINT into a clean stop. Returns an exit code when the run
    stopped early, None when it finished."""
    from tqdm import tqdm

    last_saved = {"step": start if start else -1}
    stop_signal: dict[str, Any] = {"signal": None}

    def save_once(step: int) -> None:
        if save is not None and last_saved["step"] != step:
            save(step)
            last_saved["step"] = step

    def on_signal(signum, frame):
        if stop_signal["signal"] is not None:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop_signal["signal"] = signum
        print(f"\n# {signal.Signals(signum).name}: finishing this step" + (", then saving a checkpoint" if save else "")
              + " (send it again to stop at once)", file=sys.stderr, flush=True)

    bar = tqdm(total=steps, initial=start, unit="step", desc=f"train {command}", file=sys.stderr, dynamic_ncols=True)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        done = step + 1
        runs.append_jsonl(run / "metrics.jsonl", {"step": done, **metrics})
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics}, refresh=False)
        bar.update()
        if (checkpoint_every and done % checkpoint_every == 0) or done == steps:
            save_once(done)
        if stop_signal["signal"] is not None:
            save_once(done)
            raise Stop(done)

    previous = {s: signal.signal(s, on_signal) for s in EXIT_SIGNAL}
    try:
        train_fn(on_step)
    except Stop as stop:
        bar.close()
        name = signal.Signals(stop_signal["signal"]).name
        if save is not None:
            print(f"# stopped by {name} after step {stop.args[0]} of {steps}; checkpoint saved\n"
                  f"# continue with: tilt train {command} --resume {run}", file=sys.stderr, flush=True)
        else:
            print(f"# stopped by {name} after step {stop.args[0]} of {steps}; tilt train {command} does not resume: "
                  "start it again in a new run directory", file=sys.stderr, flush=True)
        return EXIT_SIGNAL[stop_signal["signal"]]
    except Exception as exc:  # noqa: BLE001 - any error during training marks the run failed, then is reported
        bar.close()
        message = f"{type(exc).__name__}: {exc}"
        runs.mark_failed(run, message)
        hint = f"; fix the cause, then: tilt train {command} --resume {run}" if save is not None else ""
        print(f"tilt: error: {message}\n# the run {run} is marked failed ({run / runs.FAILED}){hint}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    bar.close()
    if start >= steps:
        save_once(steps)
    return None


def _open_run(run_dir: Path, config: dict, resume: bool, initial_samples: list[dict] = ()) -> Path:
    if resume:
        runs.clear_failed(run_dir)
        return run_dir
    return runs.create_run(run_dir, config, initial_samples)


def _restore(checkpoint: Path | None, optimizer, total: int, start: int) -> dict | None:
    """Restore the optimizer and RNG states of ``checkpoint``; returns its trainer state (None without one)."""
    if checkpoint is None:
        return None
    state, tensors = runs.load_trainer_state(checkpoint)
    runs.restore_optimizer(optimizer, state, tensors)
    runs.restore_rng(state, tensors)
    print(f"# resuming from {checkpoint} (step {start} of {total})", flush=True)
    return state


def _finish(run: Path, summary: dict) -> None:
    runs.write_atomic(run / "summary.json", json.dumps(summary, indent=1) + "\n")
    width = max(len(k) for k in summary)
    from tilt.report import divergence_estimator, show_divergence

    for key, value in summary.items():
        if isinstance(value, float) and divergence_estimator(key):
            shown = show_divergence(value, summary.get(f"{key}_ci"), estimator=divergence_estimator(key))
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        elif isinstance(value, list):
            shown = "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
        else:
            shown = str(value)
        print(f"# {key:<{width}}  {shown}")
    print(f"# run directory: {run}\n# trained model: {run / 'final'}")


# --- dpo -----------------------------------------------------------------------------------------------------------
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


def train_dpo(config: dict, run_dir: Path, *, resume: bool) -> int:
    from tilt.data import load_data
    from tilt.engine.hf import HFPolicy
    from tilt.engine.loading import load_model, load_tokenizer, resolve_model_path
    from tilt.recipes import dpo
    from tilt.recipes.common import build_optimizer

    settings, cfg, secs = build(config)
    resolve_model_path(settings.model)
    resolve_model_path(settings.ref)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    tokenizer = load_tokenizer(settings.model)
    data = load_data(settings.preferences, secs["data"], tokenizer=tokenizer)
    policy = HFPolicy(load_model(str(checkpoint) if checkpoint is not None else settings.model), tokenizer)
    train_rows, eval_rows = split_pairs(data.rows, settings.held_out, cfg.seed)
    pairs = preference_pairs(policy, train_rows)
    eval_pairs = preference_pairs(policy, eval_rows) if eval_rows else None
    if settings.ref == settings.model and checkpoint is None:
        ref = policy  # the reference is the initial policy: score the pairs with it before any update
    else:
        ref = HFPolicy(load_model(settings.ref).requires_grad_(False), load_tokenizer(settings.ref))
        if len(ref.tokenizer) != len(tokenizer):
            raise ValueError(f"the reference {settings.ref!r} has a vocabulary of {len(ref.tokenizer)} tokens and the model "
                             f"{len(tokenizer)}: DPO needs the same tokenizer")
    ref_logprobs = dpo.reference_logprobs(ref, pairs, cfg.micro_batch_size)  # once, reused by every step
    eval_ref_logprobs = dpo.reference_logprobs(ref, eval_pairs, cfg.micro_batch_size) if eval_pairs is not None else None
    del ref
    margin_before, accuracy_before = pair_margins(policy, pairs, ref_logprobs, cfg.beta, cfg.micro_batch_size)
    run = _open_run(run_dir, config, resume)
    steps = math.ceil(cfg.epochs * len(pairs) / cfg.pairs_per_step)
    optimizer = build_optimizer(cfg.optimizer, policy.parameters(), cfg.lr)
    _restore(checkpoint, optimizer, steps, start)

    def save(step: int) -> None:
        runs.save_checkpoint(run, step, policy.model, tokenizer, optimizer, keep=settings.keep_checkpoints, extra={"recipe": "dpo"})

    stopped = run_steps("dpo", run, steps, start, lambda on_step: dpo.train(
        cfg, policy, policy, pairs, ref_logprobs=ref_logprobs, eval_pairs=eval_pairs, eval_ref_logprobs=eval_ref_logprobs,
        optimizer=optimizer, start_step=start, on_step=on_step),
        save=save, checkpoint_every=settings.checkpoint_every, shown=("loss", "reward_margin", "accuracy"))
    if stopped is not None:
        return stopped
    runs.save_final(run, policy.model, tokenizer)
    margin_after, accuracy_after = pair_margins(policy, pairs, ref_logprobs, cfg.beta, cfg.micro_batch_size)
    _finish(run, {"pairs": len(pairs), "held_out_pairs": len(eval_rows), "steps": steps, "reward_margin_before": margin_before, "reward_margin_after": margin_after,
                  "accuracy_before": accuracy_before, "accuracy_after": accuracy_after})
    return 0


# --- online-dpo / xpo ----------------------------------------------------------------------------------------------
def build_oracle(settings: OnlineRun, reward_fn):
    from tilt.preferences import BradleyTerry, RewardComparison

    if settings.oracle == "bradley-terry":
        return BradleyTerry(reward_fn, scale=settings.scale)
    return RewardComparison(reward_fn, ties=settings.ties)


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


def train_online(config: dict, run_dir: Path, *, resume: bool = False) -> int:
    from tilt.cli.train import draw_samples
    from tilt.data import load_data
    from tilt.engine.hf import HFPolicy
    from tilt.engine.loading import load_model, load_tokenizer, resolve_model_path
    from tilt.evaluation import EvalConfig, evaluate
    from tilt.recipes import online_dpo
    from tilt.recipes.common import build_optimizer
    from tilt.reward_fns import reward_from_specs
    from tilt.rewards import RewardError

    command = config["recipe"]
    settings, cfg, secs = build(config)
    sampling = secs["sampling"]
    if settings.eval_samples_per_prompt and not sampling.exact:
        raise ValueError("the final evaluation needs samples of the policy itself (temperature 1, no top-k/top-p); "
                         "set eval_samples_per_prompt: 0 to train with a modified sampler")
    resolve_model_path(settings.model)
    resolve_model_path(settings.ref)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    tokenizer = load_tokenizer(settings.model)
    policy = HFPolicy(load_model(str(checkpoint) if checkpoint is not None else settings.model), tokenizer, sampling)
    ref = HFPolicy(load_model(settings.ref).requires_grad_(False), load_tokenizer(settings.ref), sampling)
    if len(ref.tokenizer) != len(tokenizer):
        raise ValueError(f"the reference {settings.ref!r} has a vocabulary of {len(ref.tokenizer)} tokens and the model "
                         f"{len(tokenizer)}: online DPO needs the same tokenizer")
    reward_fn = reward_from_specs(list(settings.reward))
    oracle = build_oracle(settings, reward_fn)
    prompts = [row["prompt"] for row in load_data(settings.prompts, secs["data"], tokenizer=tokenizer).rows]
    initial = []
    if not resume:
        try:
            initial = draw_samples(policy, reward_fn, prompts, settings, cfg.seed, 0)  # a broken reward fails here
        except RewardError as exc:
            raise ValueError(str(exc)) from exc
    run = _open_run(run_dir, config, resume, initial)
    optimizer = build_optimizer(cfg.optimizer, policy.parameters(), cfg.lr)
    state = _restore(checkpoint, optimizer, cfg.steps, start)
    stored: list = []  # the cumulative regime's pairs, appended to by the recipe, saved with every checkpoint
    if state is not None and cfg.regime == "cumulative":
        if "stored_pairs" not in state["extra"]:
            raise ValueError(f"{checkpoint} holds no stored pairs, which the cumulative regime needs to resume")
        stored = stored_pairs_from_extra(state["extra"]["stored_pairs"], policy.device)

    def save(step: int) -> None:
        extra: dict[str, Any] = {"recipe": command}
        if cfg.regime == "cumulative":
            extra["stored_pairs"] = stored_pairs_extra(stored)
        runs.save_checkpoint(run, step, policy.model, tokenizer, optimizer, keep=settings.keep_checkpoints, extra=extra)

    stopped = run_steps(command, run, cfg.steps, start, lambda on_step: online_dpo.train(
        cfg, policy, ref, oracle, prompts, optimizer=optimizer, start_step=start, stored=stored, on_step=on_step),
        save=save, checkpoint_every=settings.checkpoint_every, shown=("loss", "policy_sample_win_rate", "kl_ref"))
    if stopped is not None:
        return stopped
    for row in draw_samples(policy, reward_fn, prompts, settings, cfg.seed, cfg.steps):
        runs.append_jsonl(run / "samples.jsonl", row)
    runs.save_final(run, policy.model, tokenizer)
    rows = runs.read_jsonl(run / "metrics.jsonl")
    summary: dict[str, Any] = {"steps": cfg.steps, "scheme": cfg.scheme}
    if rows:
        summary["last_policy_sample_win_rate"] = rows[-1]["policy_sample_win_rate"]
    if settings.eval_samples_per_prompt:
        chosen = prompts[: settings.eval_prompts] if settings.eval_prompts else prompts
        m = evaluate(EvalConfig(samples_per_prompt=settings.eval_samples_per_prompt, seed=cfg.seed), policy, ref, reward_fn, chosen).metrics
        summary.update(eval_prompts=len(chosen), win_rate=m["win_rate"], win_rate_ci=m["win_rate_ci"], reward_mean=m["reward_mean"],
                       ref_reward_mean=m["ref_reward_mean"], kl_ref=m["kl_ref"])
    _finish(run, summary)
    return 0


# --- reward-model --------------------------------------------------------------------------------------------------
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


def train_reward_model(config: dict, run_dir: Path, *, resume: bool) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification

    from tilt.data import load_data
    from tilt.engine.loading import check_no_custom_code, check_safe_weights, load_tokenizer, resolve_model_path
    from tilt.recipes import reward_model
    from tilt.recipes.common import build_optimizer, derive_seed
    from tilt.reward_fns import SequenceClassifierReward

    settings, cfg, secs = build(config)
    path = resolve_model_path(settings.model)
    if Path(path).is_dir():
        check_safe_weights(path)
        check_no_custom_code(path, trust_remote_code=False)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    tokenizer = load_tokenizer(settings.model)
    data = load_data(settings.preferences, secs["data"], tokenizer=tokenizer)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data.rows]
    train_pairs, held_out = split_pairs(rows, settings.held_out, cfg.seed)
    torch.manual_seed(derive_seed(cfg.seed, "reward_head"))  # the new scalar head's initialisation
    source = str(checkpoint) if checkpoint is not None else path
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, use_safetensors=True)
    reward = SequenceClassifierReward(model, tokenizer, max_length=settings.max_length)
    accuracy_before = reward_model.accuracy(reward, held_out) if held_out and checkpoint is None else None
    run = _open_run(run_dir, config, resume)
    steps = max(1, math.ceil(cfg.epochs * len(train_pairs) / cfg.pairs_per_step))  # as reward_model.train counts them
    optimizer = build_optimizer("adamw", reward.model.parameters(), cfg.lr)
    _restore(checkpoint, optimizer, steps, start)

    def save(step: int) -> None:
        runs.save_checkpoint(run, step, reward.model, tokenizer, optimizer, keep=settings.keep_checkpoints, extra={"recipe": "reward-model"})

    stopped = run_steps("reward-model", run, steps, start, lambda on_step: reward_model.train(
        cfg, reward, train_pairs, optimizer=optimizer, start_step=start, on_step=on_step),
        save=save, checkpoint_every=settings.checkpoint_every, shown=("loss", "accuracy"))
    if stopped is not None:
        return stopped
    reward.model.eval()
    runs.save_final(run, reward.model, tokenizer)
    summary: dict[str, Any] = {"train_pairs": len(train_pairs), "held_out_pairs": len(held_out), "steps": steps,
                               "accuracy_train": reward_model.accuracy(reward, train_pairs)}
    if held_out:
        summary["accuracy_held_out"] = reward_model.accuracy(reward, held_out)
        if accuracy_before is not None:
            summary["accuracy_held_out_before"] = accuracy_before
    _finish(run, summary)
    print(f"# use it as a reward: --reward {run / 'final'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tilt.cli.train_preference dpo ...``: the same as ``tilt train dpo ...``."""
    parser = argparse.ArgumentParser(prog="tilt train")
    add_train_parsers(parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True))
    args = parser.parse_args(argv)
    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
