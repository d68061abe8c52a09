"""Every TRL dataset shape in every file type: `tilt data check` infers the right format, and the rows read the
same from every file type (nothing is silently mis-read); CSV chats; identical pairs; the context check."""
from __future__ import annotations

import argparse
import json
import string
import warnings

import pytest

from tilt.data import DataConfig, DataError, check_context, load_data, model_context_length

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731

# name -> (rows, inferred format, conversational, the normalised first row without a tokenizer)
SHAPES = {
    "prompt-only": ([{"prompt": "the sky is"}, {"prompt": "water is"}], "prompts", False, {"prompt": "the sky is"}),
    "prompt-only chat": ([{"prompt": [U("hi")]}, {"prompt": [U("yo")]}], "prompts", True, {"prompt": [U("hi")]}),
    "prompt-completion": ([{"prompt": "the sky is", "completion": " blue"}, {"prompt": "x", "completion": " y"}],
                          "demonstrations", False, {"prompt": "the sky is", "completion": " blue"}),
    "prompt-completion chat": ([{"prompt": [U("hi")], "completion": [A("hello")]}] * 2, "demonstrations", True,
                               {"prompt": [U("hi")], "completion": "hello"}),
    "preference": ([{"prompt": "the sky is", "chosen": " blue", "rejected": " green"}] * 2, "preferences", False,
                   {"prompt": "the sky is", "chosen": " blue", "rejected": " green"}),
    "preference chat": ([{"prompt": [U("sky?")], "chosen": [A("blue")], "rejected": [A("green")]}] * 2, "preferences", True,
                        {"prompt": [U("sky?")], "chosen": "blue", "rejected": "green"}),
    "implicit preference": ([{"chosen": "the sky is blue.", "rejected": "the sky is green."},
                             {"chosen": "i like cats", "rejected": "i like cars"}], "preferences", False,
                            {"prompt": "the sky is", "chosen": " blue.", "rejected": " green."}),
    "implicit preference chat": ([{"chosen": [U("sky?"), A("blue")], "rejected": [U("sky?"), A("green")]}] * 2,
                                 "preferences", True, {"prompt": [U("sky?")], "chosen": "blue", "rejected": "green"}),
    "unpaired preference": ([{"prompt": "the sky is", "completion": " blue", "label": True},
                             {"prompt": "the sky is", "completion": " green", "label": False}], "unpaired_preferences",
                            False, {"prompt": "the sky is", "completion": " blue", "label": True}),
    "unpaired preference chat": ([{"prompt": [U("sky?")], "completion": [A("blue")], "label": True},
                                  {"prompt": [U("sky?")], "completion": [A("red")], "label": False}],
                                 "unpaired_preferences", True, {"prompt": [U("sky?")], "completion": "blue", "label": True}),
    "language modeling": ([{"text": "the sky is blue."}, {"text": "water is wet."}], "language_modeling", False,
                          {"text": "the sky is blue."}),
    "language modeling chat": ([{"messages": [U("hi"), A("hello")]}] * 2, "conversations", True,
                               {"prompt": [U("hi")], "completion": "hello"}),
}
FILE_TYPES = ["jsonl", "json", "csv", "csv-python-literal", "parquet"]
FOLDER_TYPES = ["dataset", "datasetdict"]


def write(tmp_path, kind: str, rows: list[dict]):
    """``rows`` written as ``kind``; returns (path, extra CLI arguments)."""
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows, indent=1))
    elif kind.startswith("csv"):
        import csv

        path = tmp_path / "d.csv"
        as_text = repr if kind == "csv-python-literal" else json.dumps
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: as_text(v) if isinstance(v, list) else v for k, v in r.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        path = tmp_path / "folder"
        ds = datasets.Dataset.from_list(rows)
        if kind == "datasetdict":
            other = datasets.Dataset.from_list([{"unrelated": 1}])
            datasets.DatasetDict({"train": other, "test": ds}).save_to_disk(str(path))
            return path, ["--split", "test"]
        ds.save_to_disk(str(path))
    return path, []


def run_cli(argv, capsys):
    from tilt.cli import data as data_cli

    parser = argparse.ArgumentParser(prog="tilt")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.run(args)
    return code, capsys.readouterr().out


def check_shape(tmp_path, capsys, kind: str, shape: str):
    rows, fmt, chat, first = SHAPES[shape]
    path, extra = write(tmp_path, kind, rows)
    code, out = run_cli(["data", "check", str(path), "--json"] + extra, capsys)
    report = json.loads(out)
    assert code == 0, (shape, kind, report)
    assert (report["format"], report["inferred"], report["conversational"], report["rows"]) == (fmt, True, chat, len(rows))
    code, text = run_cli(["data", "check", str(path)] + extra, capsys)
    assert code == 0 and f"{len(rows)} rows ok in {path}: {fmt} (inferred), " in text
    data = load_data(path, DataConfig(split=extra[1] if extra else None))
    # The same normalised rows whatever the file type: a chat is never read as its text
    assert {k: v for k, v in data.rows[0].items()} == first, (shape, kind)
    assert data.fmt == fmt and data.conversational == chat


@pytest.mark.parametrize("kind", FILE_TYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_in_every_file_type_is_inferred_and_read_alike(tmp_path, capsys, kind, shape):
    check_shape(tmp_path, capsys, kind, shape)


@pytest.mark.slow
@pytest.mark.parametrize("kind", FOLDER_TYPES)
def test_every_shape_from_saved_datasets_and_their_splits(tmp_path, capsys, kind):
    for i, shape in enumerate(SHAPES):
        (tmp_path / str(i)).mkdir()
        check_shape(tmp_path / str(i), capsys, kind, shape)


def test_shapes_that_do_not_fit_fail_with_a_named_reason(tmp_path, capsys):
    path, _ = write(tmp_path, "jsonl", [{"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}])
    code, out = run_cli(["data", "check", str(path)], capsys)
    assert code == 1 and "stepwise-supervision" in out
    path, _ = write(tmp_path, "jsonl", [{"question": "p", "answer": "a"}])
    code, out = run_cli(["data", "check", str(path)], capsys)
    assert code == 1 and "row 1: field '(row)': cannot tell the shape of a row with the columns question, answer" in out
    # a chat that does not end with the assistant: not a conversation, but language-modelling data
    path, _ = write(tmp_path, "jsonl", [{"messages": [U("hi")]}])
    code, out = run_cli(["data", "check", str(path)], capsys)
    assert code == 1 and "--format language_modeling" in out
    code, out = run_cli(["data", "check", str(path), "--format", "language_modeling", "--json"], capsys)
    assert code == 0 and json.loads(out)["conversational"] is True
    # an unpaired preference read as demonstrations would imitate its rejected completions
    path, _ = write(tmp_path, "csv", SHAPES["unpaired preference"][0])
    code, out = run_cli(["data", "check", str(path), "--format", "demonstrations"], capsys)
    assert code == 1 and "row 1: field 'label': a prompt-completion row with a true/false label is an unpaired preference" in out
    # rows whose shapes disagree with the first row's
    path, _ = write(tmp_path, "jsonl", [{"prompt": "a"}, {"prompt": "b", "chosen": "c", "rejected": "d"}, {"prompt": "e"}])
    code, out = run_cli(["data", "check", str(path)], capsys)
    assert code == 1 and out.startswith("row 2: field '(row)': its columns (prompt, chosen, rejected) do not make a prompts row")
    # chat and plain text mixed
    path, _ = write(tmp_path, "jsonl", [{"prompt": "a"}, {"prompt": [U("b")]}])
    code, out = run_cli(["data", "check", str(path)], capsys)
    assert code == 1 and "row 2: field '(row)': is conversational but row 1 is plain text" in out
    # an implicit text prompt needs shared words
    path, _ = write(tmp_path, "jsonl", [{"chosen": "yes", "rejected": "no"}])
    code, out = run_cli(["data", "check", str(path)], capsys)
    assert code == 1 and "row 1: field 'prompt': missing, and chosen and rejected share no words" in out


def test_csv_chat_cells_are_parsed_or_rejected_never_kept_as_text(tmp_path):
    path = tmp_path / "chats.csv"
    path.write_text('prompt,topic\n"[{""role"": ""user"", ""content"": ""hi""}]",a\n'
                    "\"[{'role': 'user', 'content': 'yo'}]\",b\n"
                    "\"[{'role': 'user', 'content': 'broken'\",c\n"
                    "\"[INST] plain text that starts with a bracket\",d\n")
    with pytest.raises(DataError) as e:
        load_data(path)
    assert [(p.row, p.field) for p in e.value.problems] == [(3, "prompt"), (4, "(row)")]
    assert "looks like a list of chat messages written as text, but is neither JSON" in e.value.problems[0].problem
    path.write_text('prompt,topic\n"[{""role"": ""user"", ""content"": ""hi""}]",a\n'
                    "\"[{'role': 'user', 'content': 'yo'}]\",b\n")
    data = load_data(path)
    assert [r["prompt"] for r in data.rows] == [[U("hi")], [U("yo")]] and data.conversational
    path.write_text("prompt\n[INST] text that starts with a bracket\n")
    assert load_data(path).rows[0]["prompt"] == "[INST] text that starts with a bracket"


def test_csv_never_evaluates_code(tmp_path):
    path = tmp_path / "evil.csv"
    marker = tmp_path / "ran"
    path.write_text(f"prompt\n\"[{{'role': 'user', 'content': __import__('pathlib').Path('{marker}').touch()}}]\"\n")
    with pytest.raises(DataError, match="neither JSON"):
        load_data(path)
    assert not marker.exists()


def test_identical_pairs_are_counted_and_warned(tmp_path, capsys):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " a"}, {"prompt": "p", "chosen": " a", "rejected": " b"},
            {"chosen": [U("q"), A("same")], "rejected": [U("q"), A("same")]}]
    path, _ = write(tmp_path, "jsonl", rows[:2])
    with pytest.warns(UserWarning, match="1 of 2 preference pairs .* have chosen == rejected"):
        data = load_data(path)
    assert data.n_identical_pairs == 1 and len(data.rows) == 2
    code, out = run_cli(["data", "check", str(path)], capsys)
    assert code == 0 and "warning: 1 of 2 preference pairs" in out
    path, _ = write(tmp_path, "jsonl", rows[2:])
    with pytest.warns(UserWarning):
        assert load_data(path).n_identical_pairs == 1
    path, _ = write(tmp_path, "jsonl", rows[1:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_data(path).n_identical_pairs == 0


# --- the context check --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from tilt.engine.tiny import char_tokenizer

    return char_tokenizer(string.ascii_lowercase + " .,!?")  # one token per character, no BOS


def test_context_length_comes_from_a_sane_source():
    from types import SimpleNamespace as NS

    assert model_context_length(NS(max_position_embeddings=64), NS(model_max_length=int(1e30))) == (64, "config.max_position_embeddings")
    assert model_context_length(NS(max_position_embeddings=64), NS(model_max_length=32)) == (32, "tokenizer.model_max_length")
    assert model_context_length(NS(), NS(model_max_length=int(1e30))) is None
    from transformers import GPT2Config

    assert model_context_length(GPT2Config(n_positions=24), None) == (24, "config.max_position_embeddings")


def test_over_long_prompts_are_named_before_anything_runs(tmp_path, tok):
    prompts = ["a" * 10, "b" * 13, "c" * 12]
    # 10 + 4 <= 16; 13 + 4 = 17 > 16; 12 + 4 = 16 fits
    with pytest.raises(DataError) as e:
        check_context(prompts, tok, max_new_tokens=4, context_length=16, path="p.jsonl")
    assert [p.row for p in e.value.problems] == [2]
    assert "13 prompt tokens + 4 (max_new_tokens) = 17, over the model's context of 16 tokens" in str(e.value)
    assert check_context(prompts, tok, max_new_tokens=3, context_length=16) == 13
    # preferences: the budget of a row is its longest reply plus EOS
    path, _ = write(tmp_path, "jsonl", [{"prompt": "aaaa", "chosen": " bb", "rejected": " c"},
                                        {"prompt": "aaaa", "chosen": " bbbbbbbb", "rejected": " c"}])
    data = load_data(path)
    with pytest.raises(DataError) as e:  # row 2: 4 + (9 + 1) = 14 > 12; row 1: 4 + 4 = 8
        check_context(data, tok, max_new_tokens=None, context_length=12, path=str(path))
    assert [p.row for p in e.value.problems] == [2] and "4 prompt tokens + 10 (its longest reply) = 14" in str(e.value)


def test_cli_checks_the_context_of_a_model(tmp_path, capsys, tok):
    from transformers import GPT2Config

    folder = tmp_path / "model"
    GPT2Config(n_positions=16, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    path, _ = write(tmp_path, "jsonl", [{"prompt": "a" * 10}, {"prompt": "b" * 13}])
    code, out = run_cli(["data", "check", str(path), "--model", str(folder), "--max-new-tokens", "4"], capsys)
    assert code == 1 and out.startswith("row 2: field 'prompt': 13 prompt tokens + 4 (max_new_tokens) = 17, over the "
                                        "model's context (config.max_position_embeddings) of 16 tokens")
    code, out = run_cli(["data", "check", str(path), "--model", str(folder), "--max-new-tokens", "3"], capsys)
    assert code == 0 and "the longest prompt has 13 tokens; every prompt + 3 new tokens fits in 16" in out
    code, out = run_cli(["data", "check", str(path), "--tokenizer", str(folder), "--context-length", "12", "--json"], capsys)
    assert code == 1 and {e["row"] for e in json.loads(out)["errors"]} == {2}
    with pytest.raises(ValueError, match="need a tokenizer to count tokens"):
        run_cli(["data", "check", str(path), "--max-new-tokens", "3"], capsys)
    code, out = run_cli(["data", "check", str(path), "--tokenizer", str(folder), "--max-new-tokens", "3"], capsys)
    assert code == 0 and "context: not checked" in out  # the character tokenizer sets no model_max_length
