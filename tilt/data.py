"""Training data: reading files into rows, checking every row before training, and the standard shapes.

Files: JSON Lines (``.jsonl``, ``.ndjson``, ``.json`` holding JSON Lines or one JSON array), CSV (``.csv``),
Parquet (``.parquet``) and a folder written by ``datasets.Dataset.save_to_disk``. Each is read into a list of
dict rows; the *row number* in every message is 1-based and counts data rows (for JSON Lines it is the line
number, blank lines included; for CSV the header is not a row).

Text files are read as bytes and decoded row by row (undecodable bytes kept as lone surrogates), so that a row
with invalid UTF-8 is reported by its number and field instead of failing the whole file.

The shapes (``fmt``), with the columns each row needs, and TRL's name for each:

====================  ===================================================================  ========================
prompts               ``prompt`` (text, or a list of chat messages), or ``messages``        prompt-only
                      (the whole chat is the prompt)
demonstrations        ``prompt`` and ``completion``, or ``messages`` ending with an         prompt-completion
                      assistant turn
preferences           ``prompt``, ``chosen``, ``rejected``; or only ``chosen`` and          preference (explicit or
                      ``rejected`` sharing a prefix (text) or their turns up to a final     implicit prompt)
                      assistant turn (chats): the shared part is the prompt
unpaired_preferences  ``prompt``, ``completion`` and ``label`` (a bool)                     unpaired preference
conversations         ``messages``: a chat ending with an assistant turn                    language modeling
                      (prompt = the turns before it)                                        (conversational)
language_modeling     ``text``, or ``messages`` (any chat)                                  language modeling
====================  ===================================================================  ========================

With ``fmt=None`` the shape is inferred from each row's columns (``infer_format``); every row must agree with
the first, and ``Data.fmt``/``Data.shape`` say what was found. Each shape is *conversational* when its prompt
or replies are chats, *standard* when they are text.

A chat message is ``{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": str}``. A chat written as
text in a cell (CSV has no lists; ``"[{'role': 'user', ...}]"``) is parsed as JSON or as a Python literal
(``ast.literal_eval``, never ``eval``), or reported as a bad row: it is never kept as text. With a tokenizer, chat
prompts are rendered with its chat template (``add_generation_prompt=True``) and completions become the final
assistant turn's text; without one, a chat prompt stays a list of messages.

Checked rows come out *normalised*: ``prompt`` (str, or messages without a tokenizer) and, by shape,
``completion``, ``chosen``/``rejected``, ``completion``/``label``, or ``text``/``messages``; every other column of
the row is kept unchanged, so that it reaches a reward as a keyword argument (``reward_columns``).

Before a run, ``check_context`` compares each prompt's tokens plus the completion budget with the model's context
(``model_context_length``) and names the rows that do not fit.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

FORMATS = ("prompts", "demonstrations", "preferences", "unpaired_preferences", "conversations", "language_modeling")
OVERLONG = ("error", "truncate", "skip")
ROLES = ("system", "developer", "user", "assistant", "tool")
_CHAT_FIELDS = frozenset(("prompt", "completion", "chosen", "rejected", "messages"))  # may hold a list of messages;
# the same fields are never passed to a reward as columns (reward_columns)
_LOOKS_LIKE_CHAT = re.compile(r"^\s*\[\s*\{")  # a list of objects written as text
_SANE_CONTEXT = 1 << 24  # tokenizers without a limit report ~1e30 as model_max_length
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

    fmt: str | None = field(default=None, metadata={
        "help": "the shape of each row: prompts, demonstrations, preferences, unpaired_preferences, conversations or "
                "language_modeling; None = inferred from the columns (every row must agree)"})
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "token budget of a prompt (as the policy encodes it); None = no limit. Needs a tokenizer"})
    overlong: str = field(
        default="error", metadata={"help": "a prompt over the budget: 'error' (the row is bad), 'truncate' (keep its last "
                                            "max_prompt_tokens tokens) or 'skip' (drop the row); truncated/skipped rows are counted"})
    split: str | None = field(default=None, metadata={"help": "split of a saved DatasetDict folder; None = its only split, or 'train'"})

    def __post_init__(self):
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)} (or None to infer it); got {self.fmt!r}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}; got {self.overlong!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be a positive number of tokens or None; got {self.max_prompt_tokens}")


@dataclass(frozen=True)
class Data:
    """Checked, normalised rows and what happened to the others."""

    rows: list[dict]
    fmt: str  # the shape the rows were checked as (given, or inferred)
    n_read: int  # rows in the file
    n_truncated: int  # prompts cut from the left to fit max_prompt_tokens
    n_skipped: int  # rows dropped for an over-long prompt (overlong="skip")
    row_numbers: list[int]  # the 1-based file row of each kept row
    inferred: bool = False  # True when fmt was inferred from the columns
    shape: str = ""  # TRL's name of the shape found, e.g. "preference (implicit prompt), conversational"
    conversational: bool = False  # True when the prompts or replies are chats
    n_identical_pairs: int = 0  # preference rows whose chosen and rejected are the same
    warnings: tuple[str, ...] = ()  # things worth telling the user that do not stop a run


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


# --- shapes ------------------------------------------------------------------------------------------------------
def infer_format(row: dict) -> str:
    """The shape a row's columns name (TRL's conventions, see the module docstring). Raises ValueError for columns
    that name no shape tilt reads."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "preferences"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired_preferences"
    if {"prompt", "completion"} <= keys:
        return "demonstrations"
    if {"prompt", "completions", "labels"} <= keys:
        raise ValueError("the columns prompt, completions, labels are TRL's stepwise-supervision shape, which no tilt "
                         "recipe reads; give one completion per row (prompt, completion)")
    if "prompt" in keys:
        return "prompts"
    if "messages" in keys:
        return "conversations"
    if "text" in keys:
        return "language_modeling"
    raise ValueError(f"cannot tell the shape of a row with the columns {_fields(row)}: expected prompt (prompt-only), "
                     "prompt + completion, prompt + chosen + rejected, chosen + rejected (implicit prompt), prompt + "
                     "completion + label (unpaired preference), messages, or text; or give the format")


def _shape_name(fmt: str, row: dict, conversational: bool) -> str:
    """TRL's name of a row's shape, e.g. "preference (implicit prompt), conversational"."""
    name = {"prompts": "prompt-only", "demonstrations": "prompt-completion", "unpaired_preferences": "unpaired preference",
            "conversations": "language modeling (chat ending with the assistant's reply)",
            "language_modeling": "language modeling"}.get(fmt)
    if fmt == "preferences":
        name = "preference (explicit prompt)" if "prompt" in row else "preference (implicit prompt)"
    if fmt in ("prompts", "demonstrations") and "prompt" not in row and "messages" in row:
        name += " (from messages)"
    return f"{name}, {'conversational' if conversational else 'standard'}"


def reward_columns(row: dict) -> dict:
    """The columns of a normalised row that a reward receives by keyword: all but prompt, completion, chosen,
    rejected and messages (TRL passes every dataset column but the prompt and completion)."""
    return {k: v for k, v in row.items() if k not in _CHAT_FIELDS}


def _decode_cell(value: Any, name: str, out: list[tuple[str, str]]) -> Any:
    """A chat written as text (a CSV cell) parsed back into a list: as JSON, else as a Python literal
    (``ast.literal_eval``, which evaluates no code). Text that does not look like a list of objects is returned as
    it is; text that does but parses neither way is a problem, never a prompt."""
    if not isinstance(value, str) or not _LOOKS_LIKE_CHAT.match(value):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as json_exc:
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            out.append((name, f"looks like a list of chat messages written as text, but is neither JSON ({json_exc.msg} "
                              f"at column {json_exc.colno}) nor a Python literal ({type(exc).__name__}); write it as "
                              "JSON, or use JSON Lines or Parquet, which hold lists"))
            return None


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _check_label(row: dict, out: list[tuple[str, str]]) -> bool | None:
    """An unpaired preference's label: a bool (CSV text true/false/1/0, numbers 1/0 accepted)."""
    if "label" not in row:
        out.append(("label", f"missing; expected true (a desirable completion) or false (the row has {_fields(row)})"))
        return None
    v = row["label"]
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    out.append(("label", f"expected true or false, got {v!r}"))
    return None


def _common_prompt(chosen: str, rejected: str) -> str:
    """The prompt two texts share: their common prefix, cut back to its last whitespace so that the replies start
    at a word (TRL's extract_prompt cuts at the first differing character instead; the two agree when the texts
    differ at the start of a word). The whitespace goes with the replies."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if n == len(chosen) == len(rejected):  # identical texts: the prompt is all but the last word
        n = len(chosen) - 1
    cut = max((i for i in range(n) if chosen[i].isspace()), default=0)
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return chosen[:cut]


# --- checking one row --------------------------------------------------------------------------------------------
def check_row(row: dict, fmt: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """The normalised row (see the module docstring) and a list of (field, problem) pairs, empty if the row is good."""
    out: list[tuple[str, str]] = []
    row = {k: (_decode_cell(v, k, out) if k in _CHAT_FIELDS else v) for k, v in row.items()}
    if out:
        return None, out
    extra = {k: v for k, v in row.items() if k not in _CHAT_FIELDS}
    if fmt == "prompts":
        if "prompt" not in row and "messages" in row:
            prompt = _check_messages(row["messages"], "messages", out)
        elif "prompt" not in row and "chosen" in row and "rejected" in row:
            clean, out = _check_preference(row, extra, out)
            return ({**extra, "prompt": clean["prompt"]} if clean else None), out
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
            if messages is not None:
                out.append(("messages", "(a chat that does not end with the assistant's reply is language-modelling "
                                        "data: check it with --format language_modeling)"))
            return None, out
        return {**extra, "prompt": split[0], "completion": split[1]}, out
    if fmt == "demonstrations":
        if "label" in row and _check_label(row, []) is not None:
            out.append(("label", "a prompt-completion row with a true/false label is an unpaired preference: training "
                                 "on it as a demonstration would imitate the undesirable completions too; drop the label "
                                 "column, keep only the true rows, or use --format unpaired_preferences"))
            return None, out
        prompt = _check_prompt(row, out)
        completion = _check_reply(row, "completion", out)
        return ({**extra, "prompt": prompt, "completion": completion} if not out else None), out
    if fmt == "unpaired_preferences":
        prompt = _check_prompt(row, out)
        completion = _check_reply(row, "completion", out)
        label = _check_label(row, out)
        return ({**extra, "prompt": prompt, "completion": completion, "label": label} if not out else None), out
    if fmt == "preferences":
        return _check_preference(row, extra, out)
    if fmt == "language_modeling":
        if "messages" in row and "text" not in row:
            messages = _check_messages(row["messages"], "messages", out)
            return ({**extra, "messages": messages} if not out else None), out
        text = _check_text(row, "text", out)
        return ({**extra, "text": text} if not out else None), out
    raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def _check_preference(row: dict, extra: dict, out: list[tuple[str, str]]) -> tuple[dict | None, list]:
    if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        return _check_implicit_preference(row, extra, out)
    if "prompt" not in row and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
        chosen, rejected = _check_text(row, "chosen", out), _check_text(row, "rejected", out)
        if out:
            return None, out
        prompt = _common_prompt(chosen, rejected)
        if not prompt.strip():
            out.append(("prompt", "missing, and chosen and rejected share no words at their start to take as the prompt "
                                  "(an implicit prompt): give a prompt column, or write chosen and rejected as prompt + reply"))
            return None, out
        return {**extra, "prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}, out
    prompt = _check_prompt(row, out)
    chosen = _check_reply(row, "chosen", out)
    rejected = _check_reply(row, "rejected", out)
    return ({**extra, "prompt": prompt, "chosen": chosen, "rejected": rejected} if not out else None), out


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

    With ``config.fmt`` None the shape is inferred from the first row that can be read, and a row whose columns
    name another shape is a bad row (say which format to use). With a tokenizer, chat prompts are rendered to text;
    with ``max_prompt_tokens`` too, prompts over the budget are handled as ``config.overlong`` says (the budget
    needs a tokenizer). Preference rows whose chosen and rejected are the same are kept, counted and warned about
    (their DPO loss is log 2 whatever the policy: they teach nothing).
    """
    if config.max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("max_prompt_tokens needs a tokenizer to count tokens; give one (--tokenizer PATH)")
    fmt, first = config.fmt, None
    if fmt is None:
        first = next(((n, r) for n, r in rows if isinstance(r, dict)), None)
        if first is None:
            raise DataError(path, [RowProblem(n, "(row)", r.problem if isinstance(r, _Unreadable) else "not an object")
                                   for n, r in rows], len(rows))
        try:
            fmt = infer_format(first[1])
        except ValueError as exc:
            raise DataError(path, [RowProblem(first[0], "(row)", str(exc))], len(rows)) from None
    problems: list[RowProblem] = []
    kept: list[dict] = []
    numbers: list[int] = []
    n_truncated = n_skipped = n_identical = 0
    conversational = False
    shape = ""
    for number, row in rows:
        if isinstance(row, _Unreadable):
            problems.append(RowProblem(number, "(row)", row.problem))
            continue
        if not isinstance(row, dict):
            problems.append(RowProblem(number, "(row)", f"expected an object with named fields, got {_type(row)}"))
            continue
        if config.fmt is None:
            try:
                own = infer_format(row)
            except ValueError as exc:
                own = str(exc)
            if own != fmt:
                problems.append(RowProblem(number, "(row)", f"its columns ({_fields(row)}) do not make a {fmt} row, the "
                                                            f"shape inferred from row {first[0]} ({_fields(first[1])}); "
                                                            "make every row the same shape, or give the format"))
                continue
        clean, found = check_row(row, fmt)
        if found:
            problems += [RowProblem(number, f, p) for f, p in found]
            continue
        chat = isinstance(clean.get("prompt"), list) or isinstance(clean.get("messages"), list) or any(
            isinstance(row.get(k), list) for k in _CHAT_FIELDS)
        if not kept:
            conversational, shape = chat, _shape_name(fmt, row, chat)
        elif chat != conversational:
            problems.append(RowProblem(number, "(row)", f"is {'conversational' if chat else 'plain text'} but row "
                                                        f"{numbers[0]} is {'conversational' if conversational else 'plain text'}: "
                                                        "write every row the same way"))
            continue
        if fmt == "preferences" and clean["chosen"] == clean["rejected"]:
            n_identical += 1
        if tokenizer is not None and isinstance(clean.get("prompt"), list):
            clean = {**clean, "messages": clean["prompt"], "prompt": render_prompt(clean["prompt"], tokenizer)}
        if config.max_prompt_tokens is not None and "prompt" in clean:
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
    notes = []
    if n_identical:
        notes.append(f"{n_identical} of {len(kept)} preference pairs in {path} have chosen == rejected: their loss is "
                     "log 2 whatever the policy does, so they teach nothing; remove them or fix the labels")
    return Data(rows=kept, fmt=fmt, n_read=len(rows), n_truncated=n_truncated, n_skipped=n_skipped, row_numbers=numbers,
                inferred=config.fmt is None, shape=shape, conversational=conversational, n_identical_pairs=n_identical,
                warnings=tuple(notes))


def load_data(path: str | Path, config: DataConfig = DataConfig(), *, tokenizer=None) -> Data:
    """Read ``path`` and check every row (see ``check_rows``); the format is inferred when ``config.fmt`` is None.
    Each of ``Data.warnings`` is also issued as a Python warning. Raises FileNotFoundError for a missing path,
    DataError (a ValueError) listing every bad row."""
    rows = read_rows(path, split=config.split)
    if not rows:
        raise ValueError(f"{str(path)!r} holds no rows")
    data = check_rows(rows, config, tokenizer=tokenizer, path=str(path))
    for note in data.warnings:
        warnings.warn(note, stacklevel=2)
    return data


# --- the model's context -----------------------------------------------------------------------------------------
def model_context_length(model_config=None, tokenizer=None) -> tuple[int, str] | None:
    """(the longest sequence the model takes, where that number comes from), or None when neither source gives a
    sane one. Sources: ``model_config.max_position_embeddings`` (GPT-2's ``n_positions`` through its alias) and
    ``tokenizer.model_max_length``; a value is sane when it is a positive int under 2**24 (tokenizers without a
    limit report about 1e30). With both, the smaller."""
    found = []
    limit = getattr(model_config, "max_position_embeddings", None) if model_config is not None else None
    if isinstance(limit, int) and 0 < limit < _SANE_CONTEXT:
        found.append((limit, "config.max_position_embeddings"))
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if isinstance(limit, int) and 0 < limit < _SANE_CONTEXT:
        found.append((limit, "tokenizer.model_max_length"))
    return min(found) if found else None


def _reply_tokens(text: str, tokenizer) -> int:
    """Tokens of a reply as it follows a prompt, plus its end-of-sequence token."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


def check_context(data_or_prompts: Data | Sequence[Any], tokenizer, *, max_new_tokens: int | None, context_length: int,
                  path: str = "the data", source: str = "the model's context") -> int:
    """Raise DataError naming every row whose prompt tokens plus its completion budget exceed ``context_length``,
    before anything runs (a model reading past its positions fails with an IndexError that names no row).

    ``data_or_prompts``: a ``Data`` (its rows and row numbers) or a sequence of prompts (rows numbered from 1).
    Prompt tokens are counted as the policy encodes them (``prompt_length``; chats rendered with the tokenizer's
    template). The budget of a row is ``max_new_tokens``; with ``max_new_tokens=None`` it is the row's own longest
    reply (completion, chosen or rejected) plus an EOS token, for recipes that score given replies instead of
    sampling. ``source`` says where ``context_length`` came from, for the message. Returns the longest prompt's
    token count.
    """
    if context_length is None or context_length < 1:
        raise ValueError(f"context_length must be a positive number of tokens; got {context_length!r}")
    if isinstance(data_or_prompts, Data):
        rows, numbers = data_or_prompts.rows, data_or_prompts.row_numbers
    else:
        rows, numbers = [{"prompt": p} for p in data_or_prompts], list(range(1, len(data_or_prompts) + 1))
    problems, longest = [], 0
    for number, row in zip(numbers, rows):
        prompt = row.get("prompt")
        if prompt is None:
            continue  # language-modelling rows have no prompt
        text = render_prompt(prompt, tokenizer) if isinstance(prompt, list) else prompt
        n = prompt_length(text, tokenizer)
        longest = max(longest, n)
        if max_new_tokens is None:
            replies = [row[k] for k in ("completion", "chosen", "rejected") if isinstance(row.get(k), str)]
            if not replies:
                raise ValueError(f"row {number} of {path} has no reply to measure: give max_new_tokens")
            budget, what = max(_reply_tokens(r, tokenizer) for r in replies), "its longest reply"
        else:
            budget, what = max_new_tokens, "max_new_tokens"
        if n + budget > context_length:
            problems.append(RowProblem(number, "prompt", f"{n} prompt tokens + {budget} ({what}) = {n + budget}, over "
                                                          f"{source} of {context_length} tokens; shorten the prompt, lower "
                                                          "max_new_tokens, or set max_prompt_tokens with overlong=truncate"))
    if problems:
        raise DataError(path, problems, len(rows))
    return longest
