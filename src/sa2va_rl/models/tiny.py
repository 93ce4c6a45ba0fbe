"""Tiny models built in code (random weights, no download) for tests, demos and offline smoke runs."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from sa2va_rl.data.vocab import WORDS

SPECIAL = ["<pad>", "<unk>", "<eos>"]


def word_tokenizer(words: list[str], extra_special: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in code on ``words`` (the kind Qwen ships, so transformers'
    Qwen2Tokenizer loads it back unchanged): ids 0..2 are <pad>, <unk>, <eos>, then extra specials.

    Every word of ``words`` is one token, with and without a leading space; any other text still
    encodes, byte by byte.
    """
    specials = SPECIAL + list(extra_special or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(specials) + 10 * len(words), min_frequency=1,
                                  special_tokens=specials, initial_alphabet=alphabet, show_progress=False)
    corpus = [" ".join(words)] * 4 + [" ".join(words[i:] + words[:i]) for i in range(len(words))] + words
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=list(extra_special or []))


def tiny_qwen2_config(vocab_size: int, hidden: int = 64, layers: int = 2, **overrides) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
                       bos_token_id=None, **overrides)


def make_tiny_causal(out_dir: str, seed: int = 0) -> str:
    """Write a ~100k-parameter Qwen2 causal LM and its tokenizer to ``out_dir``; return the path."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(WORDS)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer)))
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, do_sample=True, max_new_tokens=16)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
