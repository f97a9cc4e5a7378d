"""The inference room: the one loader (`load`: checkpoint -> quantized, swapped model), the speed-up
module swaps (swaps.py), the continuous-batching engine (engine.py), the OpenAI-compatible protocol
(protocol.py) and HTTP app (server.py) that stage=serve runs. stage=infer, stage=eval and stage=serve
all load through `load`; llama_zh/model.py stays the training architecture alone."""

from llama_zh.infer.loader import BACKENDS, LoadReport, load, load_stream

__all__ = ["BACKENDS", "LoadReport", "load", "load_stream"]
