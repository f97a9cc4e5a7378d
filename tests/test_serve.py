"""stage=serve: the OpenAI-compatible server, with the real openai client (httpx for raw bodies),
on tiny checkpoints; servers run in-process on a free port of 127.0.0.1, and once as `python -m
llama_zh stage=serve` stopped by SIGTERM."""

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from helpers import REPO
from omegaconf import OmegaConf
from serve_models import SPLIT_TEXT, InProcessServer, chain_model, slow_steps

from llama_zh.checkpoint import save_checkpoint
from llama_zh.config import ConfigError
from llama_zh.data.chat_template import ChatTemplate, template_record
from llama_zh.generate import SamplingConfig, generate
from llama_zh.infer import load
from llama_zh.infer.engine import Engine
from llama_zh.infer.server import ServeOptions, create_app
from llama_zh.stages import serve

KEY = "test-key"
MAX_CONCURRENT, MAX_QUEUE = 4, 8
PROMPTS = ["你好", "这个手机很好用，电池也耐用", "质量不好", "价格便宜，物流很快", "屏幕", "包装也好", "客服", "快递"]
MESSAGES = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint[0]


@pytest.fixture(scope="module")
def reference(checkpoint):
    """A copy of the served model for llama_zh's own answers (the server's copy belongs to its engine thread)."""
    return load(checkpoint)[0]


@pytest.fixture(scope="module")
def served(checkpoint):
    model, tokenizer, _ = load(checkpoint)
    engine = Engine(model, tokenizer, max_concurrent=MAX_CONCURRENT, max_queue=MAX_QUEUE).start()
    options = ServeOptions(model_name="tiny-zh", api_key=KEY, template=ChatTemplate.named("chat"))
    server = InProcessServer(create_app(engine, tokenizer, options))
    yield server, engine
    server.close()
    engine.stop()


@pytest.fixture
def url(served):
    return served[0].url


@pytest.fixture
def engine(served):
    return served[1]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(n, **kw):
    return SamplingConfig(temperature=0.0, max_new_tokens=n, **kw)


def own_answer(model, tok, prompt, n):
    return generate(model, tok.encode(prompt, bos=True), greedy(n), tokenizer=tok)


def idle(engine, timeout=15.0, **expected):
    """Wait until the engine runs nothing (and its counts reach `expected`); returns its stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == 0 and stats["queued"] == 0 and all(stats[k] >= v for k, v in expected.items()):
            return stats
        assert time.monotonic() < deadline, f"the engine did not settle: {stats}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------- answers


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["tiny-zh"]
    assert client.models.retrieve("tiny-zh").id == "tiny-zh"


def test_completion_streamed_equals_whole_equals_own_greedy_answer(client, reference, tok):
    ids = tok.encode(PROMPTS[1], bos=True)
    own = generate(reference, ids, greedy(16), tokenizer=tok)
    whole = client.completions.create(model="tiny-zh", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny-zh",
            prompt=PROMPTS[1],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text == streamed == tok.decode(own)
    assert whole.choices[0].finish_reason == "length" and whole.object == "text_completion"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        len(ids),
        16,
        len(ids) + 16,
    )
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump() and not chunks[-1].choices


def test_chat_streamed_equals_whole_equals_own_greedy_answer(client, reference, tok):
    template = ChatTemplate.named("chat")
    ids = template.prompt_ids(MESSAGES, tok)
    own = generate(reference, ids, greedy(12, stop_strings=[template.user_header()]), tokenizer=tok)
    whole = client.chat.completions.create(model="tiny-zh", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(model="tiny-zh", messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert whole.choices[0].message.content == streamed == tok.decode(own)
    assert whole.choices[0].message.role == "assistant" and chunks[0].choices[0].delta.role == "assistant"
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == len(own) == 12
    assert whole.usage.total_tokens == len(ids) + 12


def test_stop_strings(client, reference, tok):
    full = tok.decode(own_answer(reference, tok, PROMPTS[0], 16))
    stop = full[5:7]
    whole = client.completions.create(
        model="tiny-zh", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop, "不会出现"]
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-zh", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop, stream=True
        )
    )
    assert whole.choices[0].text == streamed == full[: full.index(stop)]
    assert whole.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    ask = dict(
        model="tiny-zh", prompt=PROMPTS[2], max_tokens=12, temperature=1.2, top_p=0.9, seed=3, extra_body={"top_k": 40}
    )
    assert client.completions.create(**ask).choices[0].text == client.completions.create(**ask).choices[0].text


def test_concurrent_requests_each_get_their_solo_answer(url, engine, reference, tok):
    budgets = [8 + i for i in range(len(PROMPTS))]  # 8 at once: 4 run, 4 wait, rows leave at different steps
    expected = [tok.decode(own_answer(reference, tok, p, n)) for p, n in zip(PROMPTS, budgets, strict=False)]

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        answers = await asyncio.gather(
            *(
                client.completions.create(model="tiny-zh", prompt=p, max_tokens=n, temperature=0)
                for p, n in zip(PROMPTS, budgets, strict=False)
            )
        )
        await client.close()
        return [a.choices[0].text for a in answers]

    assert asyncio.run(main()) == expected
    assert idle(engine)["free_slots"] == MAX_CONCURRENT


def test_streamed_chinese_never_splits_a_character(tok):
    prompt = "价格"
    answer = tok.encode(SPLIT_TEXT)
    model = chain_model(tok, tok.encode(prompt, bos=True), answer)
    engine = Engine(model, tok).start()
    server = InProcessServer(create_app(engine, tok, ServeOptions(model_name="chain")))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chunks = [
            c.choices[0].text
            for c in client.completions.create(model="chain", prompt=prompt, max_tokens=40, temperature=0, stream=True)
        ]
        whole = client.completions.create(model="chain", prompt=prompt, max_tokens=40, temperature=0)
    finally:
        server.close()
        engine.stop()
    assert not any("\ufffd" in c for c in chunks) and len([c for c in chunks if c]) > 3
    assert "".join(chunks) == whole.choices[0].text == SPLIT_TEXT
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == len(answer)


# -------------------------------------------------------------------------------------- bad input

COMPLETION = {"model": "tiny-zh", "prompt": "你好", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "tiny-zh", "messages": MESSAGES, "max_tokens": 4}
BAD = [
    # (path, body (bytes: sent as is), status, param, code)
    ("/v1/completions", b'{"prompt": "x",', 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/completions", {**COMPLETION, "frobnicate": 1}, 400, "frobnicate", "unknown_field"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -3}, 400, "max_tokens", None),
    ("/v1/completions", {**COMPLETION, "temperature": -0.5}, 400, "temperature", None),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {**COMPLETION, "n": 2}, 400, "n", "unsupported_value"),
    ("/v1/completions", {**COMPLETION, "logprobs": 5}, 400, "logprobs", "unsupported_value"),
    ("/v1/completions", {**COMPLETION, "seed": -1}, 400, "seed", None),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": "好" * 300}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 500}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "tiny-zh"}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        400,
        "messages[0].tool_calls",
        "unknown_field",
    ),
    ("/v1/chat/completions", {**CHAT, "tools": []}, 400, "tools", "unknown_field"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "好" * 300}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
]


def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(url, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=60) as http:
        for path, body, status, param, code in BAD:
            sent = dict(content=body) if isinstance(body, bytes) else dict(json=body)
            r = http.post(path, headers={**auth, "Content-Type": "application/json"}, **sent)
            error = r.json()["error"]
            assert (r.status_code, error["param"], error["code"]) == (status, param, code), (path, body, error)
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = http.post("/v1/completions", headers=headers, json=COMPLETION)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401
        r = http.get("/v1/nothing", headers=auth)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert client.completions.create(**COMPLETION).choices[0].finish_reason == "length"


def test_documented_no_op_fields_are_accepted(client):
    client.completions.create(
        **COMPLETION,
        user="u",
        n=1,
        logprobs=None,
        echo=False,
        best_of=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
    )
    client.chat.completions.create(**CHAT, user="u", n=1, logprobs=False, response_format={"type": "text"})


def test_client_gone_mid_stream_cancels_its_sequence_and_frees_the_slot(url, engine, monkeypatch):
    slow_steps(monkeypatch, engine, 0.05)  # 100 tokens take 5 s: the client leaves long before
    before = idle(engine)
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        with http.stream("POST", "/v1/completions", json={**COMPLETION, "max_tokens": 100, "stream": True}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data:"))
            assert '"text_completion"' in first and engine.stats()["running"] == 1
        # A request awaiting a whole answer whose client gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**COMPLETION, "max_tokens": 100}, timeout=0.5)
    after = idle(engine, cancelled=before["cancelled"] + 2)
    assert after["completed"] == before["completed"] and after["free_slots"] == MAX_CONCURRENT


def test_a_hundred_requests_past_the_cap_are_queued_or_refused(url, engine, reference, tok, monkeypatch):
    gate = threading.Event()  # the engine makes no progress until every request is queued or refused
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: gate.wait() and real_step())
    before = idle(engine)
    expected = {p: tok.decode(own_answer(reference, tok, p, 6)) for p in PROMPTS}

    async def main():
        async with httpx.AsyncClient(
            base_url=url,
            timeout=120,
            limits=httpx.Limits(max_connections=100),
            headers={"Authorization": f"Bearer {KEY}"},
        ) as http:

            async def one(i):
                prompt = PROMPTS[i % len(PROMPTS)]
                r = await http.post("/v1/completions", json={**COMPLETION, "prompt": prompt, "max_tokens": 6})
                return prompt, r.status_code, r.json()

            tasks = [asyncio.create_task(one(i)) for i in range(100)]
            try:
                while engine.stats()["refused"] < before["refused"] + 100 - MAX_CONCURRENT - MAX_QUEUE:
                    await asyncio.sleep(0.02)
            finally:
                gate.set()
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        gate.set()
    statuses = [status for _, status, _ in results]
    assert statuses.count(200) == MAX_CONCURRENT + MAX_QUEUE and statuses.count(429) == 100 - MAX_CONCURRENT - MAX_QUEUE
    for prompt, status, body in results:
        if status == 200:
            assert body["choices"][0]["text"] == expected[prompt]
        else:
            assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"]
    assert idle(engine)["free_slots"] == MAX_CONCURRENT


# --------------------------------------------------------------------------------------- the stage


def test_api_key_env_must_name_a_set_variable(monkeypatch):
    monkeypatch.delenv("LLAMA_ZH_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="LLAMA_ZH_TEST_KEY"):
        serve.api_key(OmegaConf.create({"api_key_env": "LLAMA_ZH_TEST_KEY"}))
    monkeypatch.setenv("LLAMA_ZH_TEST_KEY", "k")
    assert serve.api_key(OmegaConf.create({"api_key_env": "LLAMA_ZH_TEST_KEY"})) == "k"
    assert serve.api_key(OmegaConf.create({"api_key_env": None})) is None


def test_a_port_in_use_is_refused_naming_it():
    taken = serve.bind("127.0.0.1", 0)
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            serve.bind("127.0.0.1", port)
    finally:
        taken.close()


def test_connections_on_the_bound_address_send_small_writes_at_once():
    """Each streamed chunk is a small write; with Nagle's algorithm on, a chunk after the response
    headers waits for the client's delayed ACK (about 40 ms on Linux), which once held every token of
    a short answer back until the end. asyncio (hence uvicorn) turns Nagle off on accepted sockets
    only when the listening socket says it is TCP."""
    sock = serve.bind("127.0.0.1", 0)

    async def nodelay_of_an_accepted_connection():
        accepted = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(accepted, 10)
            writer.close()
            return value
        finally:
            server.close()
            await server.wait_closed()

    try:
        assert asyncio.run(nodelay_of_an_accepted_connection()) != 0
    finally:
        sock.close()


def test_stage_serve_answers_with_the_checkpoint_template_and_exits_0_on_sigterm(tok, reference, tmp_path):
    chat = ChatTemplate.named("chat")  # recorded in the checkpoint; template= (alpaca by default) is the fallback
    path = tmp_path / "sft"
    save_checkpoint(reference, path, tokenizer=tok.path, extra=template_record(chat))
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", LLAMA_ZH_API_KEY=KEY)
    args = [
        sys.executable,
        "-m",
        "llama_zh",
        "stage=serve",
        f"stage.checkpoint={path}",
        "stage.port=0",
        "stage.api_key_env=LLAMA_ZH_API_KEY",
        "stage.model_name=served",
        "stage.max_prefill_tokens=77",
        "stage.prefill_layout=packed",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output = []
    try:
        deadline = time.monotonic() + 180
        while not (m := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", "".join(output))):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(output)
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        client = openai.OpenAI(base_url=m.group(1), api_key=KEY, max_retries=2, timeout=60)
        assert [model.id for model in client.models.list().data] == ["served"]
        page = httpx.get(m.group(1).removesuffix("/v1") + "/", timeout=60)  # stage.web defaults to true
        assert page.status_code == 200 and "<title>llama_zh chat</title>" in page.text
        answer = client.chat.completions.create(model="served", messages=MESSAGES, max_tokens=8, temperature=0)
        own = generate(
            reference, chat.prompt_ids(MESSAGES, tok), greedy(8, stop_strings=[chat.user_header()]), tokenizer=tok
        )
        assert answer.choices[0].message.content == tok.decode(own)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    while not lines.empty():
        output.append(lines.get())
    assert "server stopped" in "".join(output) and "Traceback" not in "".join(output)
    assert "prefill up to 77 tokens a round (packed)" in "".join(output)  # the stage's settings reach the engine
