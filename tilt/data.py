"""Training data: reading files into rows, checking every row before training, and the standard shapes.

Files: JSON Lines (``.jsonl``, ``.ndjson``, ``.json`` holding JSON Lines or one JSON array), CSV (``.csv``),
Parquet (``.parquet``) and a folder written by ``datasets.Dataset.save_to_disk``. Each is read into a list of
dict rows; the *row number* in every message is 1-based and counts data rows (for JSON Lines it is the line
number, blank lines included; for CSV the header is not a row).

Text files are read as bytes and decoded row by row (undecodable bytes kept as lone surrogates), so that a row
with invalid UTF-8 is reported by its number and field instead of failing the whole file.

The standard shapes (``fmt``), with the columns each row needs:

===============  ======================================================================================
prompts          ``prompt`` (text, or a list of chat messages), or ``messages`` (the whole chat is the prompt)
demonstrations   ``prompt`` and ``completion`` (text, or messages), or ``messages`` ending with an assistant turn
preferences      ``prompt``, ``chosen``, ``rejected``; or ``chosen`` and ``rejected`` as whole chats that share
                 their turns up to a final assistant turn (the shared turns are the prompt)
conversations    ``messages``: a chat ending with an assistant turn (prompt = the turns before it)
===============  ======================================================================================

A chat message is ``{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": str}``. With a
tokenizer, chat prompts are rendered with its chat template (``add_generation_prompt=True``) and completions
become the final assistant turn's text; without one, a chat prompt stays a list of messages.

Checked rows come out *normalised*: ``prompt`` (str, or messages without a tokenizer) and, by shape,
``completion`` or ``chosen``/``rejected`` (str); every other column of the row is kept unchanged, so that it
reaches a reward as ``f(prompts, completions, **columns)``.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

FORMATS = ("prompts", "demonstrations", "preferences", "conversations")
OVERLONG = ("error", "truncate", "skip")
ROLES = ("system", "developer", "user", "assistant", "tool")
_TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")
_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape leaves for an undecodable byte


# --- problems ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with one row: its 1-based number, the field (dotted path into the row) and the problem."""

    row: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"row {self.row}, field {self.field!r}: {self.problem}"


class DataError(ValueError):
    """Rows that failed the checks; ``problems`` holds every one, the message shows the first few."""

    def __init__(self, path: str, problems: Sequence[RowProblem], n_rows: int, shown: int = 20):
        self.path = path
        self.n_rows = n_rows
        self.problems = tuple(problems)
        bad_rows = len({p.row for p in self.problems})
        lines = [f"{bad_rows} of {n_rows} rows of {path} are not valid:"]
        lines += [f"  {p}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"  ... and {len(self.problems) - shown} more problems (`tilt data check` lists them all)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class DataConfig:
    """How data files are read and checked."""

    fmt: str = field(default="prompts", metadata={"help": "the shape of each row: prompts, demonstrations, preferences or conversations"})
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "token budget of a prompt (as the policy encodes it); None = no limit. Needs a tokenizer"})
    overlong: str = field(
        default="error", metadata={"help": "a prompt over the budget: 'error' (the row is bad), 'truncate' (keep its last "
                                            "max_prompt_tokens tokens) or 'skip' (drop the row); truncated/skipped rows are counted"})
    split: str | None = field(default=None, metadata={"help": "split of a saved DatasetDict folder; None = its only split, or 'train'"})

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {self.fmt!r}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}; got {self.overlong!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be a positive number of tokens or None; got {self.max_prompt_tokens}")


@dataclass(frozen=True)
class Data:
    """Checked, normalised rows and what happened to the others."""

    rows: list[dict]
    fmt: str
    n_read: int  # rows in the file
    n_truncated: int  # prompts cut from the left to fit max_prompt_tokens
    n_skipped: int  # rows dropped for an over-long prompt (overlong="skip")
    row_numbers: list[int]  # the 1-based file row of each kept row


# --- reading -----------------------------------------------------------------------------------------------------
class _Unreadable:
    """A row that could not be parsed at all (bad JSON, not an object)."""

    def __init__(self, problem: str):
        self.problem = problem


def read_rows(path: str | Path, *, split: str | None = None) -> list[tuple[int, Any]]:
    """The rows of a file or saved-dataset folder, in order, as (1-based row number, row): a dict, or an
    ``_Unreadable`` marker for a row that could not be parsed (reported by ``check_rows``). Raises
    FileNotFoundError naming a missing path."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {str(path)!r}")
    if p.is_dir():
        return _read_saved_dataset(p, split)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _read_json(p.read_bytes(), array_allowed=suffix == ".json")
    if suffix == ".csv":
        return _read_csv(p.read_bytes())
    if suffix in (".parquet", ".pq"):
        pq = _optional("pyarrow.parquet", "reading Parquet")

        return list(enumerate(pq.read_table(p).to_pylist(), start=1))
    raise ValueError(f"cannot tell the format of {str(path)!r} from its suffix {suffix!r}: use .jsonl, .json, .csv, "
                     ".parquet, or a folder written by datasets' save_to_disk")


def _read_json(data: bytes, *, array_allowed: bool) -> list[tuple[int, Any]]:
    """JSON Lines; or, where ``array_allowed``, one JSON array of objects (rows numbered by position)."""
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    items = None
    if array_allowed and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None  # not one array: read it as JSON Lines, whose first row is then reported
    if isinstance(items, list):
        return list(enumerate((item if isinstance(item, dict) else _Unreadable(f"expected a JSON object, got {_type(item)}")
                               for item in items), start=1))
    rows: list[Any] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():  # blank lines are not rows, but still count as lines
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            bad = " (the line holds invalid UTF-8)" if _BAD_BYTES.search(line) else ""
            rows.append((number, _Unreadable(f"not valid JSON{bad}: {exc.msg} at column {exc.colno}")))
            continue
        rows.append((number, item if isinstance(item, dict) else _Unreadable(f"expected a JSON object, got {_type(item)}")))
    return rows


def _read_csv(data: bytes) -> list[tuple[int, Any]]:
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return []
    rows: list[Any] = []
    for number, values in enumerate(reader, start=1):
        if len(values) != len(header):
            rows.append((number, _Unreadable(f"has {len(values)} cells, the header has {len(header)} ({', '.join(header)})")))
            continue
        rows.append((number, dict(zip(header, values))))
    return rows


def _read_saved_dataset(folder: Path, split: str | None) -> list[tuple[int, Any]]:
    datasets = _optional("datasets", "reading a save_to_disk folder")
    try:
        ds = datasets.load_from_disk(str(folder))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{str(folder)!r} is a folder but not a dataset written by save_to_disk: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            split = names[0] if len(names) == 1 else "train" if "train" in names else None
            if split is None:
                raise ValueError(f"{str(folder)!r} holds the splits {', '.join(names)}: choose one with split")
        if split not in ds:
            raise ValueError(f"{str(folder)!r} has no split {split!r}; it holds {', '.join(names)}")
        ds = ds[split]
    elif split is not None:
        raise ValueError(f"{str(folder)!r} holds a single dataset, not splits; leave split unset")
    return list(enumerate(ds.to_list(), start=1))


def _optional(module: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs the {module.split('.')[0]} package: pip install 'tilt[data]'") from None


# --- checking one value ------------------------------------------------------------------------------------------
def _type(x: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "text", list: "a list",
            dict: "an object"}.get(type(x), type(x).__name__)


def _fields(row: dict) -> str:
    names = [str(k) for k in row]
    return "no fields" if not names else ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def _as_text(value: Any) -> tuple[str | None, str | None]:
    """(text, None) or (None, problem): a string with no undecodable bytes (bytes are decoded as UTF-8)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return None, f"invalid UTF-8 (byte {exc.start} is 0x{value[exc.start]:02x})"
    if not isinstance(value, str):
        return None, f"expected text, got {_type(value)}"
    m = _BAD_BYTES.search(value)
    if m:
        return None, f"invalid UTF-8 (undecodable byte 0x{ord(m.group()) - 0xDC00:02x} at character {m.start()})"
    return value, None


def _check_text(row: dict, key: str, out: list[tuple[str, str]], *, path: str | None = None) -> str | None:
    path = path or key
    if key not in row:
        out.append((path, f"missing; expected non-empty text (the row has {_fields(row)})"))
        return None
    text, problem = _as_text(row[key])
    if problem:
        out.append((path, problem))
        return None
    if not text.strip():
        out.append((path, f"empty; expected non-empty text, got {text!r}"))
        return None
    return text


def _check_messages(value: Any, name: str, out: list[tuple[str, str]]) -> list[dict] | None:
    """A validated copy of a chat, or None (problems appended)."""
    if not isinstance(value, list):
        out.append((name, f"expected a list of chat messages {{role, content}}, got {_type(value)}"))
        return None
    if not value:
        out.append((name, "empty; expected at least one chat message"))
        return None
    messages, ok = [], True
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            out.append((where, f"expected a message {{role, content}}, got {_type(msg)}"))
            ok = False
            continue
        role = msg.get("role")
        if role not in ROLES:
            out.append((f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}" if "role" in msg else "missing"))
            ok = False
        if "content" not in msg:
            out.append((f"{where}.content", "missing; expected text"))
            ok = False
            continue
        text, problem = _as_text(msg["content"])
        if problem:
            out.append((f"{where}.content", problem))
            ok = False
            continue
        messages.append({**msg, "content": text})
    return messages if ok else None


def _split_final_assistant(messages: list[dict], name: str, out: list[tuple[str, str]]) -> tuple[list[dict], str] | None:
    """(the turns before the final assistant turn, its text), or None if the chat does not end with one."""
    if not any(m["role"] == "assistant" for m in messages):
        out.append((name, "no assistant turn; expected the chat to end with the assistant's reply"))
        return None
    if messages[-1]["role"] != "assistant":
        out.append((f"{name}[{len(messages) - 1}].role", f"expected the last turn to be 'assistant', got {messages[-1]['role']!r}"))
        return None
    if len(messages) < 2:
        out.append((name, "only an assistant turn; expected at least one turn before it to prompt it"))
        return None
    if not messages[-1]["content"].strip():
        out.append((f"{name}[{len(messages) - 1}].content", "empty; expected the assistant's reply"))
        return None
    return messages[:-1], messages[-1]["content"]


def _check_reply(row: dict, key: str, out: list[tuple[str, str]]) -> str | None:
    """A completion/chosen/rejected: text, or a list of messages whose last is the assistant's reply."""
    if isinstance(row.get(key), list):
        messages = _check_messages(row[key], key, out)
        if messages is None:
            return None
        if messages[-1]["role"] != "assistant":
            out.append((f"{key}[{len(messages) - 1}].role", "no assistant turn at the end; expected the assistant's reply"))
            return None
        if not messages[-1]["content"].strip():
            out.append((f"{key}[{len(messages) - 1}].content", "empty; expected the assistant's reply"))
            return None
        return messages[-1]["content"]
    return _check_text(row, key, out)


def _check_prompt(row: dict, out: list[tuple[str, str]]) -> str | list[dict] | None:
    if isinstance(row.get("prompt"), list):
        return _check_messages(row["prompt"], "prompt", out)
    return _check_text(row, "prompt", out)


# --- checking one row --------------------------------------------------------------------------------------------
def check_row(row: dict, fmt: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """The normalised row (see the module docstring) and a list of (field, problem) pairs, empty if the row is good."""
    out: list[tuple[str, str]] = []
    extra = {k: v for k, v in row.items() if k not in _TEXT_FIELDS and k != "messages"}
    if fmt == "prompts":
        if "prompt" not in row and "messages" in row:
            prompt = _check_messages(row["messages"], "messages", out)
        else:
            prompt = _check_prompt(row, out)
        return ({**extra, "prompt": prompt} if not out else None), out
    if fmt == "conversations" or (fmt == "demonstrations" and "prompt" not in row and "messages" in row):
        if "messages" not in row:
            out.append(("messages", f"missing; expected a list of chat messages {{role, content}} (the row has {_fields(row)})"))
            return None, out
        messages = _check_messages(row["messages"], "messages", out)
        split = _split_final_assistant(messages, "messages", out) if messages is not None else None
        if split is None:
            return None, out
        return {**extra, "prompt": split[0], "completion": split[1]}, out
    if fmt == "demonstrations":
        prompt = _check_prompt(row, out)
        completion = _check_reply(row, "completion", out)
        return ({**extra, "prompt": prompt, "completion": completion} if not out else None), out
    if fmt == "preferences":
        if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
            return _check_implicit_preference(row, extra, out)
        prompt = _check_prompt(row, out)
        chosen = _check_reply(row, "chosen", out)
        rejected = _check_reply(row, "rejected", out)
        return ({**extra, "prompt": prompt, "chosen": chosen, "rejected": rejected} if not out else None), out
    raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def _check_implicit_preference(row: dict, extra: dict, out: list[tuple[str, str]]) -> tuple[dict | None, list]:
    chosen = _check_messages(row["chosen"], "chosen", out)
    rejected = _check_messages(row["rejected"], "rejected", out)
    c = _split_final_assistant(chosen, "chosen", out) if chosen is not None else None
    r = _split_final_assistant(rejected, "rejected", out) if rejected is not None else None
    if c is None or r is None:
        return None, out
    if [(m["role"], m["content"]) for m in c[0]] != [(m["role"], m["content"]) for m in r[0]]:
        out.append(("rejected", "its turns before the final reply differ from chosen's; expected the same prompt"))
        return None, out
    return {**extra, "prompt": c[0], "chosen": c[1], "rejected": r[1]}, out


# --- chat templates and the token budget -------------------------------------------------------------------------
def render_prompt(messages: list[dict], tokenizer) -> str:
    """A chat prompt as text, with the tokenizer's chat template and the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, so chat rows cannot be rendered; use a tokenizer with "
                         "one (an instruct model's) or give prompts as text")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_length(prompt: str, tokenizer) -> int:
    """Tokens of a prompt as the policy encodes it (``add_special_tokens=True``, as tilt.engine.hf does)."""
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def truncate_left(prompt: str, tokenizer, max_tokens: int) -> str:
    """The longest suffix of ``prompt``, on token boundaries, that encodes to at most ``max_tokens`` tokens
    (special tokens the tokenizer adds included). Decoding and re-encoding can merge tokens differently at the
    cut, so the cut moves right until the re-encoded text fits."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_special = prompt_length(prompt, tokenizer) - len(ids)
    keep = max_tokens - n_special
    while keep > 0:
        text = tokenizer.decode(ids[len(ids) - keep:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if prompt_length(text, tokenizer) <= max_tokens:
            return text
        keep -= 1
    return ""


def check_rows(rows: Sequence[tuple[int, Any]], config: DataConfig, *, tokenizer=None, path: str = "the data") -> Data:
    """Check and normalise every (row number, row) pair from ``read_rows``; raise DataError listing every bad
    row, or return the Data.

    With a tokenizer, chat prompts are rendered to text; with ``max_prompt_tokens`` too, prompts over the
    budget are handled as ``config.overlong`` says (the budget needs a tokenizer).
    """
    if config.max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("max_prompt_tokens needs a tokenizer to count tokens; give one (--tokenizer PATH)")
    problems: list[RowProblem] = []
    kept: list[dict] = []
    numbers: list[int] = []
    n_truncated = n_skipped = 0
    for number, row in rows:
        if isinstance(row, _Unreadable):
            problems.append(RowProblem(number, "(row)", row.problem))
            continue
        if not isinstance(row, dict):
            problems.append(RowProblem(number, "(row)", f"expected an object with named fields, got {_type(row)}"))
            continue
        clean, found = check_row(row, config.fmt)
        if found:
            problems += [RowProblem(number, f, p) for f, p in found]
            continue
        if tokenizer is not None and isinstance(clean["prompt"], list):
            clean = {**clean, "messages": clean["prompt"], "prompt": render_prompt(clean["prompt"], tokenizer)}
        if config.max_prompt_tokens is not None:
            n = prompt_length(clean["prompt"], tokenizer)
            if n > config.max_prompt_tokens:
                if config.overlong == "error":
                    problems.append(RowProblem(number, "prompt", f"{n} tokens, over the budget of {config.max_prompt_tokens} "
                                                                  "(max_prompt_tokens); shorten it, or truncate or skip over-long prompts"))
                    continue
                if config.overlong == "skip":
                    n_skipped += 1
                    continue
                cut = truncate_left(clean["prompt"], tokenizer, config.max_prompt_tokens)
                if not cut.strip():
                    problems.append(RowProblem(number, "prompt", f"nothing is left after truncating its {n} tokens to "
                                                                  f"{config.max_prompt_tokens}; raise max_prompt_tokens"))
                    continue
                clean = {**clean, "prompt": cut}
                n_truncated += 1
        kept.append(clean)
        numbers.append(number)
    if problems:
        raise DataError(path, problems, len(rows))
    return Data(rows=kept, fmt=config.fmt, n_read=len(rows), n_truncated=n_truncated, n_skipped=n_skipped, row_numbers=numbers)


def load_data(path: str | Path, config: DataConfig = DataConfig(), *, tokenizer=None) -> Data:
    """Read ``path`` and check every row (see ``check_rows``). Raises FileNotFoundError for a missing path,
    DataError (a ValueError) listing every bad row."""
    rows = read_rows(path, split=config.split)
    if not rows:
        raise ValueError(f"{str(path)!r} holds no rows")
    return check_rows(rows, config, tokenizer=tokenizer, path=str(path))
