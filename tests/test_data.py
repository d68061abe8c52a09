"""Data files and rewards: readers, shapes, the prompt budget, reward specs, and a fuzz test of the errors."""
from __future__ import annotations

import argparse
import json
import random
import string

import pytest
import torch

from tilt.data import DataConfig, DataError, check_rows, load_data, read_rows, truncate_left
from tilt.reward_fns import (LengthReward, RegexReward, VaderSentiment, keyword_reward, load_reward_model,
                             reward_from_spec, reward_from_specs, score_rewards_masked)
from tilt.rewards import RewardError

ALPHABET = string.ascii_lowercase + " .,!?:\n"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def tok():
    from tilt.engine.tiny import char_tokenizer

    t = char_tokenizer(ALPHABET)
    t.chat_template = TEMPLATE
    return t


def write_jsonl(path, rows, *, raw_lines=()):
    lines = [json.dumps(r).encode() for r in rows] + list(raw_lines)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def problems_of(exc_info) -> set[tuple[int, str]]:
    return {(p.row, p.field) for p in exc_info.value.problems}


# --- readers -----------------------------------------------------------------------------------------------------
ROWS = [{"prompt": "the film was", "completion": " great.", "topic": "film", "score": 3},
        {"prompt": "my day", "completion": " went well", "topic": "life", "score": 1}]


def test_every_reader_gives_the_same_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    pd = pytest.importorskip("pandas")

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
                         ).save_to_disk(str(tmp_path / "dd"))
    config = DataConfig(fmt="demonstrations")
    expected = load_data(tmp_path / "d.jsonl", config).rows
    assert expected == ROWS  # text rows come out as they went in, extra columns kept
    for name in ("d.json", "d.parquet", "ds", "dd"):
        assert load_data(tmp_path / name, config).rows == expected, name
    assert load_data(tmp_path / "dd", DataConfig(fmt="demonstrations", split="test")).rows == ROWS[:1]
    with pytest.raises(ValueError, match="no split 'valid'"):
        load_data(tmp_path / "dd", DataConfig(fmt="demonstrations", split="valid"))
    # CSV holds text only: the numeric column comes back as text
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    assert load_data(tmp_path / "d.csv", config).rows == [{**r, "score": str(r["score"])} for r in ROWS]


def test_jsonl_row_numbers_are_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": ""}\r\n{"prompt": "b"}\n')
    assert [n for n, _ in read_rows(path)] == [1, 3, 4]
    with pytest.raises(DataError) as e:
        load_data(path, DataConfig(fmt="prompts"))
    assert problems_of(e) == {(3, "prompt")}


def test_unknown_suffix_and_empty_file(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match="suffix '.txt'"):
        load_data(tmp_path / "d.txt")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_data(tmp_path / "e.jsonl")


# --- shapes ------------------------------------------------------------------------------------------------------
CHAT = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]


def test_chat_shapes_split_at_the_final_assistant_turn(tmp_path, tok):
    rows = [(1, {"messages": CHAT, "id": 7})]
    demo = check_rows(rows, DataConfig(fmt="demonstrations")).rows[0]
    assert demo == {"id": 7, "prompt": CHAT[:2], "completion": "hello!"}
    assert check_rows(rows, DataConfig(fmt="conversations")).rows == [demo]
    rendered = check_rows(rows, DataConfig(fmt="conversations"), tokenizer=tok).rows[0]
    assert rendered["prompt"] == "system: be kind\nuser: hi\nassistant: "
    assert rendered["completion"] == "hello!" and rendered["messages"] == CHAT[:2]
    # prompts: the whole chat is the prompt
    assert check_rows([(1, {"messages": CHAT[:2]})], DataConfig(fmt="prompts"), tokenizer=tok).rows[0]["prompt"] == \
        "system: be kind\nuser: hi\nassistant: "
    # preferences with an implicit prompt: the shared turns
    pref = {"chosen": CHAT, "rejected": CHAT[:2] + [{"role": "assistant", "content": "go away"}]}
    assert check_rows([(1, pref)], DataConfig(fmt="preferences")).rows[0] == {"prompt": CHAT[:2], "chosen": "hello!",
                                                                            "rejected": "go away"}
    # conversational prompt with replies as message lists (the other common layout)
    pref2 = {"prompt": CHAT[:2], "chosen": [CHAT[2]], "rejected": [{"role": "assistant", "content": "no"}]}
    assert check_rows([(1, pref2)], DataConfig(fmt="preferences")).rows[0] == {"prompt": CHAT[:2], "chosen": "hello!",
                                                                             "rejected": "no"}


def test_chat_without_template_is_a_clear_error(tok):
    from tilt.engine.tiny import char_tokenizer

    with pytest.raises(ValueError, match="no chat template"):
        check_rows([(1, {"messages": CHAT})], DataConfig(fmt="conversations"), tokenizer=char_tokenizer(ALPHABET))


# --- the prompt budget -------------------------------------------------------------------------------------------
def test_budget_truncates_from_the_left_skips_or_rejects(tok):
    rows = [(1, {"prompt": "abcdefghij"}), (2, {"prompt": "abc"}), (3, {"prompt": "klmnopq"})]
    kept = check_rows(rows, DataConfig(fmt="prompts", max_prompt_tokens=4, overlong="truncate"), tokenizer=tok)
    assert [r["prompt"] for r in kept.rows] == ["ghij", "abc", "nopq"]  # one token per character
    assert (kept.n_truncated, kept.n_skipped, kept.row_numbers) == (2, 0, [1, 2, 3])
    skipped = check_rows(rows, DataConfig(fmt="prompts", max_prompt_tokens=4, overlong="skip"), tokenizer=tok)
    assert [r["prompt"] for r in skipped.rows] == ["abc"] and skipped.n_skipped == 2 and skipped.row_numbers == [2]
    with pytest.raises(DataError) as e:
        check_rows(rows, DataConfig(fmt="prompts", max_prompt_tokens=4), tokenizer=tok)
    assert problems_of(e) == {(1, "prompt"), (3, "prompt")}
    assert "10 tokens, over the budget of 4" in str(e.value)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        check_rows(rows, DataConfig(fmt="prompts", max_prompt_tokens=4))
    # a budget of one token keeps "j" of row 1 but leaves nothing of a prompt that ends in spaces
    with pytest.raises(DataError) as e:
        check_rows([(1, {"prompt": "abcdefghij"}), (2, {"prompt": "abc  "})],
                   DataConfig(fmt="prompts", max_prompt_tokens=1, overlong="truncate"), tokenizer=tok)
    assert problems_of(e) == {(2, "prompt")} and "nothing is left" in str(e.value)


def test_budget_applies_to_the_rendered_chat(tok):
    rows = [(1, {"messages": CHAT})]
    rendered = "system: be kind\nuser: hi\nassistant: "
    out = check_rows(rows, DataConfig(fmt="conversations", max_prompt_tokens=12, overlong="truncate"), tokenizer=tok)
    assert out.rows[0]["prompt"] == rendered[-12:] and out.n_truncated == 1


def test_truncate_left_counts_added_special_tokens():
    """A tokenizer that adds a BOS token: the budget includes it, and the kept text re-encodes within it."""
    from tokenizers import processors

    from tilt.engine.tiny import char_tokenizer

    t = char_tokenizer(ALPHABET)
    t._tokenizer.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 1)])
    assert len(t("abcdef")["input_ids"]) == 7
    text = truncate_left("abcdef", t, 4)
    assert text == "def" and len(t(text)["input_ids"]) == 4


# --- the fuzz test -----------------------------------------------------------------------------------------------
GOOD = {
    "prompts": lambda r: {"prompt": f"tell me about {r.choice('abc')}"},
    "demonstrations": lambda r: {"prompt": "say", "completion": f" {r.choice('xyz')}"},
    "preferences": lambda r: {"prompt": "pick", "chosen": "yes", "rejected": "no"},
    "conversations": lambda r: {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
}
FIELDS = {"prompts": ["prompt"], "demonstrations": ["prompt", "completion"], "preferences": ["prompt", "chosen", "rejected"],
          "conversations": ["messages"]}
BAD_UTF8 = "\udcff"  # placeholder written out as the byte 0xff


def corrupt(row: dict, fmt: str, rng: random.Random) -> tuple[dict | str, str]:
    """A malformed version of a good row and the field its error must name."""
    kind = rng.choice(["missing", "mistyped", "empty", "utf8", "no_assistant", "role", "not_object"])
    if fmt == "conversations" and kind in ("missing", "mistyped", "empty", "utf8", "no_assistant", "role"):
        msgs = [dict(m) for m in row["messages"]]
        if kind == "missing":
            return {"other": 1}, "messages"
        if kind == "mistyped":
            return {"messages": rng.choice(["hi", 3, None, {"role": "user"}])}, "messages"
        if kind == "empty":
            return {"messages": []}, "messages"
        if kind == "utf8":
            msgs[0]["content"] = "h" + BAD_UTF8
            return {"messages": msgs}, "messages[0].content"
        if kind == "role":
            msgs[0]["role"] = rng.choice(["human", None, 3])
            return {"messages": msgs}, "messages[0].role"
        return {"messages": msgs[:1]}, "messages"  # no assistant turn
    if kind == "not_object":
        return rng.choice(['"just text"', "[1, 2]", "{not json"]), "(row)"
    field = rng.choice(FIELDS[fmt])
    if kind == "missing":
        return {k: v for k, v in row.items() if k != field}, field
    if kind == "mistyped":
        return {**row, field: rng.choice([3, 2.5, None, True, {"text": "x"}])}, field
    if kind == "empty":
        return {**row, field: rng.choice(["", "   ", "\n"])}, field
    if kind == "utf8":
        return {**row, field: "ab" + BAD_UTF8 + "c"}, field
    if kind == "role":  # a chat message with a bad role in the prompt
        return {**row, "prompt": [{"role": "robot", "content": "x"}]}, "prompt[0].role"
    # no_assistant: a reply given as messages with no assistant turn, or a chat with none
    if fmt == "prompts":
        return {"prompt": [{"role": "user"}]}, "prompt[0].content"
    if fmt == "demonstrations":
        return {"messages": [{"role": "user", "content": "hi"}]}, "messages"
    return {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}, "chosen"


def encode_line(row) -> bytes:
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
    return text.replace(BAD_UTF8, "\\udcff").encode("utf-8", errors="surrogateescape").replace(b"\\udcff", b"\xff")


@pytest.mark.parametrize("fmt", ["prompts", "demonstrations", "preferences", "conversations"])
def test_fuzz_malformed_jsonl_rows_are_named(tmp_path, fmt):
    rng = random.Random(list(GOOD).index(fmt))
    for trial in range(20):
        lines, expected, number = [], {}, 0
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.15:
                lines.append(b"")  # a blank line: no row, but it counts as a line
                number += 1
                continue
            number += 1
            row = GOOD[fmt](rng)
            if rng.random() < 0.4:
                row, field = corrupt(row, fmt, rng)
                expected.setdefault(number, set()).add(field)
            lines.append(encode_line(row))
        path = tmp_path / f"{fmt}-{trial}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        n_rows = sum(1 for line in lines if line)
        if n_rows == 0:
            continue
        if not expected:
            assert len(load_data(path, DataConfig(fmt=fmt)).rows) == n_rows
            continue
        with pytest.raises(DataError) as e:
            load_data(path, DataConfig(fmt=fmt))
        found: dict[int, set[str]] = {}
        for p in e.value.problems:
            found.setdefault(p.row, set()).add(p.field)
            assert p.problem and str(p).startswith(f"row {p.row}, field ")
        assert set(found) == set(expected), (path.read_bytes(), e.value)
        for row, fields in expected.items():
            assert fields <= found[row], (row, fields, found[row], e.value)


def test_fuzz_malformed_csv_and_parquet_rows(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    rng = random.Random(1)
    for trial in range(10):
        good = ["hello there", "a b c"]
        prompts, completions, expected = [], [], {}
        for i in range(rng.randint(2, 10)):
            p, c = rng.choice(good).encode(), b"ok"
            kind = rng.choice(["good", "good", "empty", "utf8", "long", "empty_completion"])
            if kind == "empty":
                p, expected[i + 1] = b"  ", "prompt"
            elif kind == "utf8":
                p, expected[i + 1] = b"caf\xe9", "prompt"  # Latin-1, not UTF-8
            elif kind == "long":
                p, expected[i + 1] = b"x" * 30, "prompt"
            elif kind == "empty_completion":
                c, expected[i + 1] = b"", "completion"
            prompts.append(p)
            completions.append(c)
        config = DataConfig(fmt="demonstrations", max_prompt_tokens=20)
        csv_path = tmp_path / f"d{trial}.csv"
        csv_path.write_bytes(b"prompt,completion\n" + b"".join(b'"%s",%s\n' % (p, c) for p, c in zip(prompts, completions)))
        pq_path = tmp_path / f"d{trial}.parquet"  # binary columns: bytes decoded per row
        pq.write_table(pa.table({"prompt": pa.array(prompts, pa.binary()), "completion": pa.array(completions, pa.binary())}),
                       pq_path)
        for path in (csv_path, pq_path):
            if not expected:
                assert len(load_data(path, config, tokenizer=tok).rows) == len(prompts)
                continue
            with pytest.raises(DataError) as e:
                load_data(path, config, tokenizer=tok)
            assert {(p.row, p.field) for p in e.value.problems} == set(expected.items()), (path, e.value)


def test_csv_row_with_wrong_cell_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nhi,there\nonly one\n")
    with pytest.raises(DataError) as e:
        load_data(path, DataConfig(fmt="demonstrations"))
    assert problems_of(e) == {(2, "(row)")} and "1 cells, the header has 2" in str(e.value)


def test_missing_paths_name_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_data(missing)
    with pytest.raises(FileNotFoundError, match="gone.py"):
        reward_from_spec(str(tmp_path / "gone.py") + ":f")
    with pytest.raises(FileNotFoundError, match="no_such_thing"):
        reward_from_spec(str(tmp_path / "no_such_thing"))
    with pytest.raises(FileNotFoundError, match="rm_dir"):
        load_reward_model(tmp_path / "rm_dir")


# --- rewards -----------------------------------------------------------------------------------------------------
USER_REWARDS = '''
import math

def by_topic(prompts, completions, topic):
    return [float(len(c)) + (10.0 if t == "film" else 0.0) for c, t in zip(completions, topic)]

def breaks_on_boom(prompts, completions, **columns):
    if any(len(v) != len(completions) for v in columns.values() if isinstance(v, list)):
        raise ValueError("columns do not line up with the completions")
    for c in completions:
        if "boom" in c:
            raise KeyError("boom")
    return [1.0] * len(completions)

def nan_on_q(prompts, completions, **columns):
    return [math.nan if "?" in c else (math.inf if "!" in c else 1.0) for c in completions]

def too_few(prompts, completions, **columns):
    return [0.0]

def returns_none(prompts, completions, **columns):
    return None

def returns_text(prompts, completions, **columns):
    return ["good"] * len(completions)

NOT_CALLABLE = 3
'''


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_user_reward_from_file_and_module(user_file, monkeypatch):
    fn = reward_from_spec(f"{user_file}:by_topic")
    out = score_rewards_masked(fn, ["p", "q"], ["abc", "de"], topic=["film", "life"])
    assert out.values.tolist() == [13.0, 2.0] and out.valid_mask.all() and out.n_skipped == 0
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert reward_from_spec("my_rewards:by_topic")(["p"], ["x"], topic=["film"]) == [11.0]
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        reward_from_spec("my_rewards:nope")
    with pytest.raises(ValueError, match="not a function"):
        reward_from_spec("my_rewards:NOT_CALLABLE")
    broken = user_file.parent / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(ValueError, match="broken.py' failed to load: SyntaxError"):
        reward_from_spec(f"{broken}:f")
    with pytest.raises(ValueError, match="cannot import the reward module 'no_such_module_xyz'"):
        reward_from_spec("no_such_module_xyz:f")


def test_reward_that_raises_names_the_sample(user_file):
    fn = reward_from_spec(f"{user_file}:breaks_on_boom")
    with pytest.raises(RewardError, match=r"(?s)KeyError.*sample 2 of 3: prompt 'p2', completion 'a boom'"):
        score_rewards_masked(fn, ["p0", "p1", "p2"], ["fine", "ok", "a boom"], topic=["a", "b", "c"], scale=2.0)


def test_nonfinite_rewards_error_or_are_skipped_and_counted(user_file):
    fn = reward_from_spec(f"{user_file}:nan_on_q")
    prompts, completions = ["a", "b", "c", "d"], ["ok", "why?", "yes!", "fine"]
    with pytest.raises(RewardError, match=r"nan \(not finite\) for sample 1: prompt 'b', completion 'why\?'"):
        score_rewards_masked(fn, prompts, completions)
    out = score_rewards_masked(fn, prompts, completions, nonfinite="skip")
    assert out.valid_mask.tolist() == [True, False, False, True] and out.n_skipped == 2
    assert out.values.tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="returned 1 values for 4 completions"):
        score_rewards_masked(reward_from_spec(f"{user_file}:too_few"), prompts, completions, nonfinite="skip")
    for name, message in (("returns_none", "not a sequence of floats"), ("returns_text", r"returned 'good' for sample 0 of 4 \(not a number\)")):
        for mode in ("error", "skip"):
            with pytest.raises(RewardError, match=message):
                score_rewards_masked(reward_from_spec(f"{user_file}:{name}"), prompts, completions, nonfinite=mode)
    with pytest.raises(ValueError, match="nonfinite"):
        score_rewards_masked(fn, prompts, completions, nonfinite="ignore")


def test_weighted_sum_of_specs(user_file):
    fn = reward_from_specs(["2*length:chars", "-0.5*keywords:good,great", f"1e-1*{user_file}:nan_on_q"])
    completions = ["good", "great great", "bad?"]
    out = score_rewards_masked(fn, ["p"] * 3, completions, nonfinite="skip")
    assert out.values[:2].tolist() == pytest.approx([2 * 4 - 0.5 + 0.1, 2 * 11 - 1.0 + 0.1])
    assert out.valid_mask.tolist() == [True, True, False]  # the NaN term makes the sum NaN, skipped
    with pytest.raises(RewardError, match="sample 2"):
        score_rewards_masked(fn, ["p"] * 3, completions)


def test_builtin_rewards():
    assert LengthReward("chars")([""], ["ab cd"]) == [5.0]
    assert LengthReward("words", target=3)(["", ""], ["one two", "a b c d e"]) == [-1.0, -2.0]
    assert reward_from_spec("length:words:3")([""], ["a b c"]) == [0.0]
    kw = keyword_reward(["good", "very nice"])
    assert kw([""] * 3, ["Good, good and goodness", "very nice!", "nothing"]) == [2.0, 1.0, 0.0]
    assert reward_from_spec("keywords-present:good")([""] * 2, ["so good good", "bad"]) == [1.0, 0.0]
    assert RegexReward(r"\d+")([""], ["a1 b22 c"]) == [2.0]
    assert reward_from_spec("regex-present:^yes")([""] * 2, ["yes sir", "oh yes"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="invalid regular expression"):
        RegexReward("(")
    with pytest.raises(ValueError, match="length:chars"):
        reward_from_spec("length:bytes")


def test_vader_sentiment_is_the_compound_score_of_the_completion():
    SentimentIntensityAnalyzer = pytest.importorskip("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer

    fn = reward_from_spec("sentiment")
    assert isinstance(fn, VaderSentiment)
    texts = ["I love this wonderful film!", "This is terrible and sad.", "It is a table."]
    scores = fn(["ignored prompt, awful"] * 3, texts)
    ref = SentimentIntensityAnalyzer()
    assert scores == [ref.polarity_scores(t)["compound"] for t in texts]
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0


# --- a sequence-classification reward model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from tilt.engine.tiny import char_tokenizer

    folder = tmp_path_factory.mktemp("rm")
    tok = char_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=64, num_labels=1,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_reward_model_scores_prompt_plus_completion(reward_model_dir):
    from transformers import GPT2ForSequenceClassification

    fn = reward_from_spec(str(reward_model_dir))
    prompts, completions = ["the film", "a day", "x"], [" was good", " went", " is long and then longer"]
    batched = score_rewards_masked(fn, prompts, completions).values
    model = GPT2ForSequenceClassification.from_pretrained(reward_model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        alone = [model(**fn.tokenizer(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, completions)]
    assert batched.tolist() == pytest.approx(alone, abs=1e-5)  # padding does not change a score
    assert len(set(round(v, 6) for v in alone)) == 3  # and the scores depend on the text


def test_reward_model_refuses_pickled_weights(tmp_path, reward_model_dir):
    from transformers import AutoConfig

    AutoConfig.from_pretrained(reward_model_dir).save_pretrained(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        load_reward_model(tmp_path)


def test_reward_model_does_not_run_shipped_code_by_default(tmp_path):
    from safetensors.torch import save_file

    marker = tmp_path / "code_ran"
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom_rm", "auto_map": {
        "AutoConfig": "modeling_custom.C", "AutoModelForSequenceClassification": "modeling_custom.M"}}))
    (folder / "modeling_custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n")
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_reward_model(folder)
    assert not marker.exists()


# --- the command line --------------------------------------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from tilt.cli import data as data_cli

    parser = argparse.ArgumentParser(prog="tilt")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.run(args)
    return code, capsys.readouterr().out


def test_cli_check_counts_good_rows_and_lists_bad_ones(tmp_path, capsys, tok):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3)
    code, out = run_cli(["data", "check", str(good), "--format", "preferences"], capsys)
    assert code == 0 and out.startswith("3 rows ok")
    code, out = run_cli(["data", "check", str(good), "--format", "preferences", "--json"], capsys)
    assert code == 0 and json.loads(out)["rows"] == 3

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "", "chosen": 1, "rejected": "c"},
                                               {"prompt": "a", "chosen": "b"}], raw_lines=[b'{"prompt": "\xff"}'])
    code, out = run_cli(["data", "check", str(bad), "--format", "preferences"], capsys)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 4  # one line per bad row, then a summary
    assert lines[0].startswith("row 2: field 'prompt': empty") and "field 'chosen': expected text, got number" in lines[0]
    assert lines[1].startswith("row 3: field 'rejected': missing")
    assert lines[2].startswith("row 4: field 'prompt': invalid UTF-8")
    code, out = run_cli(["data", "check", str(bad), "--format", "preferences", "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["bad_rows"] == 3 and {e["row"] for e in report["errors"]} == {2, 3, 4}

    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_cli(["data", "check", str(tmp_path / "missing.jsonl"), "--format", "prompts"], capsys)


def test_cli_check_with_tokenizer_budget(tmp_path, capsys, tok):
    tok.save_pretrained(tmp_path / "tok")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short"}, {"prompt": "a much longer prompt"}])
    base = ["data", "check", str(path), "--format", "prompts", "--tokenizer", str(tmp_path / "tok"), "--max-prompt-tokens", "10"]
    code, out = run_cli(base, capsys)
    assert code == 1 and out.startswith("row 2: field 'prompt': 20 tokens, over the budget of 10")
    code, out = run_cli(base + ["--overlong", "truncate", "--json"], capsys)
    assert code == 0 and json.loads(out)["truncated"] == 1 and json.loads(out)["rows"] == 2
    code, out = run_cli(base + ["--overlong", "skip", "--json"], capsys)
    assert code == 0 and json.loads(out)["skipped"] == 1 and json.loads(out)["rows"] == 1
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        run_cli(["data", "check", str(path), "--format", "prompts", "--tokenizer", str(tmp_path / "none")], capsys)

