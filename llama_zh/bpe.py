"""Byte-level BPE tokenizer.json files in Llama-3's layout: training one, and writing one with its config.

    train_byte_level_bpe   texts -> a `tokenizers.Tokenizer`: Llama-3's regex split, byte-level BPE,
                           the 256 special tokens after the regular ones
    write_bpe              tokenizer.json + tokenizer_config.json (bos/eos/pad, chat template), atomically

The BPE itself is the `tokenizers` library's; this module only assembles the pipeline Llama-3's
tokenizer.json describes (docs/reference.md, section "Tokenizers").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from llama_zh.atomic import write_text
from llama_zh.tokenizer import BPE_CONFIG_FILE, BPE_FILE

# Llama-3's pre-tokenizer split: contractions, letters (with one leading non-letter), digits in runs of
# at most three, punctuation runs, newlines, spaces.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
N_SPECIAL = 256
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def llama3_special_tokens(n: int = N_SPECIAL) -> list[str]:
    """Llama-3's special tokens in id order (they follow the regular vocabulary)."""
    named = [BOS, EOS, *(f"<|reserved_special_token_{i}|>" for i in range(4)), "<|start_header_id|>",
             "<|end_header_id|>", "<|reserved_special_token_4|>", EOT]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(5, n - 5)]


def byte_level_pipeline(tokenizer) -> None:
    """Set Llama-3's normalizer-free pipeline on a `tokenizers.Tokenizer` holding a BPE model."""
    from tokenizers import Regex, decoders, pre_tokenizers

    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()


def bos_post_processor(bos: str, bos_id: int):
    """Llama-3's post-processor: bos in front when special tokens are requested (transformers' default)."""
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, specials: list[str] | None = None):
    """A byte-level BPE of `vocab_size` regular tokens (the 256 bytes included) trained on `texts`, then
    `specials` (Llama-3's by default) as special added tokens with the ids after them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = llama3_special_tokens() if specials is None else specials
    tokenizer = Tokenizer(models.BPE())
    byte_level_pipeline(tokenizer)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(specials)
    if specials:
        tokenizer.post_processor = bos_post_processor(specials[0], tokenizer.token_to_id(specials[0]))
    return tokenizer


def tokenizer_config(bos: str | None = BOS, eos: str | None = EOS, pad: str | None = None,
                     chat_template: str | None = None, max_length: int | None = None) -> dict:
    """A tokenizer_config.json transformers' AutoTokenizer reads as the fast tokenizer of tokenizer.json."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "clean_up_tokenization_spaces": False}
    if pad is not None:
        config["pad_token"] = pad
    if max_length is not None:
        config["model_max_length"] = max_length
    if chat_template:
        config["chat_template"] = chat_template
    return config


def write_bpe(tokenizer, directory: Path, config: dict) -> Path:
    """tokenizer.json (from a `tokenizers.Tokenizer` or its JSON text) and tokenizer_config.json in
    `directory`, each written atomically; returns the tokenizer.json path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str(pretty=True)
    write_text(directory / BPE_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))
    write_text(directory / BPE_FILE, text)
    return directory / BPE_FILE
