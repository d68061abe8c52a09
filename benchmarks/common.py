"""Shared pieces of the step benchmarks: the tiny model and tokenizer both sides load, the reward, the
machine's matrix-multiply rate, and running each side in its own process (so ``ru_maxrss`` is that side's
peak resident memory) in the order A B A B.

Each side prints one JSON line prefixed ``RESULT `` on stdout; the parent collects them.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [w + " " + v for w in ("the cat", "a dog", "my friend", "one day", "the sea", "a king", "her song", "we")
           for v in ("sat", "ran", "said", "is")]


def wide_tokenizer(vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` ids that all decode to text: <pad>=0, <eos>=1, <unk>=2, the
    characters of a small alphabet, then pieces " x<i>". A random model's samples then decode to text that a
    text reward can score, while the LM head and sampling cost what a realistic vocabulary costs."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in string.ascii_lowercase + " .,!?":
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"x{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # prompts are plain characters
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left")


def sevens(completions) -> list[float]:
    """The reward both sides optimise: the number of '7' characters per 10 characters of the completion."""
    return [10.0 * c.count("7") / max(1, len(c)) for c in completions]


def letter_rate(completions, letter: str = "e") -> list[float]:
    """A reward with signal on a real model's text (which holds no '7'): occurrences of ``letter`` per 10 characters."""
    return [10.0 * c.count(letter) / max(1, len(c)) for c in completions]


REWARDS = {"sevens": sevens, "letter-e": letter_rate}


def prompt_tokens(tokenizer) -> float:
    """Mean number of tokens of the benchmark prompts under ``tokenizer`` (for the FLOP count)."""
    return sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS) / len(PROMPTS)


def build_model_folder(folder: str, vocab_size: int) -> str:
    """Save the tiny Llama and the wide tokenizer to ``folder`` (TRL rebuilds the reference from a path)."""
    from tilt.engine.tiny import tiny_llama

    if not os.path.exists(os.path.join(folder, "config.json")):
        tiny_llama(vocab_size).save_pretrained(folder)
        wide_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def matmul_gflops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """Measured float32 matrix-multiply rate (GFLOP/s) of this process at ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load1() -> float:
    return os.getloadavg()[0]


def machine_line() -> str:
    """The CPU model, the features that decide the fast sampler (tilt.engine.fast_sampler), and the load average."""
    from tilt.engine.fast_sampler import BF16_CPU_FLAGS, cpu_flags

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", *BF16_CPU_FLAGS) if f in cpu_flags()]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(flags) or 'none of avx2/avx512'}; {gpu}; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}")


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def run_side(python: str, script: str, args: list[str]) -> dict:
    """Run one side in a fresh process; return its RESULT object (raise with its output if it failed)."""
    proc = subprocess.run([python, script, *args], capture_output=True, text=True, cwd=os.path.dirname(HERE))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{script} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def median(xs):
    return statistics.median(xs) if xs else float("nan")
