"""Models for the engine and server tests whose answers are known in advance."""

from __future__ import annotations

import torch

from llama_zh.model import Transformer, build_model
from llama_zh.tokenizer import Tokenizer
from tiny_checkpoints import tiny_config

# Characters the tiny tokenizer has no piece for (byte fallback: three byte tokens each), chosen so
# that no byte repeats, joined by characters it has pieces for.
SPLIT_TEXT = "你好，龘与䶮和嫑。"


def chain_model(tokenizer: Tokenizer, prompt_ids: list[int], answer_ids: list[int]) -> Transformer:
    """A model whose greedy answer to `prompt_ids` is `answer_ids`, then eos.

    Every block's output projections are zero, so each position's logits depend on its own token
    only; the head maps each token of the chain (the prompt's last, then the answer's) to the next,
    so the chain's tokens must all differ."""
    keys = [prompt_ids[-1]] + list(answer_ids)
    if len(set(keys)) != len(keys):
        raise ValueError(f"a chain needs distinct tokens, got {keys}")
    model = build_model(tiny_config(vocab_size=tokenizer.vocab_size), seed=0).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.wo.weight.zero_()
            block.ffn.w_down.weight.zero_()
        model.head.weight.zero_()
        for token, following in zip(keys, list(answer_ids) + [tokenizer.eos_id]):
            model.head.weight[following] = 8.0 * model.norm(model.embed.weight[token])
    return model
