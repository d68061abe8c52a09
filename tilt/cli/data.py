"""tilt data check: validate a data file before training on it.

Reads the file (JSON Lines, CSV, Parquet, or a folder written by datasets' save_to_disk), checks every row
against the chosen shape and, with a tokenizer, the prompt token budget. Exits 0 and prints the number of rows
when all are good; otherwise exits 1 and prints one line per bad row: its number (1-based), the field and
the problem. A missing file exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tilt.cli.output import print_json
from tilt.data import FORMATS, OVERLONG, DataConfig, DataError, load_data


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="check training data files", description="Work with training data files.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser(
        "check",
        help="validate a data file: exit 0 with the row count, or list every bad row",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Shapes: prompts {prompt}; demonstrations {prompt, completion} or {messages}; preferences {prompt, chosen, "
        "rejected}; conversations {messages: [{role, content}, ...]} ending with an assistant turn. A prompt, completion, "
        "chosen or rejected may also be a list of chat messages. Example: tilt data check train.jsonl --format preferences",
    )
    p.add_argument("file", metavar="FILE", help="a .jsonl, .json, .csv or .parquet file, or a save_to_disk folder")
    p.add_argument("--format", dest="fmt", choices=FORMATS, required=True, help="the shape every row must have")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="a local tokenizer folder: renders chat rows with its chat template and counts prompt tokens")
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def run_check(args) -> int:
    config = DataConfig(fmt=args.fmt, max_prompt_tokens=args.max_prompt_tokens, overlong=args.overlong, split=args.split)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    try:
        data = load_data(args.file, config, tokenizer=tokenizer)
    except ImportError as exc:  # an optional reader (pyarrow, datasets) is not installed
        print(f"tilt: error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        by_row: dict[int, list[str]] = {}
        for p in exc.problems:
            by_row.setdefault(p.row, []).append(f"field {p.field!r}: {p.problem}")
        if args.json:
            print_json({"ok": False, "file": args.file, "format": args.fmt, "bad_rows": len(by_row),
                        "errors": [{"row": p.row, "field": p.field, "problem": p.problem} for p in exc.problems]})
        else:
            for row, problems in by_row.items():
                print(f"row {row}: " + "; ".join(problems))
            print(f"{_count(len(by_row), 'bad row')} of {_count(exc.n_rows, 'row')} in {args.file} ({args.fmt})")
        return 1
    if args.json:
        print_json({"ok": True, "file": args.file, "format": args.fmt, "rows": len(data.rows), "read": data.n_read,
                    "truncated": data.n_truncated, "skipped": data.n_skipped})
    else:
        extra = ""
        if config.max_prompt_tokens is not None:
            extra = (f"; {_count(data.n_truncated, 'prompt')} truncated, {_count(data.n_skipped, 'row')} skipped "
                     f"(budget {config.max_prompt_tokens} tokens)")
        print(f"{_count(len(data.rows), 'row')} ok in {args.file} ({args.fmt}){extra}")
    return 0
