"""``tilt train demo-rl | demo-rlhf`` (or ``python -m tilt.cli.pipelines demo-rl | demo-rlhf``): demonstration-regularised RL and
RLHF on Hugging Face causal LMs (Tiapkin et al. 2023; docs/demo_rl.md).

The config is a YAML file (top-level fields, and one mapping per section: bc, rl, sampling, eval, and for demo-rlhf
preferences and reward_model), with any field overridden on the command line: ``--model DIR``, ``--bc.steps 50``,
``--rl.beta 0.5`` (``--lam 0.5`` is the same). ``--run-dir DIR`` names the run directory; rerunning the same config
there, or ``--resume DIR``, skips the completed stages and resumes an interrupted one from its newest checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from tilt.cli.output import print_json, run_parsed, table


def _field_flags(pipeline: str) -> list[tuple[str, str | None, Any]]:
    """(flag name, section or None, dataclass field) for every settable field of a pipeline's config."""
    from tilt.pipelines.demo_rl import PIPELINES, SECTIONS

    out = []
    for f in fields(PIPELINES[pipeline]):
        if f.name in SECTIONS:
            out.extend((f"{f.name}.{g.name}", f.name, g) for g in fields(SECTIONS[f.name]))
        else:
            out.append((f.name, None, f))
    return out


def _parse(name: str, text: str, type_name: str) -> Any:
    """Command-line text as the field's type (``int``, ``float``, ``str``, ``bool``, optional ``X | None``)."""
    base = type_name.replace("| None", "").strip()
    if "None" in type_name and text.lower() in ("none", "null"):
        return None
    try:
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
    except ValueError:
        raise ValueError(f"--{name} must be {'an' if base == 'int' else 'a'} {base}; got {text!r}") from None
    return text


def add_pipeline_parser(sub, pipeline: str, prog_group: str) -> argparse.ArgumentParser:
    summary = {"demo-rl": "clone demonstrations, then KL-regularised RL toward the clone (lambda = rl.beta)",
               "demo-rlhf": "clone, preferences on clone samples, a Bradley-Terry reward model, then KL-regularised RL toward the clone"}[pipeline]
    p = sub.add_parser(pipeline, help=summary, description=f"{summary}.\n\n{__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"Example: tilt {prog_group} {pipeline} --config examples/demo_rl_tiny.yaml --run-dir runs/demo --lam 1.0\n"
                              f"         tilt {prog_group} {pipeline} --resume runs/demo")
    p.add_argument("--config", metavar="FILE.yaml", help="the pipeline config (YAML)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run with its own config.yaml: completed stages are skipped")
    p.add_argument("--run-dir", metavar="DIR", help="where the run is written (default: runs/<pipeline>-<date>-<time>)")
    p.add_argument("--json", action="store_true", help="print one JSON object: every stage's stage.json")
    p.add_argument("--lam", dest="cfg_rl.beta", metavar="FLOAT", default=argparse.SUPPRESS, help="lambda, the KL coefficient toward the clone (= --rl.beta)")
    groups: dict = {}
    for name, section, f in _field_flags(pipeline):
        group = groups.setdefault(section, p.add_argument_group(f"{section or 'top-level'} fields (override the config file)"))
        kwargs: dict[str, Any] = {"dest": f"cfg_{name}", "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if name == "reward":
            kwargs.update(nargs="+", metavar="SPEC")
        else:
            kwargs["metavar"] = str(f.type).replace(" | None", "").upper()
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])  # --kl_budget or --kl-budget
        group.add_argument(*flags, **kwargs)
    p.set_defaults(run=run_pipeline, pipeline=pipeline, prog_group=prog_group)
    return p


def add_train_parsers(train_sub) -> None:
    """Add ``demo-rl`` and ``demo-rlhf`` to the ``tilt train`` subparsers."""
    for pipeline in ("demo-rl", "demo-rlhf"):
        add_pipeline_parser(train_sub, pipeline, "train")


def add_parser(sub) -> None:
    """Add the ``tilt pipeline demo-rl | demo-rlhf`` command group."""
    p = sub.add_parser("pipeline", help="multi-stage training pipelines (demonstration-regularised RL and RLHF)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inner = p.add_subparsers(dest="pipeline_name", metavar="PIPELINE", required=True)
    for pipeline in ("demo-rl", "demo-rlhf"):
        add_pipeline_parser(inner, pipeline, "pipeline")


def resolve_config(pipeline: str, from_file: dict, overrides: dict[str, Any]):
    """The config: the file's values, then the command-line overrides (text, parsed by each field's type)."""
    from tilt.pipelines.demo_rl import config_from_dict

    data: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in from_file.items()}
    flags = {name: (section, f) for name, section, f in _field_flags(pipeline)}
    for name, value in overrides.items():
        section, f = flags[name]
        if section is None:
            data[name] = tuple(value) if name == "reward" else _parse(name, value, str(f.type))
        else:
            data.setdefault(section, {})
            if data[section] is None:
                data[section] = {}
            data[section][f.name] = _parse(name, value, str(f.type))
    return config_from_dict(pipeline, data)


def run_pipeline(args: argparse.Namespace) -> int:
    import time

    from transformers.utils import logging as hf_logging

    from tilt.runs import directory as runs
    from tilt.cli.train import load_yaml
    from tilt.pipelines.demo_rl import run_demo_rl, run_demo_rlhf

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the reward model's new scalar head is expected to be missing from the backbone
    overrides = {k[len("cfg_"):]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    if args.resume:
        if args.config or args.run_dir or overrides:
            raise ValueError("--resume continues a run with its own config.yaml: drop --config, --run-dir and field overrides")
        run_dir = Path(args.resume)
        config = resolve_config(args.pipeline, runs.read_config(run_dir), {})
    else:
        if not args.config and not overrides:
            raise ValueError("give a pipeline config with --config FILE.yaml (see examples/demo_rl_tiny.yaml)")
        config = resolve_config(args.pipeline, load_yaml(args.config) if args.config else {}, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{args.pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.json:
        print(f"# tilt {args.prog_group} {args.pipeline}: run directory {run_dir}", flush=True)
    run = run_demo_rlhf if args.pipeline == "demo-rlhf" else run_demo_rl
    result = run(config, run_dir)
    if args.json:
        print_json(result)
        return 0
    if result["skipped"]:
        print(f"# skipped (already complete): {', '.join(result['skipped'])}")
    rows = []
    for stage, marker in result["stages"].items():
        for key, value in marker.items():
            if key == "stage" or key.endswith("_ci"):
                continue
            ci = marker.get(f"{key}_ci")
            rows.append([stage, key, value, "-" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"])
    print(table(["stage", "metric", "value", "interval"], rows))
    print(f"# trained policy: {Path(result['run_dir']) / 'stages' / 'rl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tilt.cli.pipelines demo-rl ...``: the same as ``tilt train demo-rl ...``."""
    parser = argparse.ArgumentParser(prog="tilt")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(["pipeline", *(sys.argv[1:] if argv is None else argv)])
    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
