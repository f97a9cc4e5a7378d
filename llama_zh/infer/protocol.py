"""The OpenAI request bodies stage=serve accepts, checked field by field, and the objects it answers with.

A body is refused (HTTP 400, naming the field) when it holds a field this server does not know, or
a known field with a value it cannot honour. Common OpenAI fields that change nothing at their usual
value are accepted at that value and ignored (`NO_OP`): asking for what is not implemented (n > 1,
logprobs, penalties, echo) is refused rather than silently answered otherwise. `top_k` and
`repetition_penalty` are extensions (as in vLLM; with the openai client, pass them in extra_body).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 16  # each is searched in the text after every token, in the engine's thread
SEED_LIMIT = 2**63


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


# Accepted only at the value that changes nothing (what OpenAI does by default), then ignored.
NO_OP: dict[str, tuple[Callable[[Any], bool], str]] = {
    "user": (lambda v: v is None or isinstance(v, str), "any string (ignored)"),
    "n": (lambda v: v is None or (_is_int(v) and v == 1), "1 (one choice per request)"),
    "logprobs": (lambda v: v is None or v is False or (_is_int(v) and v == 0), "null or false (not implemented)"),
    "top_logprobs": (lambda v: v is None or (_is_int(v) and v == 0), "null or 0 (not implemented)"),
    "echo": (lambda v: v is None or v is False, "false (not implemented)"),
    "best_of": (lambda v: v is None or (_is_int(v) and v == 1), "1 (not implemented)"),
    "presence_penalty": (
        lambda v: v is None or (_is_number(v) and v == 0),
        "0 (not implemented; see repetition_penalty)",
    ),
    "frequency_penalty": (
        lambda v: v is None or (_is_number(v) and v == 0),
        "0 (not implemented; see repetition_penalty)",
    ),
    "logit_bias": (lambda v: v is None or v == {}, "null or {} (not implemented)"),
    "suffix": (lambda v: v is None or v == "", "null (not implemented)"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, '{"type": "text"} (not implemented)'),
}
SAMPLING_FIELDS = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "seed",
    "stream",
    "stream_options",
)
COMPLETION_FIELDS = frozenset(SAMPLING_FIELDS + ("prompt",))
COMPLETION_NO_OP = frozenset(
    ("user", "n", "logprobs", "echo", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "suffix")
)
CHAT_FIELDS = frozenset(SAMPLING_FIELDS + ("messages", "max_completion_tokens"))
CHAT_NO_OP = frozenset(
    ("user", "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "response_format")
)
ROLES = ("system", "user", "assistant")
MESSAGE_FIELDS = ("role", "content", "name")  # name: accepted and ignored (templates do not use it)


@dataclass
class GenerationRequest:
    """A checked completion or chat request; `prompt` or `messages` says which."""

    model: str | None = None
    prompt: str | list[int] | None = None  # completions: text, or token ids
    messages: list[dict] | None = None  # chat: [{"role", "content"}] with text content
    max_tokens: int | None = None  # None: the server's default, within the context
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    return body


def _check_fields(body: dict, known: frozenset, no_op: frozenset) -> None:
    for name, value in body.items():
        if name in known:
            continue
        if name in no_op:
            accepts, expected = NO_OP[name]
            if not accepts(value):
                raise bad(name, f"{name}={json.dumps(value)} is not supported: only {expected}", "unsupported_value")
            continue
        raise bad(name, f"unknown field {name!r}", "unknown_field")


def _sampling(body: dict, request: GenerationRequest, max_tokens_field: str = "max_tokens") -> GenerationRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model must be a string, got {json.dumps(model)}")
    request.model = model

    max_tokens = body.get(max_tokens_field)
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad(max_tokens_field, f"{max_tokens_field} must be an integer >= 1, got {json.dumps(max_tokens)}")
    request.max_tokens = max_tokens

    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or temperature < 0:
            raise bad("temperature", f"temperature must be a number >= 0 (0: greedy), got {json.dumps(temperature)}")
        request.temperature = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise bad("top_p", f"top_p must be a number in (0, 1], got {json.dumps(top_p)}")
        request.top_p = float(top_p)
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < -1:
            raise bad("top_k", f"top_k must be an integer >= 0 (0 or -1: off), got {json.dumps(top_k)}")
        request.top_k = max(top_k, 0)
    penalty = body.get("repetition_penalty")
    if penalty is not None:
        if not _is_number(penalty) or penalty <= 0:
            raise bad(
                "repetition_penalty", f"repetition_penalty must be a number > 0 (1: off), got {json.dumps(penalty)}"
            )
        request.repetition_penalty = float(penalty)

    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", f"stop must be a non-empty string or a list of them, got {json.dumps(stop)}")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS}")
    request.stop = list(stops)

    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise bad("seed", f"seed must be an integer in [0, 2**63), got {json.dumps(seed)}")
    request.seed = seed

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", f"stream must be true or false, got {json.dumps(stream)}")
    request.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad(
                "stream_options", f'stream_options must be {{"include_usage": true|false}}, got {json.dumps(options)}'
            )
        if not request.stream:
            raise bad("stream_options", "stream_options is only allowed with stream=true")
        usage = options.get("include_usage", False)
        if not isinstance(usage, bool):
            raise bad("stream_options", f"stream_options.include_usage must be true or false, got {json.dumps(usage)}")
        request.include_usage = usage
    return request


def parse_completion(body: dict, vocab_size: int) -> GenerationRequest:
    """POST /v1/completions: `prompt` is a string or a list of token ids (or a list of one of them)."""
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_NO_OP)
    if "prompt" not in body:
        raise bad("prompt", "prompt is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt:
            raise bad("prompt", "prompt is an empty list of token ids")
        if not all(_is_int(t) and 0 <= t < vocab_size for t in prompt):
            raise bad(
                "prompt",
                f"prompt must be a string or a list of token ids in [0, {vocab_size}); "
                "several prompts per request are not supported",
            )
    elif not isinstance(prompt, str):
        raise bad("prompt", f"prompt must be a string or a list of token ids, got {json.dumps(prompt)[:80]}")
    return _sampling(body, GenerationRequest(prompt=prompt))


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(
                    f"{where}.content[{j}]",
                    f'{where}.content[{j}]: only text parts ({{"type": "text", "text": ...}}) are supported',
                )
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts")


def parse_chat(body: dict) -> GenerationRequest:
    """POST /v1/chat/completions: `messages` of system, user and assistant roles with text content."""
    _check_fields(body, CHAT_FIELDS, CHAT_NO_OP)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content")
        unknown = [k for k in m if k not in MESSAGE_FIELDS]
        if unknown:
            raise bad(f"{where}.{unknown[0]}", f"{where}: unknown field {unknown[0]!r}", "unknown_field")
        role = m.get("role")
        if role == "developer":  # the newer name of the system role
            role = "system"
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
        checked.append({"role": role, "content": _message_text(m.get("content"), where)})
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    field_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _sampling(body, GenerationRequest(messages=checked), field_name)


# ------------------------------------------------------------------------------------------ answers


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Answer:
    """The objects of one answer: `chat` (chat.completion) or not (text_completion)."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")

    def _head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def chunk(
        self, text: str | None, finish_reason: str | None = None, first: bool = False, with_usage: bool = False
    ) -> dict:
        """One streamed chunk: text (chat: a delta, the first one with the role), or the end."""
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk with stream_options.include_usage: no choices, the counts."""
        return {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
        }


def sse(data: dict | str) -> str:
    """One server-sent event; JSON is written as UTF-8 text (ensure_ascii off: Chinese stays readable)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
