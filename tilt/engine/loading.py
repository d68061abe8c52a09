"""Loading Hugging Face causal LMs and tokenizers safely: local folders, or hub ids already in the local cache.

Safe by default: weights only from safetensors (``use_safetensors=True``; pickled ``.bin`` checkpoints are
refused), and ``trust_remote_code`` stays off unless the caller turns it on.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def resolve_model_path(spec: str) -> str:
    """A local folder as given, or a hub id (``org/name``) that the local hub cache already holds.

    No download is attempted when the id is not cached; the error says how to get the model onto this
    machine. (Where the network is available, set ``TILT_ALLOW_DOWNLOAD=1`` to let transformers fetch it.)
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json: point at a from_pretrained folder")
        return str(path)
    if os.environ.get("TILT_ALLOW_DOWNLOAD") == "1":
        return spec
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available locally"
        raise FileNotFoundError(
            f"model {spec!r} is neither a local folder nor in the local hub cache ({type(exc).__name__}). "
            "Give the path of a folder saved with save_pretrained, or copy the model into the hub cache."
        ) from None


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM in ``dtype`` (float32 by default: bfloat16 is very slow on CPUs without native support)."""
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(spec), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def load_model_and_tokenizer(spec: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local folder or a cached hub id; see ``resolve_model_path``."""
    return load_model(spec, trust_remote_code=trust_remote_code, dtype=dtype), load_tokenizer(spec, trust_remote_code=trust_remote_code)
