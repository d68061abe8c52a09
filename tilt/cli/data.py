"""tilt data check: validate a data file before training on it.

Reads the file (JSON Lines, JSON, CSV, Parquet, or a folder written by datasets' save_to_disk), infers its shape
from the columns unless --format is given, and checks every row against it; with a tokenizer, the prompt token
budget; with a model (or --context-length), that every prompt plus --max-new-tokens fits the model's context.
Exits 0 and prints the number of rows and the format when all are good (warnings, such as preference pairs with
chosen == rejected, on their own lines); otherwise exits 1 and prints one line per bad row: its number
(1-based), the field and the problem. A missing file exits 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from tilt.cli.output import print_json
from tilt.data import FORMATS, OVERLONG, DataConfig, DataError, check_context, load_data, model_context_length


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="check training data files", description="Work with training data files.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser(
        "check",
        help="validate a data file: exit 0 with the row count and format, or list every bad row",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Shapes (TRL's): prompts {prompt}; demonstrations {prompt, completion} or {messages}; preferences {prompt, "
        "chosen, rejected} or {chosen, rejected} sharing a prompt; unpaired_preferences {prompt, completion, label}; "
        "conversations {messages} ending with an assistant turn; language_modeling {text} or {messages}. A prompt, "
        "completion, chosen or rejected may also be a list of chat messages. Example: tilt data check train.jsonl",
    )
    p.add_argument("file", metavar="FILE", help="a .jsonl, .json, .csv or .parquet file, or a save_to_disk folder")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default=None,
                   help="the shape every row must have (default: inferred from the columns)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="a local tokenizer folder: renders chat rows with its chat template and counts prompt tokens")
    p.add_argument("--model", metavar="SPEC", default=None,
                   help="a model (folder or 'embedded'): its config gives the context length, and its tokenizer is used "
                        "unless --tokenizer is given. No weights are loaded")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=None,
                   help="completion budget for the context check (default: 0 for prompts, each row's longest reply "
                        "for rows that carry replies)")
    p.add_argument("--context-length", type=int, metavar="N", default=None,
                   help="the model's context in tokens (default: from --model's config or the tokenizer)")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N", default=None,
                   help="token budget of a prompt, as the policy encodes it (needs --tokenizer)")
    p.add_argument("--overlong", choices=OVERLONG, default="error",
                   help="a prompt over the budget: error (a bad row; default), truncate (keep its last N tokens) or skip it")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict folder (default: its only split, or train)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_check)


def load_tokenizer(path: str):
    """A tokenizer from a local folder, without running code shipped with it."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path!r}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _model_config(spec: str):
    """A model's config (no weights), from a folder or 'embedded', without running code shipped with it."""
    from transformers import AutoConfig

    from tilt.engine.loading import resolve_model_path

    folder = resolve_model_path(spec)
    return folder, AutoConfig.from_pretrained(folder, trust_remote_code=False)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _report_errors(args, exc: DataError, fmt: str) -> int:
    by_row: dict[int, list[str]] = {}
    for p in exc.problems:
        by_row.setdefault(p.row, []).append(f"field {p.field!r}: {p.problem}")
    if args.json:
        print_json({"ok": False, "file": args.file, "format": fmt, "bad_rows": len(by_row),
                    "errors": [{"row": p.row, "field": p.field, "problem": p.problem} for p in exc.problems]})
    else:
        for row, problems in by_row.items():
            print(f"row {row}: " + "; ".join(problems))
        print(f"{_count(len(by_row), 'bad row')} of {_count(exc.n_rows, 'row')} in {args.file} ({fmt})")
    return 1


def run_check(args) -> int:
    config = DataConfig(fmt=args.fmt, max_prompt_tokens=args.max_prompt_tokens, overlong=args.overlong, split=args.split)
    model_config, tokenizer = None, None
    if args.model:
        folder, model_config = _model_config(args.model)
        tokenizer = load_tokenizer(args.tokenizer or folder)
    elif args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    if (args.context_length is not None or args.max_new_tokens is not None) and tokenizer is None:
        raise ValueError("--context-length and --max-new-tokens need a tokenizer to count tokens: give --tokenizer or --model")
    try:
        with warnings.catch_warnings():  # printed below, once, with the result
            warnings.simplefilter("ignore")
            data = load_data(args.file, config, tokenizer=tokenizer)
    except ImportError as exc:  # an optional reader (pyarrow, datasets) is not installed
        print(f"tilt: error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        return _report_errors(args, exc, args.fmt or "format inferred")
    context = None
    if tokenizer is not None:
        context = ((args.context_length, "--context-length") if args.context_length is not None
                   else model_context_length(model_config, tokenizer))
    longest = None
    if context is not None and data.fmt != "language_modeling":
        budget = args.max_new_tokens
        if budget is None and data.fmt in ("prompts",):
            budget = 0
        try:
            longest = check_context(data, tokenizer, max_new_tokens=budget, context_length=context[0], path=args.file,
                                    source=f"the model's context ({context[1]})")
        except DataError as exc:
            return _report_errors(args, exc, data.fmt)
    fmt = data.fmt + (" (inferred)" if data.inferred else "")
    if args.json:
        print_json({"ok": True, "file": args.file, "format": data.fmt, "inferred": data.inferred, "shape": data.shape,
                    "conversational": data.conversational, "rows": len(data.rows), "read": data.n_read,
                    "truncated": data.n_truncated, "skipped": data.n_skipped, "identical_pairs": data.n_identical_pairs,
                    "context_length": context[0] if context else None, "longest_prompt_tokens": longest,
                    "warnings": list(data.warnings)})
        return 0
    extra = ""
    if config.max_prompt_tokens is not None:
        extra = (f"; {_count(data.n_truncated, 'prompt')} truncated, {_count(data.n_skipped, 'row')} skipped "
                 f"(budget {config.max_prompt_tokens} tokens)")
    print(f"{_count(len(data.rows), 'row')} ok in {args.file}: {fmt}, {data.shape}{extra}")
    if longest is not None:
        budget = "each row's longest reply" if args.max_new_tokens is None and data.fmt != "prompts" else \
            f"{args.max_new_tokens or 0} new tokens"
        print(f"context: the longest prompt has {longest} tokens; every prompt + {budget} fits in {context[0]} "
              f"({context[1]})")
    elif args.max_new_tokens is not None:
        print("context: not checked (no context length known: the tokenizer sets no sane model_max_length; give --model "
              "or --context-length)")
    for note in data.warnings:
        print(f"warning: {note}")
    return 0
