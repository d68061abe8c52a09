"""``tilt train kl-rl``: train a Hugging Face causal LM from a YAML config, in a run directory that survives.

One source of truth: the YAML file, with any field overridden on the command line (``--beta 0.1``), is
resolved, printed, and saved as RUN/config.yaml; ``--resume RUN`` reads it back from there. The run directory
holds the metrics of every step, sample tables, atomic checkpoints and the final model (docs/runs.md).

Stopping: SIGTERM or Ctrl-C finishes the current step, saves a checkpoint, prints how to resume and exits with
143 (SIGTERM) or 130 (SIGINT); a second Ctrl-C stops at once. ``kill -9`` loses at most the steps since the last
checkpoint: ``--resume`` starts from it and, on CPU, writes the same metrics an uninterrupted run would have.

Errors: everything that can be checked before training (config keys and values, model and data paths, the
reward, the tracker, and the reward on the initial samples) is checked before the run directory is created, so
a bad input leaves no run directory. An error during training (a reward that raises at step 40) marks the run
directory failed (RUN/FAILED holds the error) and leaves its checkpoints intact for ``--resume``.

CTRL (a ``calibration:`` section with a transform; docs/infalign.md): after the run directory exists, m reference
samples of every training prompt are drawn and scored once (or read from ``calibration_cache``), saved as
RUN/calibration.json, and the recipe trains on Phi(C); ``--resume`` reads that file and never samples it again.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from tilt.runs import directory as runs
from tilt.cli.output import run_parsed

EXIT_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130}
"""Exit codes after a clean stop on a signal (the shell's 128 + signal number): the run is unfinished but resumable."""
EXIT_FAILED = 1
"""Exit code of a run that stopped on an error during training (RUN/FAILED says which)."""
RESUME_OVERRIDABLE = ("steps", "checkpoint_every", "sample_every", "keep_checkpoints", "tracker")
"""Fields that ``--resume`` may change: none of them alters the steps already taken."""


@dataclass(frozen=True)
class RunSettings:
    """What a training run reads and how it keeps its records (the recipe's own fields are in its config)."""

    model: str = field(default="", metadata={"help": "the policy to train: a local from_pretrained folder, or a hub id already in the local cache"})
    ref: str = field(default="", metadata={"help": "the reference policy pi_ref (same tokenizer); default: the same as model"})
    reward: tuple = field(default=(), metadata={"help": "reward spec, or a list of WEIGHT*SPEC terms summed: module:function, file.py:function, a reward-model folder, sentiment, length:chars, keywords:a,b, regex:PAT"})
    prompts: str = field(default="", metadata={"help": "prompts data file (.jsonl/.csv/.parquet or a save_to_disk folder), rows {prompt} or {messages}"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a checkpoint every this many steps (and at the end); 0 = only at the end"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints; 0 = keep all"})
    sample_every: int = field(default=50, metadata={"help": "append samples to samples.jsonl every this many steps (also at step 0 and at the end); 0 = only then"})
    sample_prompts: int = field(default=4, metadata={"help": "how many prompts (the first ones of the data) samples.jsonl shows, one completion each"})
    tracker: str = field(default="none", metadata={"help": "also send metrics to: none, tensorboard, wandb or mlflow (the package must be installed)"})

    def __post_init__(self):
        missing = [n for n in ("model", "prompts") if not getattr(self, n)]
        if missing or not self.reward:
            need = missing + ([] if self.reward else ["reward"])
            raise ValueError(f"the config must set {', '.join(need)} (in the YAML file or as --{need[0]} ...)")
        if min(self.checkpoint_every, self.keep_checkpoints, self.sample_every) < 0 or self.sample_prompts < 1:
            raise ValueError("checkpoint_every, keep_checkpoints and sample_every must be >= 0, sample_prompts >= 1")
        if self.tracker not in runs.TRACKERS:
            raise ValueError(f"tracker must be one of {', '.join(runs.TRACKERS)}; got {self.tracker!r}")


# --- the config: YAML + overrides -> checked dataclasses ----------------------------------------------------------
def recipe_config_class(recipe: str):
    if recipe == "kl-rl":
        from tilt.recipes.kl_rl import KLRLConfig

        return KLRLConfig
    raise ValueError(f"unknown recipe {recipe!r}; tilt train knows: kl-rl")


def sections() -> dict[str, type]:
    """The nested sections of a run config and their dataclasses."""
    from tilt.data import DataConfig
    from tilt.engine.hf import SamplingConfig
    from tilt.infalign import CalibrationConfig

    return {"sampling": SamplingConfig, "data": DataConfig, "calibration": CalibrationConfig}


SECTION_SKIP = {"data": ("fmt",)}  # fixed by the recipe (prompts)


def section_fields(name: str, cls) -> list:
    return [f for f in fields(cls) if f.name not in SECTION_SKIP.get(name, ())]


def flat_fields(recipe: str) -> dict[str, tuple[str | None, Any]]:
    """Every settable field: name -> (section or None for the top level, dataclass field)."""
    out: dict[str, tuple[str | None, Any]] = {}
    for f in fields(RunSettings):
        out[f.name] = (None, f)
    for f in fields(recipe_config_class(recipe)):
        if f.name in out:
            raise AssertionError(f"recipe field {f.name} collides with a run setting")
        out[f.name] = (None, f)
    for name, cls in sections().items():
        for f in section_fields(name, cls):
            if f.name in out:
                raise AssertionError(f"field {f.name} of {name} collides with another config field")
            out[f.name] = (name, f)
    return out


def _coerce(name: str, value: Any, type_name: str, *, from_text: bool) -> Any:
    """``value`` as the field's type; command-line text is parsed, YAML values are checked."""
    optional = "None" in type_name
    base = type_name.replace("| None", "").strip()
    if optional and (value is None or (from_text and str(value).lower() in ("none", "null"))):
        return None
    if name == "reward":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(s, str) and s for s in items):
            raise ValueError(f"reward must be a spec string or a list of them; got {value!r}")
        return tuple(items)
    try:
        if base == "int":
            if from_text:
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if base == "float":
            if from_text:
                return float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            return float(value)
        if base == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if base == "bool":
            if from_text:
                if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise TypeError
                return str(value).lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {'an' if base == 'int' else 'a'} {base}{' or null' if optional else ''}; got {value!r}") from None
    return value


def resolve(recipe: str, from_file: dict, overrides: dict[str, Any]) -> dict:
    """The resolved config (a plain dict, saved as config.yaml): file values, then command-line overrides (text),
    then the defaults. Unknown keys are an error naming the valid ones."""
    known = flat_fields(recipe)
    valid = sorted(set(known) | set(sections()) | {"recipe"})
    flat: dict[str, Any] = {}
    for key, value in from_file.items():
        if key == "recipe":
            if value != recipe:
                raise ValueError(f"the config file is for recipe {value!r}, not {recipe!r}")
            continue
        if key in sections():
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be a mapping of its fields; got {value!r}")
            names = [f.name for f in section_fields(key, sections()[key])]
            for sub, v in value.items():
                if sub not in names:
                    raise ValueError(f"unknown config key {key}.{sub!s}; {key} takes: {', '.join(names)}")
                flat[sub] = _coerce(f"{key}.{sub}", v, known[sub][1].type, from_text=False)
            continue
        if key not in known:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        flat[key] = _coerce(key, value, known[key][1].type, from_text=False)
    for key, value in overrides.items():
        flat[key] = _coerce(key, value, known[key][1].type, from_text=not (key == "reward"))
    if not flat.get("ref"):
        flat["ref"] = flat.get("model", "")
    out: dict[str, Any] = {"recipe": recipe}
    for name, (section, f) in known.items():
        if section is None:
            default = f.default if f.default is not MISSING else f.default_factory()
            value = flat.get(name, default)
            out[name] = list(value) if isinstance(value, tuple) else value
    for name, cls in sections().items():
        out[name] = {f.name: flat.get(f.name, f.default) for f in section_fields(name, cls)}
    build(out)  # every dataclass checks its values now, before anything is loaded
    return out


def build(config: dict):
    """(RunSettings, recipe config, SamplingConfig, DataConfig, CalibrationConfig) from a resolved config."""
    from tilt.data import DataConfig
    from tilt.engine.hf import SamplingConfig
    from tilt.infalign import CalibrationConfig

    cls = recipe_config_class(config["recipe"])
    settings = RunSettings(**{f.name: tuple(config[f.name]) if f.name == "reward" else config[f.name] for f in fields(RunSettings)})
    recipe_config = cls(**{f.name: config[f.name] for f in fields(cls)})
    sampling = SamplingConfig(**config["sampling"])
    data = DataConfig(fmt="prompts", **config["data"])
    calibration = CalibrationConfig(**config["calibration"])
    return settings, recipe_config, sampling, data, calibration


# --- the command line ----------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train a model from a YAML config, in a run directory you can stop and resume",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_sub = train.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    add_recipe_parser(train_sub, "kl-rl", "KL-regularised RL (REINFORCE with a leave-one-out baseline, or PPO-clip) toward "
                      "pi* ∝ pi_ref exp(r/beta)")
    from tilt.cli.pipelines import add_train_parsers  # here: the pipelines reuse this module's YAML loader

    add_train_parsers(train_sub)
    from tilt.cli.train_preference import add_train_parsers as add_preference_parsers

    add_preference_parsers(train_sub)


def add_recipe_parser(train_sub, recipe: str, summary: str) -> argparse.ArgumentParser:
    p = train_sub.add_parser(
        recipe, help=summary, description=f"{summary}.\n\n{__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Example: tilt train {recipe} --config examples/kl_rl_tiny.yaml --steps 20 --beta 0.1\n"
        f"         tilt train {recipe} --resume runs/my-run            (continue a stopped run)\n"
        "Every config field below may be set in the YAML file (sampling, data and calibration fields in their sections) or "
        "overridden here. See docs/runs.md.",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="the run config (YAML)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint")
    p.add_argument("--run-dir", metavar="DIR", help="where the run is written (default: runs/<recipe>-<date>-<time>)")
    groups = {None: p.add_argument_group("run settings and recipe fields (override the config file)")}
    for name in sections():
        groups[name] = p.add_argument_group(f"{name} fields (the config file's {name}: section)")
    for name, (section, f) in flat_fields(recipe).items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        kwargs: dict[str, Any] = {"dest": f"cfg_{name}", "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if name == "reward":
            kwargs.update(nargs="+", metavar="SPEC")
        else:
            kwargs["metavar"] = f.type.replace(" | None", "").upper()
        groups[section].add_argument(*flags, **kwargs)
    p.set_defaults(run=run_train)
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {k[len("cfg_"):]: v for k, v in vars(args).items() if k.startswith("cfg_")}


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path!r}")
    try:
        config = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(config).__name__}")
    return config


class Stop(Exception):
    """Raised from the step callback to leave the recipe's loop after a signal."""


def run_train(args: argparse.Namespace) -> int:
    overrides = overrides_from(args)
    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its own config.yaml; drop --config")
        if args.run_dir:
            raise ValueError("--resume RUN_DIR already names the run directory; drop --run-dir")
        fixed = sorted(set(overrides) - set(RESUME_OVERRIDABLE))
        if fixed:
            raise ValueError(f"cannot change {', '.join(fixed)} when resuming (the run would no longer be one run); "
                             f"--resume accepts: {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDABLE)}")
        saved = runs.read_config(args.resume)
        config = resolve(args.recipe, saved, overrides)
        run_dir = Path(args.resume)
    else:
        if not args.config and not overrides:
            raise ValueError("give a run config with --config FILE.yaml (see examples/), or set the fields on the command line")
        config = resolve(args.recipe, load_yaml(args.config) if args.config else {}, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    return train_kl_rl(config, run_dir, resume=bool(args.resume))


def draw_samples(policy, reward_fn, prompts: Sequence[str], settings: RunSettings, seed: int, step: int) -> list[dict]:
    """One completion of each of the first ``sample_prompts`` prompts, from a generator that depends only on
    (seed, step), so the rows are the same in a resumed run and do not disturb the training randomness."""
    from tilt.recipes.common import step_generator
    from tilt.rewards import score_rewards

    chosen = list(prompts[: settings.sample_prompts])
    rollout = policy.sample(chosen, 1, generator=step_generator(seed, step, "samples"))
    rewards = score_rewards(reward_fn, rollout.prompts, rollout.completions)
    return [{"step": step, "prompt": p, "completion": c, "reward": float(r)}
            for p, c, r in zip(rollout.prompts, rollout.completions, rewards.tolist())]


CALIBRATION_FILE = "calibration.json"
"""RUN/calibration.json: the calibration set a CTRL run trains with (``tilt.infalign.CalibrationSet`` as JSON)."""


def calibration_fingerprint(settings: RunSettings, sampling) -> dict:
    """What the reference samples of a calibration depend on besides m, seed and prompts: the reference and the
    reward as the config names them (not their weights or code), and the sampling settings. JSON values only, so
    that a saved fingerprint compares equal to a fresh one."""
    from dataclasses import asdict

    return {"reference": settings.ref, "reward": list(settings.reward), "sampling": asdict(sampling)}


def check_calibration_cache(calibration) -> None:
    """Before the run directory exists: the cache's folder exists and an existing cache file is readable."""
    from tilt.infalign import read_calibration

    if not calibration.active or calibration.calibration_cache is None:
        return
    cache = Path(calibration.calibration_cache)
    if not cache.parent.is_dir():
        raise FileNotFoundError(f"calibration_cache {str(cache)!r}: the folder {str(cache.parent)!r} does not exist")
    if cache.exists():
        read_calibration(cache)


def save_calibration_atomic(calibration_set, path: Path) -> None:
    """Write a calibration file through a temporary sibling and a rename, so readers never see half a file."""
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    calibration_set.save(tmp)
    runs.fsync_path(tmp)
    os.replace(tmp, path)
    runs.fsync_path(path.parent)


def calibrated_reward_for_run(run: Path, calibration, fingerprint: dict, ref, reward_fn, prompts: Sequence[Any], *,
                              main_rank: bool):
    """The CTRL reward of a run (digest §5(a)): the calibration of every distinct training prompt, from
    RUN/calibration.json when the run already has one (a resumed run never samples it again), else from
    ``calibration_cache`` when that was built with the same settings, else built with ``ref``; wrapped with the
    config's Phi. Returns (reward, how the calibration was obtained)."""
    from tilt import distributed
    from tilt.infalign import LoggedCalibratedReward, build_calibration, calibration_matches, distinct_prompts, read_calibration

    keyed = distinct_prompts(prompts)
    m, seed = calibration.calibration_samples, calibration.calibration_seed
    own = run / CALIBRATION_FILE
    cache = Path(calibration.calibration_cache) if calibration.calibration_cache is not None else None
    built = False
    cached = None
    if own.exists():
        calibration_set = read_calibration(own)
        if not calibration_matches(calibration_set, keyed, m, seed=seed, fingerprint=fingerprint):
            raise ValueError(f"{own} was not built for this run's reference, reward, sampling, m, seed or prompts; "
                             "delete it to build the calibration again")
        source = f"reused {own}"
    elif cache is not None and cache.exists() and calibration_matches(
            cached := read_calibration(cache), keyed, m, seed=seed, fingerprint=fingerprint):
        calibration_set, source = cached, f"read from the cache {cache}"
    else:
        if main_rank:
            why = "" if cached is None else f" (the cache {cache} was built with other settings and is replaced)"
            print(f"# calibration: sampling {m} reference completions of each of {len(keyed)} prompts ({m * len(keyed)} "
                  f"in all){why}", flush=True)
        # Under several processes every rank builds the same set: all samples come from one generator seeded with
        # calibration_seed, so the ranks agree (checked below) with nothing to broadcast; only rank 0 writes it.
        calibration_set = build_calibration(ref, reward_fn, keyed, m, seed=seed, fingerprint=fingerprint)
        built, source = True, "built"
    try:
        distributed.check_same_config({"calibration": distributed.config_hash(calibration_set.ref_rewards.tolist())})
    except distributed.ConfigMismatchError:
        raise RuntimeError("the processes built different calibration sets (non-deterministic sampling or reward); build it "
                           "once in one process with calibration_cache set, then relaunch with the same cache") from None
    distributed.barrier()  # every rank has read the files before rank 0 writes them
    if main_rank:
        if not own.exists():
            save_calibration_atomic(calibration_set, own)
        if built and cache is not None:
            save_calibration_atomic(calibration_set, cache)
            source += f", saved to the cache {cache}"
    distributed.barrier()
    return LoggedCalibratedReward(reward_fn, calibration_set, calibration.phi()), source


def train_kl_rl(config: dict, run_dir: Path, *, resume: bool) -> int:
    from tqdm import tqdm

    from tilt.data import load_data
    from tilt.engine.hf import HFPolicy
    from tilt.engine.loading import load_model, load_tokenizer, resolve_model_path
    from tilt.recipes import kl_rl
    from tilt.recipes.common import build_optimizer
    from tilt.reward_fns import reward_from_specs
    from tilt.rewards import RewardError

    from transformers.utils import logging as hf_logging

    from tilt import distributed

    hf_logging.disable_progress_bar()  # one progress bar (the run's), not one per file transformers reads or writes
    distributed.init()  # under torchrun (WORLD_SIZE > 1) only; one process needs no process group
    main_rank = distributed.is_main()  # one rank writes the run directory, logs and checkpoints
    settings, recipe_config, sampling, data_config, calibration = build(config)
    runs.check_tracker(settings.tracker)
    check_calibration_cache(calibration)
    if main_rank:
        print(f"# tilt train {config['recipe']}: resolved config" + (f" (resuming {run_dir})" if resume else ""))
        print(runs.dump_config(config), end="", flush=True)

    # Everything that can fail on bad input, before the run directory exists.
    resolve_model_path(settings.model)
    resolve_model_path(settings.ref)
    checkpoint, start = runs.prepare_resume(run_dir) if resume else (None, 0)
    source = str(checkpoint) if checkpoint is not None else settings.model
    tokenizer = load_tokenizer(source)
    policy = HFPolicy(load_model(source), tokenizer, sampling)
    ref = HFPolicy(load_model(settings.ref).requires_grad_(False), load_tokenizer(settings.ref), sampling)
    reward_fn = reward_from_specs(list(settings.reward))
    data = load_data(settings.prompts, data_config, tokenizer=tokenizer)
    prompts = [row["prompt"] for row in data.rows]
    seed = recipe_config.seed
    if resume:
        run = run_dir
        if main_rank:
            runs.clear_failed(run)
    else:
        run = run_dir
        if main_rank:
            try:
                initial = draw_samples(policy, reward_fn, prompts, settings, seed, 0)
            except RewardError as exc:  # a broken reward, found before the run directory exists
                raise ValueError(str(exc)) from exc
            run = runs.create_run(run_dir, config, initial)
    distributed.barrier()
    policy.model = distributed.wrap_ddp(distributed.replicate(policy.model))  # the same model in one process

    optimizer = build_optimizer(recipe_config.optimizer, policy.parameters(), recipe_config.lr)
    if checkpoint is not None:
        state, tensors = runs.load_trainer_state(checkpoint)
        runs.restore_optimizer(optimizer, state, tensors)
        runs.restore_rng(state, tensors)
        if main_rank:
            print(f"# resuming from {checkpoint} (step {start} of {recipe_config.steps})", flush=True)
    tracker = runs.open_tracker(settings.tracker if main_rank else "none", run, config)
    steps = recipe_config.steps
    last_saved = {"step": start if checkpoint is not None else -1}
    stop_signal: dict[str, Any] = {"signal": None}

    def save(step: int) -> None:
        if last_saved["step"] != step:
            if main_rank:  # replicated weights and optimizer state: rank 0's copy is everyone's
                runs.save_checkpoint(run, step, distributed.unwrap(policy.model), tokenizer, optimizer,
                                     keep=settings.keep_checkpoints, extra={"recipe": config["recipe"]})
            distributed.barrier()
            last_saved["step"] = step

    def on_signal(signum, frame):
        if stop_signal["signal"] is not None:  # a second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop_signal["signal"] = signum
        print(f"\n# {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    bar = tqdm(total=steps, initial=start, unit="step", desc=f"train {config['recipe']}", file=sys.stderr, dynamic_ncols=True,
               disable=not main_rank)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        done = step + 1  # updates done; the row describes the update that produced the policy of step `done`
        if ctrl["reward"] is not None:  # "reward" is the CTRL reward the recipe optimised; add the raw r and C
            raw_sum, calibrated_sum, count = distributed.all_sum(ctrl["reward"].take_sums())  # over every rank's samples
            metrics = {**metrics, "reward_raw": raw_sum / count, "reward_calibrated": calibrated_sum / count}
        if main_rank:  # metrics are already aggregated over ranks by the recipe
            runs.append_jsonl(run / "metrics.jsonl", {"step": done, **metrics})
            tracker.log(done, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3g}", kl=f"{metrics['kl_ref']:.3g}", refresh=False)
            bar.update()
        if main_rank and ((settings.sample_every and done % settings.sample_every == 0) or done == steps):
            for row in draw_samples(policy, reward_fn, prompts, settings, seed, done):
                runs.append_jsonl(run / "samples.jsonl", row)
        if (settings.checkpoint_every and done % settings.checkpoint_every == 0) or done == steps:
            save(done)
        if stop_signal["signal"] is not None:
            save(done)
            raise Stop(done)

    ctrl: dict[str, Any] = {"reward": None}
    previous = {s: signal.signal(s, on_signal) for s in EXIT_SIGNAL}
    try:
        train_reward = reward_fn
        if calibration.active:  # CTRL: the recipe trains on Phi(C); samples.jsonl keeps the raw reward
            if main_rank:
                bar.clear()  # the calibration's lines go above the progress bar, not onto it
            ctrl["reward"], source = calibrated_reward_for_run(
                run, calibration, calibration_fingerprint(settings, sampling), ref, reward_fn, prompts, main_rank=main_rank)
            train_reward = ctrl["reward"]
            if main_rank:
                cal_set = ctrl["reward"].calibration
                print(f"# calibration: {source}: m = {cal_set.samples_per_prompt} reference samples for each of "
                      f"{len(cal_set.prompts)} prompts ({run / CALIBRATION_FILE})\n# training on {calibration.describe()}", flush=True)
            if stop_signal["signal"] is not None:  # stopped while calibrating: the calibration is saved, no step taken
                bar.close()
                print(f"# stopped by {signal.Signals(stop_signal['signal']).name} after the calibration, before step {start + 1}\n"
                      f"# continue with: tilt train {config['recipe']} --resume {run}", file=sys.stderr, flush=True)
                return EXIT_SIGNAL[stop_signal["signal"]]
        kl_rl.train(recipe_config, policy, ref, train_reward, prompts, optimizer=optimizer, start_step=start, on_step=on_step)
    except Stop as stop:
        bar.close()
        name = signal.Signals(stop_signal["signal"]).name
        print(f"# stopped by {name} after step {stop.args[0]} of {steps}; checkpoint saved in "
              f"{run / runs.CHECKPOINTS / runs.checkpoint_name(stop.args[0])}\n"
              f"# continue with: tilt train {config['recipe']} --resume {run}", file=sys.stderr, flush=True)
        return EXIT_SIGNAL[stop_signal["signal"]]
    except Exception as exc:  # noqa: BLE001 - any error during training marks the run failed, then is reported
        bar.close()
        done = runs.latest_checkpoint(run)
        where = f"its checkpoints up to {done.name} are intact" if done is not None else "it has no checkpoint yet"
        message = f"{type(exc).__name__}: {exc}"
        runs.mark_failed(run, message)
        print(f"tilt: error: {message}\n# the run {run} is marked failed ({run / runs.FAILED}); {where}. "
              f"Fix the cause, then: tilt train {config['recipe']} --resume {run}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        tracker.close()
    bar.close()
    if start >= steps and last_saved["step"] != steps:
        save(steps)
    if not main_rank:
        distributed.shutdown()
        return 0
    final = runs.save_final(run, distributed.unwrap(policy.model), tokenizer)
    distributed.shutdown()
    rows = runs.read_jsonl(run / "metrics.jsonl")
    if rows:
        from tilt.report import show_divergence

        last = rows[-1]
        kl = show_divergence(last["kl_ref"], estimator="k1 on the step's samples")
        if calibration.active:
            print(f"# step {last['step']}: reward {last['reward']:.4f} ({calibration.describe()}), raw reward "
                  f"{last['reward_raw']:.4f}, mean C {last['reward_calibrated']:.4f}, KL to ref {kl}")
        else:
            print(f"# step {last['step']}: reward {last['reward']:.4f}, KL to ref {kl}")
    print(f"# run directory: {run}\n# trained policy: {final}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tilt.cli.train kl-rl ...``: the same as ``tilt train kl-rl ...``."""
    parser = argparse.ArgumentParser(prog="tilt")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
