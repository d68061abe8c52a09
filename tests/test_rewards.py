"""Rewards called as TRL calls them: keywords by signature, chats for conversational data, dataset columns by
keyword, None for unscored samples, weights, per-function metrics; the old positional form; clear errors."""
from __future__ import annotations

import json
import math
import string

import pytest
import torch

from tilt.data import load_data
from tilt.reward_fns import reward_from_specs
from tilt.rewards import (RewardError, Rewards, RewardTerm, calling_convention, reward_metrics, score_rewards,
                          score_rollout)
from tilt.rollout import Rollout

# Functions of the shapes TRL's documentation shows, written here from scratch.
TRL_STYLE = '''
import re

def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]

def think_format(completions, **kwargs):
    texts = [completion[0]["content"] for completion in completions]
    return [1.0 if re.fullmatch(r"<think>.*</think>.*", t, re.S) else 0.0 for t in texts]

def echo_roles(prompts, completions, **kwargs):
    return [float(len(p)) + (1.0 if c[0]["role"] == "assistant" else -100.0) for p, c in zip(prompts, completions)]

def exact_answer(completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def math_only(completions, task, **kwargs):
    return [float(len(c)) if t == "math" else None for c, t in zip(completions, task)]

def code_only(completions, task, **kwargs):
    return [1.0 if t == "code" else None for t in task]

def token_count(completion_ids, **kwargs):
    return [len(ids) for ids in completion_ids]

def says_yes(completions, **kwargs):
    return ["yes" in c for c in completions]

def old_positional(prompts, completions):
    return [float(len(p) + len(c)) for p, c in zip(prompts, completions)]

def other_names(ps, cs):
    return [float(len(c)) for c in cs]

def only_kwargs(**kwargs):
    return [float(len(c)) for c in kwargs["completions"]]

def one_argument(texts):
    return [0.0 for _ in texts]
'''


@pytest.fixture()
def rewards_file(tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_STYLE)
    return path


def spec(path, name: str) -> str:
    return f"{path}:{name}"


def test_trl_keyword_reward_runs_unchanged(rewards_file):
    r = reward_from_specs([spec(rewards_file, "reward_len")])
    completions = ["a" * 5, "b" * 20, "c" * 26]
    assert r(["p"] * 3, completions).tolist() == [-15.0, 0.0, -6.0]
    assert calling_convention(r.terms[0].fn).by_keyword
    assert r.names == ["reward_len"]


def test_old_positional_form_and_other_names_still_work(rewards_file):
    r = reward_from_specs([spec(rewards_file, "old_positional"), spec(rewards_file, "other_names"),
                           spec(rewards_file, "only_kwargs")], weights=[1.0, 10.0, 100.0])
    assert not calling_convention(r.terms[1].fn).by_keyword and calling_convention(r.terms[2].fn).by_keyword
    # old: len(p) + len(c) = 2 + 3; other: 10 * 3; only kwargs: 100 * 3
    assert r(["pp"], ["ccc"]).tolist() == [5.0 + 30.0 + 300.0]
    assert score_rewards(lambda p, c: [float(len(c[0]))], ["x"], ["abcd"]).tolist() == [4.0]
    with pytest.raises(ValueError, match=r"cannot tell how to call the reward one_argument\(texts\)"):
        reward_from_specs([spec(rewards_file, "one_argument")])


def test_dataset_column_reaches_the_reward_by_keyword(rewards_file, tmp_path):
    r = reward_from_specs([spec(rewards_file, "exact_answer")])
    assert r(["2+2", "3+3"], [" 4", "7"], answer=["4", "6"]).tolist() == [1.0, 0.0]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [{"prompt": "2+2", "answer": "4"}, {"prompt": "3+3", "answer": "6"}]))
    data = load_data(path)
    bound = r.for_data(data)
    # a recipe passes only the prompts it sampled from; the bound reward finds each row's answer
    assert bound(["3+3", "2+2", "3+3"], ["6", "4", "5"]).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match=r"exact_answer needs 'answer', which this caller does not pass"):
        r(["2+2"], ["4"])


def test_rows_with_one_prompt_and_different_columns_are_refused(rewards_file, tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [{"prompt": "q", "answer": "1"}, {"prompt": "q", "answer": "2"}]))
    with pytest.raises(ValueError, match="rows 1 and 2 have the same prompt but different columns"):
        reward_from_specs([spec(rewards_file, "exact_answer")]).for_data(load_data(path))


@pytest.fixture(scope="module")
def chat_tok():
    from tilt.engine.tiny import char_tokenizer

    t = char_tokenizer(string.ascii_lowercase + string.digits + " .,!?:<>/\n")
    t.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")
    return t


def test_conversational_data_gives_messages_to_user_functions_and_text_to_builtins(rewards_file, tmp_path, chat_tok):
    path = tmp_path / "chat.jsonl"
    chats = [[{"role": "user", "content": "think"}], [{"role": "system", "content": "be brief"}, {"role": "user", "content": "go"}]]
    path.write_text("\n".join(json.dumps({"prompt": c}) for c in chats))
    data = load_data(path, tokenizer=chat_tok)
    assert data.conversational and data.fmt == "prompts" and data.inferred
    rendered = [row["prompt"] for row in data.rows]
    assert rendered[0] == "user: think\nassistant: "
    r = reward_from_specs([spec(rewards_file, "think_format"), spec(rewards_file, "echo_roles"), "length:chars"],
                          weights=[1.0, 1.0, 0.01]).for_data(data)
    completions = ["<think>x</think>yes", "no tags"]
    scores = r.score(rendered, completions)
    assert scores.values["think_format"].tolist() == [1.0, 0.0]
    assert scores.values["echo_roles"].tolist() == [1.0 + 1.0, 2.0 + 1.0]  # prompts are the chats (1 and 2 messages)
    assert scores.values["length:chars"].tolist() == [19.0, 7.0]  # a built-in reads the completion's text
    assert scores.total.tolist() == pytest.approx([1.0 + 2.0 + 0.19, 0.0 + 3.0 + 0.07])


def test_none_means_not_scored_in_a_weighted_sum(rewards_file):
    r = reward_from_specs([spec(rewards_file, "math_only"), spec(rewards_file, "code_only")], weights=[0.5, 2.0])
    completions, task = ["abcd", "xy", "zzz"], ["math", "code", "math"]
    scores = r.score(["p"] * 3, completions, task=task)
    # math rows: 0.5 * len(c); the code row: 2.0 * 1.0 (math_only returned None there)
    assert scores.total.tolist() == [2.0, 2.0, 1.5]
    assert scores.scored_mask["math_only"].tolist() == [True, False, True]
    metrics = reward_metrics(scores)
    assert metrics["rewards/math_only/mean"] == 3.5 and metrics["rewards/math_only/std"] == pytest.approx(math.sqrt(0.5))
    assert metrics["rewards/code_only/mean"] == 1.0 and metrics["rewards/code_only/scored"] == pytest.approx(1 / 3)
    assert "rewards/math_only/scored" in metrics and set(metrics) == {
        "rewards/math_only/mean", "rewards/math_only/std", "rewards/math_only/scored",
        "rewards/code_only/mean", "rewards/code_only/std", "rewards/code_only/scored"}
    with pytest.raises(RewardError, match=r"no reward function scored sample 1 of 2 .*prompt 'q', completion 'b'"):
        r(["p", "q"], ["a", "b"], task=["math", "prose"])
    with pytest.raises(RewardError, match=r"math_only returned None \(not scored\) for sample 1 of 2"):
        score_rewards(r.terms[0].fn, ["p", "q"], ["a", "b"], task=["math", "code"])


def test_bools_and_non_numbers_are_errors_naming_function_sample_and_value(rewards_file):
    r = reward_from_specs([spec(rewards_file, "says_yes")])
    with pytest.raises(RewardError, match=r"says_yes returned True for sample 0 of 2 \(a bool.*prompt 'p', completion 'yes'"):
        r(["p", "q"], ["yes", "no"])
    with pytest.raises(RewardError, match=r"tensor of bools"):
        score_rewards(lambda p, c: torch.tensor([True]), ["p"], ["c"])
    with pytest.raises(RewardError, match=r"returned '1.0' for sample 0 of 1 \(not a number\)"):
        score_rewards(lambda p, c: ["1.0"], ["p"], ["c"])


def test_completion_ids_are_the_sampled_tokens_up_to_eos(rewards_file):
    r = reward_from_specs([spec(rewards_file, "token_count")])
    ids = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    rollout = Rollout(prompts=["a", "b"], completions=["xy", "z"], prompt_ids=torch.zeros(2, 1, dtype=torch.long),
                      prompt_mask=torch.ones(2, 1, dtype=torch.bool), completion_ids=ids, completion_mask=mask,
                      truncated=torch.zeros(2, dtype=torch.bool), sample_token_logprobs=torch.zeros(2, 4),
                      samples_per_prompt=1)
    assert score_rollout(r, rollout).tolist() == [3.0, 2.0]
    assert score_rollout(lambda completion_ids: [float(i[0]) for i in completion_ids], rollout).tolist() == [5.0, 7.0]
    with pytest.raises(RewardError, match="token_count needs 'completion_ids'"):
        score_rewards(r, ["a"], ["xy"])


def test_weights_are_given_once_and_one_per_reward(rewards_file):
    with pytest.raises(ValueError, match="2 reward weights for 1 rewards"):
        reward_from_specs(["length:chars"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="carries a weight and weights were given too"):
        reward_from_specs(["2*length:chars"], weights=[1.0])
    r = reward_from_specs(["length:chars", "length:chars"], weights=[1.0, -3.0])
    assert r.names == ["length:chars", "length:chars_2"] and r([""], ["abcd"]).tolist() == [4.0 - 12.0]
    with pytest.raises(ValueError, match="must be a finite number"):
        RewardTerm(name="x", fn=lambda p, c: [0.0], weight=math.nan)
    with pytest.raises(ValueError, match="unique"):
        Rewards((RewardTerm("a", lambda p, c: [0.0]), RewardTerm("a", lambda p, c: [1.0])))


def test_a_trl_reward_drives_the_kl_rl_recipe(rewards_file, tmp_path, chat_tok):
    """The TRL-shaped conversational reward runs unchanged inside a recipe step on a tiny model."""
    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.tiny import tiny_gpt2
    from tilt.recipes import kl_rl

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "task": "math"}) + "\n")
    data = load_data(path, tokenizer=chat_tok)
    seen = []
    r = reward_from_specs([spec(rewards_file, "think_format"), spec(rewards_file, "math_only"),
                           spec(rewards_file, "token_count")]).for_data(data)
    original = r.terms[1].fn

    def spy(completions, task, **kwargs):
        seen.append((completions, task, kwargs.get("completion_ids")))
        return original(completions=[c[0]["content"] for c in completions], task=task)

    r = Rewards((r.terms[0], RewardTerm("math_only", spy), r.terms[2]), contexts=r.contexts, conversational=True)
    policy = HFPolicy(tiny_gpt2(len(chat_tok)), chat_tok, SamplingConfig(max_new_tokens=3))
    logged = []
    kl_rl.train(kl_rl.KLRLConfig(steps=1, prompts_per_step=1, samples_per_prompt=2), policy, policy, r,
                [row["prompt"] for row in data.rows], on_step=lambda s, m: logged.append(m))
    completions, task, ids = seen[0]
    assert task == ["math", "math"] and all(c[0]["role"] == "assistant" for c in completions)
    assert ids is not None and all(1 <= len(i) <= 3 for i in ids)
    assert len(logged) == 1 and math.isfinite(logged[0]["reward"])
