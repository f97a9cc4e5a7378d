"""stage=serve: an OpenAI-compatible HTTP server (llama_zh.infer.server) over the continuous-batching
engine (llama_zh.infer.engine), for the checkpoint of stage.checkpoint on trainer='s device, quantized
by quant= and swapped for stage.backend by the inference loader (llama_zh.infer.load), as stage=infer
and stage=eval load it.

/v1/chat/completions formats conversations with the chat template the checkpoint was trained with
(stage=sft records it in model_config.yaml; an HF export in tokenizer_config.json), or template=
when the checkpoint carries none. A chat page for people (llama_zh/infer/static: HTML, CSS and
plain JavaScript over this same API) is served at / unless stage.web=false. The address is bound
before the model is loaded (a port in use fails at once); stage.port=0 takes a free port, and the
address is logged either way. SIGTERM or Ctrl-C stops accepting requests, lets those in flight
finish (stage.shutdown_timeout), stops the engine and exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from llama_zh.config import ConfigError
from llama_zh.data.chat_template import ChatTemplate, checkpoint_template
from llama_zh.infer.loader import load_for_stage
from llama_zh.stages import plain, quant_slice, trainer_slice

log = logging.getLogger(__name__)
PAGE_DIR = Path(__file__).resolve().parents[1] / "infer" / "static"  # the chat page (package data)


def _positive_int(stage: DictConfig, key: str, minimum: int) -> int:
    value = stage.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"stage.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def api_key(stage: DictConfig) -> str | None:
    """The key clients must send, from the environment variable stage.api_key_env names (null: none)."""
    name = stage.get("api_key_env")
    if not name:
        return None
    key = os.environ.get(str(name), "").strip()
    if not key:
        raise ConfigError(
            f"stage.api_key_env={name}: the environment variable {name} is unset or empty "
            f"(set it to the key clients must send, or set stage.api_key_env=null for no key)"
        )
    return key


def page_dir(stage: DictConfig) -> Path | None:
    """What is served at /: stage.static_dir, else the packaged chat page; nothing with stage.web=false."""
    web = stage.web
    if not isinstance(web, bool):
        raise ConfigError(f"stage.web must be true or false, got {web!r}")
    if not web:
        return None
    if not stage.get("static_dir"):
        if not (PAGE_DIR / "index.html").is_file():
            raise ConfigError(
                f"stage.web=true: the chat page is missing from the installed package ({PAGE_DIR}); "
                f"reinstall llama_zh, or set stage.web=false to serve the API only"
            )
        return PAGE_DIR
    static = Path(str(stage.static_dir))
    if not static.is_dir():
        raise ConfigError(f"stage.static_dir: {static} is not a directory")
    return static


def chat_template(cfg: DictConfig) -> ChatTemplate:
    text = checkpoint_template(Path(cfg.stage.checkpoint))
    if text is not None:
        log.info("chat template: the one %s was trained with", cfg.stage.checkpoint)
        return ChatTemplate(text, name=f"{cfg.stage.checkpoint} chat_template")
    template = ChatTemplate.from_config(plain(cfg.template))
    log.info("chat template: %s (template=; the checkpoint carries none)", template.name)
    return template


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken now so that a port in use fails before the model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio disables Nagle on accepted connections only for a TCP-labelled socket,
    # and with Nagle on each streamed chunk waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"stage.host/stage.port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextmanager
def _signals_end_serving():
    """uvicorn handles SIGINT/SIGTERM while it serves, then raises the signal again for the handler that
    was there before; this makes that handler a no-op, so the process ends normally (exit 0) once the
    engine has stopped."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(cfg: DictConfig):
    import uvicorn

    from llama_zh.infer.engine import PREFILL_LAYOUTS, Engine
    from llama_zh.infer.server import ServeOptions, create_app

    stage = cfg.stage
    host, port = str(stage.host), stage.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"stage.port must be an integer in [0, 65535] (0: a free port), got {port!r}")
    max_concurrent = _positive_int(stage, "max_concurrent", 1)
    max_queue = _positive_int(stage, "max_queue", 0)
    max_prefill_tokens = _positive_int(stage, "max_prefill_tokens", 1)
    prefill_layout = str(stage.prefill_layout)
    if prefill_layout not in PREFILL_LAYOUTS:
        raise ConfigError(f"stage.prefill_layout={prefill_layout}: expected one of {', '.join(PREFILL_LAYOUTS)}")
    default_max_tokens = _positive_int(stage, "default_max_tokens", 1)
    context_length = None if stage.get("context_length") is None else _positive_int(stage, "context_length", 2)
    shutdown_timeout = _positive_int(stage, "shutdown_timeout", 0)
    key = api_key(stage)
    if key is None and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it (stage.api_key_env)", host)
    static = page_dir(stage)
    template = chat_template(cfg)

    sock = bind(host, port)
    try:
        model, tokenizer, _ = load_for_stage(
            stage.checkpoint, trainer_slice(cfg), quant_slice(cfg), stage.backend, stage.prefix, rows=max_concurrent
        )
        if context_length is not None and context_length > model.config.max_seq_len:
            raise ConfigError(
                f"stage.context_length={context_length} exceeds the model's max_seq_len={model.config.max_seq_len}"
            )
        engine = Engine(
            model,
            tokenizer,
            max_concurrent=max_concurrent,
            max_queue=max_queue,
            context_length=context_length,
            max_prefill_tokens=max_prefill_tokens,
            prefill_layout=prefill_layout,
        )
        log.info(
            "engine: %d slots of %d tokens, KV cache %.1f MiB; queue up to %d; prefill up to %d tokens a round (%s)",
            max_concurrent,
            engine.context_length,
            engine.cache.nbytes / 2**20,
            max_queue,
            engine.max_prefill_tokens,
            engine.prefill_layout,
        )
        name = stage.get("model_name") or Path(str(stage.checkpoint)).resolve().name
        options = ServeOptions(
            model_name=name,
            api_key=key,
            default_max_tokens=default_max_tokens,
            template=template,
            stop_at_user_turn=bool(stage.stop_at_user_turn),
            static_dir=static,
        )
        app = create_app(engine, tokenizer, options)
        config = uvicorn.Config(
            app, log_config=None, access_log=bool(stage.access_log), timeout_graceful_shutdown=shutdown_timeout
        )
        server = uvicorn.Server(config)
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info(
            "serving %s at http://%s:%d/v1 (API key: %s); SIGTERM or Ctrl-C stops",
            name,
            url_host,
            bound_port,
            f"${stage.api_key_env}" if key else "none",
        )
        if static is not None:
            log.info("web page at http://%s:%d/", url_host, bound_port)
        engine.start()
        try:
            with _signals_end_serving():
                server.run(sockets=[sock])
        finally:
            engine.stop()
    finally:
        sock.close()
    log.info("server stopped")
    return f"http://{url_host}:{bound_port}/v1"
