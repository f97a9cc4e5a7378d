"""Models for the engine and server tests whose answers are known in advance, and a server to put them behind."""

from __future__ import annotations

import socket
import threading
import time

import torch
import uvicorn
from tiny_checkpoints import tiny_config

from llama_zh.model import Transformer, build_model
from llama_zh.tokenizer import Tokenizer

# Characters the tiny tokenizer has no piece for (byte fallback: three byte tokens each), chosen so
# that no byte repeats, joined by characters it has pieces for.
SPLIT_TEXT = "你好，龘与䶮和嫑。"


def chain_model(
    tokenizer: Tokenizer, prompt_ids: list[int], answer_ids: list[int], end_id: int | None = None
) -> Transformer:
    """A model whose greedy answer to `prompt_ids` is `answer_ids`, then `end_id` (default eos).

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
        for token, following in zip(
            keys, list(answer_ids) + [tokenizer.eos_id if end_id is None else end_id], strict=False
        ):
            model.head.weight[following] = 8.0 * model.norm(model.embed.weight[token])
    return model


class InProcessServer:
    """uvicorn serving `app` in a thread, on a socket bound to a free port of 127.0.0.1."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def slow_steps(monkeypatch, engine, seconds):
    """Each decoding step of `engine` takes `seconds` longer, so that a stream lasts long enough to be
    watched growing, or left, or stopped."""
    real = engine._decode

    def slow(seqs):
        time.sleep(seconds)
        real(seqs)

    monkeypatch.setattr(engine, "_decode", slow)
