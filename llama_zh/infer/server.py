"""The OpenAI-compatible HTTP app over an Engine: /v1/models, /v1/completions, /v1/chat/completions.

Every error is answered as OpenAI does ({"error": {"message", "type", "param", "code"}}) with its
status: 400 bad input, 401 API key, 404 model or route, 413 body too large, 429 queue full, 503
shutting down, 500 anything else; one request's error never stops the others. A client that goes
away (a closed stream, or a dropped connection while a whole answer is awaited) cancels its
sequence, which frees its slot at the engine's next step.

`static_dir`, when it exists, is served at / (a page for people), after the API routes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_zh.data.chat_template import ChatTemplate, TemplateError
from llama_zh.generate import SamplingConfig
from llama_zh.infer.engine import Completion, ContextExceeded, Engine, EngineStopped, Event, QueueFull, Sequence
from llama_zh.infer.protocol import (
    Answer,
    ApiError,
    GenerationRequest,
    bad,
    parse_body,
    parse_chat,
    parse_completion,
    sse,
)

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 2**20
DISCONNECT_POLL_S = 0.5  # how often a request awaiting a whole answer checks that its client is still there


@dataclass
class ServeOptions:
    model_name: str
    api_key: str | None = None  # None: no key asked
    default_max_tokens: int = 256  # a request without max_tokens: at most this many, within the context
    template: ChatTemplate | None = None  # None: /v1/chat/completions answers 400
    stop_at_user_turn: bool = True  # chat: also stop where the model starts the next user turn
    static_dir: Path | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class _EngineStream(StreamingResponse):
    """A streamed answer whose sequence is cancelled however the response ends (finished, client
    gone, server stopping), even before the body was first iterated."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def create_app(engine: Engine, tokenizer, options: ServeOptions) -> FastAPI:
    app = FastAPI(title="llama_zh", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.options = engine, options

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind).body(),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(), status_code=500
        )

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "no API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), options.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def model_card() -> dict:
        return {
            "id": options.model_name,
            "object": "model",
            "created": options.created,
            "owned_by": "llama_zh",
            "max_model_len": engine.context_length,
        }

    def check_model(name: str | None) -> None:
        if name is not None and name != options.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {options.model_name!r}",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise ApiError(503, "the engine is not running", "server_error", code="engine_stopped")
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(request: Request):
        authorize(request)
        return engine.stats()

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = parse_completion(await _read_body(request), tokenizer.vocab_size)
        check_model(req.model)
        ids = req.prompt if isinstance(req.prompt, list) else tokenizer.encode(req.prompt, bos=True)
        return await _answer(
            request, req, ids, _sampling(req, ids, "prompt", []), Answer(options.model_name, chat=False)
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        req = parse_chat(await _read_body(request))
        check_model(req.model)
        template = options.template
        if template is None:
            raise ApiError(400, "this server has no chat template (use /v1/completions)", param="messages")
        try:
            ids = template.prompt_ids(req.messages, tokenizer)
        except TemplateError as e:
            raise bad("messages", str(e)) from None
        stops = []
        if options.stop_at_user_turn:
            header = template.user_header()
            if header:
                stops.append(header)
        return await _answer(
            request, req, ids, _sampling(req, ids, "messages", stops), Answer(options.model_name, chat=True)
        )

    def _sampling(req: GenerationRequest, ids: list[int], prompt_field: str, extra_stops: list[str]) -> SamplingConfig:
        context = engine.context_length
        if len(ids) >= context:
            raise bad(
                prompt_field,
                f"the prompt has {len(ids)} tokens; this model's context holds {context} "
                f"(prompt and completion together)",
                "context_length_exceeded",
            )
        room = context - len(ids)
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(options.default_max_tokens, room)
        elif max_tokens > room:
            raise bad(
                "max_tokens",
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}; this model's "
                f"context holds {context} (prompt and completion together)",
                "context_length_exceeded",
            )
        stops = req.stop + [s for s in extra_stops if s not in req.stop]
        return SamplingConfig(
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            max_new_tokens=max_tokens,
            seed=req.seed,
            stop_strings=stops,
            long_prompt="fail",
        )

    async def _answer(
        request: Request, req: GenerationRequest, ids: list[int], sampling: SamplingConfig, answer: Answer
    ):
        try:
            seq, events = engine.submit_async(ids, sampling)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), "server_error", code="engine_stopped") from None
        except ContextExceeded as e:
            raise bad("messages" if answer.chat else "prompt", str(e), "context_length_exceeded") from None
        if req.stream:
            return _EngineStream(_stream(seq, events, answer, req.include_usage), lambda: engine.cancel(seq))
        try:
            done = await _collect(request, seq, events)
        finally:
            engine.cancel(seq)  # a no-op once it has finished
        if done is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        if done.finish_reason not in ("stop", "length"):
            raise ApiError(
                503 if done.finish_reason == "error" and "shutting down" in (done.error or "") else 500,
                f"generation failed: {done.error or done.finish_reason}",
                "server_error",
            )
        return answer.whole(done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens)

    async def _collect(request: Request, seq: Sequence, events: asyncio.Queue[Event]) -> Completion | None:
        done = Completion()
        loop = asyncio.get_running_loop()
        check_at = loop.time() + DISCONNECT_POLL_S
        while done.finish_reason is None:
            try:
                done.add(await asyncio.wait_for(events.get(), DISCONNECT_POLL_S))
            except TimeoutError:
                pass
            if loop.time() >= check_at:  # by the clock: events may keep coming all along
                check_at = loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    engine.cancel(seq)
                    return None
        return done

    async def _stream(
        seq: Sequence, events: asyncio.Queue[Event], answer: Answer, include_usage: bool
    ) -> AsyncIterator[str]:
        if answer.chat:
            yield sse(answer.chunk("", first=True, with_usage=include_usage))
        while True:
            event = await events.get()
            if event.text:
                yield sse(answer.chunk(event.text, with_usage=include_usage))
            if not event.final:
                continue
            if event.finish_reason in ("stop", "length"):
                yield sse(answer.chunk(None, event.finish_reason, with_usage=include_usage))
                if include_usage:
                    yield sse(answer.usage_chunk(event.prompt_tokens, event.completion_tokens))
            else:
                yield sse(
                    ApiError(500, f"generation failed: {event.error or event.finish_reason}", "server_error").body()
                )
            yield sse("[DONE]")
            return

    static = options.static_dir
    if static is not None and Path(static).is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=str(static), html=True), name="page")
    return app


async def _read_body(request: Request) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {length} bytes; at most {MAX_BODY_BYTES}")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {len(raw)} bytes; at most {MAX_BODY_BYTES}")
    return parse_body(raw)
