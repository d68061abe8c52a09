"""``tilt train COMMAND``: train from a YAML config, in a run directory that survives (docs/runs.md).

One config shape for every command (tilt.runs.config): a ``run:`` section (model, ref, reward, data files, device,
dtype, checkpointing, tracker), a ``lora:`` section, the recipe's own section and its sampling/data/eval sections.
Flags are the same fields, dotted (``--sampling.max_new_tokens 32``) or bare where one section has the name
(``--beta 0.1``); YAML values and flag text get the same typed coercion. The resolved config is printed and saved as
RUN/config.yaml; ``--resume RUN`` reads it back and may change only the steps, the checkpoint cadence and the
tracker (other changes need ``--accept-changes FIELD,...``); the changes are written back to RUN/config.yaml.

Stopping: SIGTERM or Ctrl-C finishes the current step, saves a checkpoint, prints the exact resume command and exits
with 143 (SIGTERM) or 130 (SIGINT); a second Ctrl-C stops at once. Errors: bad input (config keys and values,
model and data paths, a reward that fails on the first samples) exits 2 before the run directory exists; an error
during training marks the run failed (RUN/FAILED) and exits 1, its checkpoints intact for ``--resume``.
``--json`` prints one JSON object (the summary) on stdout; logs go to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from tilt.cli.output import print_json
from tilt.runs.loop import EXIT_FAILED, EXIT_SIGNAL  # noqa: F401 - the exit codes of tilt train

SUMMARIES = {
    "kl-rl": "KL-regularised RL (REINFORCE with a leave-one-out baseline, or PPO-clip) toward pi* ∝ pi_ref exp(r/beta)",
    "dpo": "offline DPO (sigmoid or IPO loss) on a preferences file, against a reference scored once",
    "online-dpo": "online DPO: fresh pairs from the policy (or policy and reference) each step, labelled by a reward-based oracle",
    "xpo": "XPO: online DPO with pairs (policy, reference) and the exploration bonus alpha * log pi(y~) on the reference sample",
    "reward-model": "a Bradley-Terry reward model (scalar head on a causal-LM backbone) from a preferences file, with held-out accuracy",
    "demo-rl": "clone demonstrations, then KL-regularised RL toward the clone (lambda = rl.beta)",
    "demo-rlhf": "clone, preferences on clone samples, a Bradley-Terry reward model, then KL-regularised RL toward the clone",
    "bond": "Jeffreys BOND: distil best-of-N of the reference by a mix of forward KL (SFT on best-of-N) and backward KL (vBoN)",
    "bonbon": "BoNBoN: SFT on best-of-N reference samples plus an IPO loss on (best, worst)-of-N pairs",
    "apo": "A*-PO: least squares of beta log(pi/pi_ref) onto r - V*, V* estimated once from reference samples",
    "qrpo": "QRPO: least squares onto the calibrated (quantile) reward, whose normaliser is known in closed form",
}
EXAMPLES = {"kl-rl": "examples/kl_rl_tiny.yaml --steps 20 --beta 0.1", "dpo": "examples/dpo_tiny.yaml",
            "online-dpo": "examples/xpo_tiny.yaml", "xpo": "examples/xpo_tiny.yaml",
            "reward-model": "examples/reward_model_tiny.yaml", "demo-rl": "examples/demo_rl_tiny.yaml",
            "demo-rlhf": "examples/demo_rl_tiny.yaml", "bond": "examples/bond_tiny.yaml",
            "bonbon": "examples/bonbon_tiny.yaml", "apo": "examples/apo_tiny.yaml", "qrpo": "examples/qrpo_tiny.yaml"}
RESUMABLE = ("run.checkpoint_every", "run.keep_checkpoints", "run.sample_every", "run.tracker")
"""Run fields ``--resume`` may change (with the recipe's ``steps``): none alters the steps already taken."""


def add_parser(sub, argv: list[str] | None = None) -> None:
    """Add ``tilt train``; with ``argv``, only the named command's parser is built in full (its help reads every
    config class's source), the others by name."""
    train = sub.add_parser("train", help="train a model from a YAML config, in a run directory you can stop and resume",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_sub = train.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    named = [t for t in (argv or []) if t in SUMMARIES]
    for command in SUMMARIES:
        if argv is None or (named and named[0] == command):
            add_command_parser(train_sub, command)
        else:
            train_sub.add_parser(command, help=SUMMARIES[command])


def add_command_parser(train_sub, command: str) -> argparse.ArgumentParser:
    from tilt.runs.config import fields_help

    summary = SUMMARIES[command]
    p = train_sub.add_parser(
        command, help=summary, description=f"{summary}.\n\n{__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog=f"Example: tilt train {command} --config {EXAMPLES[command]}\n"
               f"         tilt train {command} --resume runs/my-run            (continue a stopped run)\n\n"
               f"Config fields (YAML sections, or flags overriding the file):\n{fields_help(command)}")
    p.add_argument("--config", metavar="FILE.yaml", help="the run config (YAML); relative paths in it resolve against its folder")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint, with its own config.yaml")
    p.add_argument("--accept-changes", metavar="FIELD,...", default="",
                   help="with --resume: config fields you change on purpose beyond steps, checkpointing and tracker")
    p.add_argument("--run-dir", metavar="DIR", help="where the run is written (default: runs/<command>-<date>-<time>)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the summary) on stdout; logs go to stderr")
    p.set_defaults(run=run_train, train_command=command, takes_fields=True)
    return p


def resumable(command: str) -> set[str]:
    """Dotted fields ``--resume`` may change for ``command``."""
    from tilt.runs.config import section_specs

    specs = section_specs(command)
    recipe = list(specs)[1]
    steps = {f"{recipe}.steps"} if "steps" in specs[recipe] else set()
    return set(RESUMABLE) | steps | ({"rl.steps", "bc.steps"} if command.startswith("demo") else set())


def resolve_for(args: argparse.Namespace) -> tuple[dict, Path, list[str]]:
    """(resolved config, run directory, flags a resume must repeat) from the command line."""
    from tilt.runs import config as cfg

    command = args.train_command
    flags = cfg.parse_flags(command, getattr(args, "fields", []))
    if args.resume:
        if args.config or args.run_dir:
            raise cfg.ConfigError("--resume continues a run with its own config.yaml in its own directory; drop --config and --run-dir")
        run_dir = Path(args.resume)
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        saved = cfg.load_yaml(saved_path)
        before = cfg.resolve(command, saved, {}, where=str(saved_path))
        accepted = {a.strip() for a in args.accept_changes.split(",") if a.strip()}
        index = cfg.key_index(command)
        accepted = {index.get(a.replace("-", "_"), a) for a in accepted}
        fixed = sorted(set(flags) - resumable(command) - accepted)
        if fixed:
            raise cfg.ConfigError(f"cannot change {', '.join(fixed)} when resuming (the run would no longer be one run); "
                                  f"--resume may change {', '.join(sorted(resumable(command)))}; to change others on "
                                  f"purpose add --accept-changes {','.join(fixed)}")
        config = cfg.resolve(command, saved, flags, where="command line")
        changed = cfg.changed_fields(before, config)
        repeat = [f"--{path} {_flag_text(config, path)}" for path in changed]
        return config, run_dir, repeat
    if not args.config and not flags:
        raise cfg.ConfigError(f"give a run config with --config FILE.yaml (see {EXAMPLES[command].split()[0]}), or set the fields on the command line")
    from_file = cfg.load_yaml(args.config) if args.config else {}
    base_dir = Path(args.config).resolve().parent if args.config else None
    config = cfg.resolve(command, from_file, flags, base_dir=base_dir, where=str(args.config or "command line"))
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config, run_dir, []


def _flag_text(config: dict, path: str) -> str:
    section, leaf = path.split(".", 1)
    value = config[section][leaf]
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def run_train(args: argparse.Namespace) -> int:
    from tilt.runs import config as cfg
    from tilt.runs.loop import Signals

    command = args.train_command
    config, run_dir, repeat = resolve_for(args)
    sections = cfg.build(config)  # every section checks its values before anything is loaded
    from tilt.runs.setup import quiet_transformers

    quiet_transformers()
    from tilt.runs import directory as runs

    print(f"# tilt train {command}: resolved config" + (f" (resuming {run_dir})" if args.resume else ""), file=sys.stderr)
    print(runs.dump_config(config), end="", file=sys.stderr, flush=True)
    with ExitStack() as stack, Signals() as signals:
        if args.resume:  # one writer at a time, for the whole run; then the inputs must be the run's own
            stack.enter_context(runs.lock_run(run_dir))
            check_inputs(command, run_dir, config, args.accept_changes, changed=[r.split()[0][2:] for r in repeat])
        if command.startswith("demo"):
            from tilt.pipelines.demo_rl import run_pipeline_command

            result = run_pipeline_command(config, sections, run_dir, resume=bool(args.resume), signals=signals, stack=stack)
        else:
            from tilt.runs.commands import ASSEMBLIES

            result = ASSEMBLIES[command](config, sections, run_dir, resume=bool(args.resume), signals=signals,
                                         resume_flags=repeat, stack=stack)
    if isinstance(result, int):
        return result
    if args.json:
        print_json(result)
    else:
        print_summary(result)
    return 0


def check_inputs(command: str, run_dir: Path, config: dict, accept_text: str, *, changed: list[str]) -> None:
    """On resume: refuse inputs that changed since the run started (config, data, model, reward source) unless
    ``--accept-changes`` names them or they are the changes ``--resume`` may make; then write the run's config and
    fingerprint as they are from now on."""
    from tilt.runs import config as cfg
    from tilt.runs import directory as runs
    from tilt.runs.setup import run_fingerprint

    index = cfg.key_index(command)
    accept = {f"config.{index[a.replace('-', '_')]}" if a.replace("-", "_") in index else a
              for a in (x.strip() for x in accept_text.split(",")) if a}
    accept |= {f"config.{path}" for path in changed}
    current = run_fingerprint(config)
    saved = runs.read_fingerprint(run_dir)
    if saved is not None:
        runs.check_fingerprint(saved, current, accept=accept)
    if changed or accept or saved is None:
        runs.write_atomic(run_dir / "config.yaml", runs.dump_config(config))
        runs.save_fingerprint(run_dir, current)


def print_summary(summary: dict) -> None:
    """The summary for people: a KL estimate that cannot be negative is shown clipped at 0 with its estimator and raw
    value (``tilt.report.show_divergence``); ``--json`` and summary.json keep the raw numbers."""
    from tilt.report import show_divergence

    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key.startswith("kl_") and isinstance(value, float):
            shown = show_divergence(value, estimator="k1")
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        elif isinstance(value, list) and all(isinstance(v, float) for v in value):
            shown = "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
        else:
            shown = str(value)
        print(f"# {key:<{width}}  {shown}")


def main(argv: list[str] | None = None) -> int:
    """``python -m tilt.cli.train train kl-rl ...``: the same as ``tilt train kl-rl ...``."""
    from tilt.cli import main as tilt_main

    return tilt_main(argv)


if __name__ == "__main__":
    sys.exit(main())
