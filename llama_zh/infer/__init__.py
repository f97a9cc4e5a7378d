"""Serving a model: the continuous-batching engine (engine.py), the OpenAI-compatible protocol
(protocol.py) and HTTP app (server.py) that stage=serve runs."""
