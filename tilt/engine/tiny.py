"""Tiny models and a character tokenizer, built from configs, for tests, benchmarks and examples offline.

Real models come from local paths (``tilt.engine.loading``); these exist so that every code path can be run
without downloading anything.
"""
from __future__ import annotations

import string

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def char_tokenizer(alphabet: str = string.ascii_lowercase + " .,!?") -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet``, plus <pad> (id 0), <eos> (id 1) and <unk> (id 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left")


def tiny_gpt2(vocab_size: int, *, n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_positions: int = 128, seed: int = 0,
              eos_token_id: int = 1, pad_token_id: int = 0) -> GPT2LMHeadModel:
    """A GPT-2 with random weights (seeded), float32."""
    import torch

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, intermediate_size: int = 128,
               max_positions: int = 256, seed: int = 0, eos_token_id: int = 1, pad_token_id: int = 0) -> LlamaForCausalLM:
    """A Llama with random weights (seeded), float32 (~1M parameters at the defaults with a 32k vocabulary)."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                         bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


if __name__ == "__main__":  # python -m tilt.engine.tiny FOLDER: a tiny GPT-2 with its character tokenizer, for examples/
    import sys

    folder = sys.argv[1] if len(sys.argv) > 1 else "tiny-model"
    tokenizer = char_tokenizer()
    tiny_gpt2(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"wrote {folder}/ (a tiny random GPT-2 and its character tokenizer)")
