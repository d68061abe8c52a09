"""Bradley-Terry reward modelling on a tiny GPT-2 backbone built from a config."""
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tilt.engine.tiny import char_tokenizer, tiny_gpt2
from tilt.recipes import reward_model
from tilt.reward_fns import SequenceClassifierReward, reward_from_spec


def pairs(n, seed):
    """A learnable preference: the completion with more 'a's is chosen."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "".join(rng.choice("bcdefg") for _ in range(rng.randint(2, 5))) + " "
        k = rng.randint(1, 5)
        rich = "".join(rng.choice("a" * k + "xyz") for _ in range(8))
        poor = "".join(rng.choice("xyzw") for _ in range(8))
        if rich.count("a") == poor.count("a"):
            continue
        chosen, rejected = (rich, poor) if rich.count("a") > poor.count("a") else (poor, rich)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbone")
    tok = char_tokenizer()
    tiny_gpt2(len(tok), n_embd=48).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_reward_model_learns_a_preference_and_is_usable_as_a_reward(backbone, tmp_path):
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, use_safetensors=True)
    reward = SequenceClassifierReward(model, tok)
    train, held_out = pairs(600, 0), pairs(200, 1)
    before = reward_model.accuracy(reward, held_out)
    history = []
    reward_model.train(reward_model.RewardModelConfig(epochs=2, pairs_per_step=16, lr=3e-3), reward, train,
                       on_step=lambda s, m: history.append(m))
    after = reward_model.accuracy(reward, held_out)
    assert after > 0.85 and after > before + 0.2, (before, after)
    assert sum(m["loss"] for m in history[-10:]) < sum(m["loss"] for m in history[:10])
    # saved, it is a reward for every recipe
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    r = reward_from_spec(str(tmp_path / "rm"))
    scores = r(["ab ", "ab "], ["aaaaaaaa", "xyzxyzxy"])
    assert scores[0] > scores[1]


def test_accuracy_counts_ties_as_half(backbone):
    tok = char_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, use_safetensors=True)
    reward = SequenceClassifierReward(model, tok)
    same = [{"prompt": "p ", "chosen": "abc", "rejected": "abc"}] * 3
    assert reward_model.accuracy(reward, same) == 0.5
    with pytest.raises(ValueError):
        reward_model.RewardModelConfig(epochs=0)
