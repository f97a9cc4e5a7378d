"""The chat page of stage=serve (llama_zh/infer/static), in a real headless browser: the system's
chromium driven by playwright, against a server on a free port of 127.0.0.1 with a tiny model.

The page's answers are checked against the API's own answers to the same messages (greedy), and
its requests against what it was asked to send. Chromium is not a pip package: without it these
tests fail, saying how to install it (README: Test)."""

from __future__ import annotations

import fnmatch
import os
import shutil
import time

import httpx
import openai
import pytest
from helpers import REPO
from omegaconf import OmegaConf
from serve_models import InProcessServer, slow_steps
from tiny_checkpoints import make_checkpoint

from llama_zh.config import ConfigError
from llama_zh.data.chat_template import ChatTemplate
from llama_zh.infer import load
from llama_zh.infer.engine import Engine
from llama_zh.infer.server import ServeOptions, create_app
from llama_zh.stages import serve

KEY = "page-key"
MODEL = "tiny-zh"
STEP_S = 0.03  # each decoding step is slowed by this much, so that a stream is seen growing
TIMEOUT_MS = 30_000  # every wait in the browser is bounded by this
QUESTIONS = ["你好，请介绍一下你自己。", "这个手机怎么样？", "给我讲一个很长的故事"]
INSTALL = "apt-get install -y chromium"


def chromium_path() -> str:
    path = os.environ.get("LLAMA_ZH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            f"the chat page tests need the system's chromium, and none is installed: run `{INSTALL}` "
            f"(Debian/Ubuntu, as root), or set LLAMA_ZH_CHROMIUM to a chromium binary",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('the chat page tests need playwright: pip install -e ".[test]"', pytrace=False)
    with sync_playwright() as p:
        # --no-sandbox: chromium refuses to run as root with its sandbox (CI containers run as root).
        browser = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tok, tmp_path_factory):
    checkpoint, _ = make_checkpoint(tmp_path_factory.mktemp("page"), tok)
    model, tokenizer, _ = load(checkpoint)
    engine = Engine(model, tokenizer, max_concurrent=2, max_queue=4).start()
    options = ServeOptions(
        model_name=MODEL,
        api_key=KEY,
        template=ChatTemplate.named("chat"),
        static_dir=serve.page_dir(OmegaConf.create({"web": True, "static_dir": None})),
    )
    server = InProcessServer(create_app(engine, tokenizer, options))
    yield server.url, engine
    server.close()
    engine.stop()


@pytest.fixture
def engine(served, monkeypatch):
    engine = served[1]
    slow_steps(monkeypatch, engine, STEP_S)
    return engine


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


class ChatPage:
    """The page in a fresh browser context; every request it makes is recorded."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests = []
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.goto(url + "/")
        # The page asks for the model name on load and opens Settings itself when the server wants a key;
        # interacting before that answer would race it (a click on Settings could close what it opened).
        self.page.wait_for_function("() => document.getElementById('model-name').textContent !== '\u2026'")

    def chat_bodies(self) -> list[dict]:
        return [r.post_data_json for r in self.requests if r.url.endswith("/v1/chat/completions")]

    def set(self, field: str, value) -> None:
        if not self.page.locator("#settings").evaluate("d => d.open"):
            self.page.click("#settings summary")
        self.page.fill(f"#{field}", str(value))
        self.page.locator(f"#{field}").dispatch_event("change")

    def unlock(self) -> None:
        self.set("api-key", KEY)
        self.page.wait_for_function(f"() => document.getElementById('model-name').textContent === {MODEL!r}")

    def ask(self, question: str) -> None:
        self.page.fill("#question", question)
        self.page.press("#question", "Enter")

    def answers(self) -> list[str]:
        return self.page.eval_on_selector_all(".msg.assistant .content", "els => els.map(e => e.textContent)")

    def wait_idle(self) -> None:
        self.page.wait_for_selector("#send:not([disabled])")
        self.page.wait_for_selector(".msg.streaming", state="detached")

    def watch_answer_lengths(self) -> None:
        """Record the length of the newest answer at every change the page makes to the transcript."""
        self.page.evaluate("""() => {
            window.answerLengths = [];
            new MutationObserver(() => {
                const all = document.querySelectorAll('.msg.assistant .content');
                if (all.length) window.answerLengths.push(all[all.length - 1].textContent.length);
            }).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});
        }""")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def chat(browser, served, engine):
    page = ChatPage(browser, served[0])
    yield page
    page.close()


def api_answer(client, messages, max_tokens) -> str:
    return (
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, top_p=0.9)
        .choices[0]
        .message.content
    )


def idle(engine, timeout=15.0) -> dict:
    deadline = time.monotonic() + timeout
    while (stats := engine.stats())["running"] or stats["queued"]:
        assert time.monotonic() < deadline, f"the engine did not settle: {stats}"
        time.sleep(0.02)
    return stats


# ------------------------------------------------------------------------------------------ tests


def test_the_page_is_served_at_root_as_utf8_and_loads_nothing_from_elsewhere(browser, served):
    url = served[0]
    with httpx.Client(base_url=url, timeout=30) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert '<meta charset="utf-8">' in page.text
        for asset in ("/chat.js", "/chat.css"):
            assert http.get(asset).status_code == 200, asset
        assert http.get("/v1/models").status_code == 401  # the API still asks for its key
    chat = ChatPage(browser, url)
    try:
        chat.page.wait_for_load_state("networkidle")
        assert chat.page.evaluate("() => document.characterSet") == "UTF-8"
        assert chat.page.get_by_placeholder("输入问题，Enter 发送，Shift+Enter 换行").is_visible()
        assert [r.url for r in chat.requests if not r.url.startswith(url + "/")] == []
    finally:
        chat.close()


def test_a_missing_key_is_shown_then_the_model_name_and_a_streamed_chinese_answer(chat, client, engine):
    error = chat.page.locator("#error")
    error.wait_for(state="visible")
    assert "401" in error.inner_text() and "API key" in error.inner_text()
    assert chat.page.locator("#settings").evaluate("d => d.open")  # opened where the key goes
    chat.unlock()
    assert error.is_hidden()

    chat.set("temperature", 0)
    chat.set("max-tokens", 40)
    chat.watch_answer_lengths()
    chat.ask(QUESTIONS[0])
    chat.wait_idle()

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    expected = api_answer(client, messages, 40)
    assert chat.answers() == [expected] and len(expected) > 10
    lengths = chat.page.evaluate("() => window.answerLengths")
    grown = [n for n in lengths if 0 < n]
    assert len(set(grown)) >= 5 and grown == sorted(grown) and grown[0] < len(expected), lengths
    body = chat.chat_bodies()[-1]
    assert body["messages"] == messages and body["stream"] is True
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == (MODEL, 0, 0.9, 40)
    assert "seed" not in body
    assert chat.page.locator(".msg.user .content").all_inner_texts() == [QUESTIONS[0]]


def test_each_turn_sends_the_whole_conversation_with_the_system_prompt(chat, client):
    chat.unlock()
    chat.set("temperature", 0)
    chat.set("max-tokens", 16)
    chat.ask(QUESTIONS[0])
    chat.wait_idle()
    chat.set("system", "你是一个乐于助人的助手。")
    chat.set("seed", 7)
    chat.ask(QUESTIONS[1])
    chat.wait_idle()

    first, second = chat.chat_bodies()
    answer = chat.answers()[0]
    assert first["messages"] == [{"role": "user", "content": QUESTIONS[0]}]
    expected_messages = [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    assert second["messages"] == expected_messages and second["seed"] == 7
    assert chat.answers() == [api_answer(client, first["messages"], 16), api_answer(client, expected_messages, 16)]


def test_stop_ends_the_answer_and_the_server_cancels_its_sequence(chat, engine):
    before = idle(engine)
    chat.unlock()
    chat.set("temperature", 0)
    chat.set("max-tokens", 100)  # 100 slowed steps: 3 s at least, far longer than the wait below
    chat.ask(QUESTIONS[2])
    chat.page.wait_for_function("() => document.querySelector('.msg.assistant .content').textContent.length > 3")
    assert chat.page.locator("#send").is_disabled()
    chat.page.click("#stop")
    chat.wait_idle()

    assert chat.page.locator(".msg.assistant .note").inner_text() == "(stopped)"
    after = idle(engine)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert after["free_slots"] == before["free_slots"]
    stopped = chat.answers()[0]
    time.sleep(10 * STEP_S)
    assert chat.answers() == [stopped] and chat.page.locator("#stop").is_disabled()
    assert chat.page.locator("#error").is_hidden()


def test_clear_empties_the_transcript_and_the_history(chat):
    chat.unlock()
    chat.set("max-tokens", 4)
    chat.ask(QUESTIONS[0])
    chat.wait_idle()
    assert chat.page.locator("#transcript > li").count() == 2
    chat.page.click("#clear")
    assert chat.page.locator("#transcript > li").count() == 0
    chat.ask(QUESTIONS[1])
    chat.wait_idle()
    assert chat.chat_bodies()[-1]["messages"] == [{"role": "user", "content": QUESTIONS[1]}]


def test_a_server_error_is_shown_and_the_question_given_back(chat):
    chat.unlock()
    chat.set("max-tokens", 5000)  # beyond the tiny model's 128-token context
    chat.ask(QUESTIONS[0])
    error = chat.page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text().startswith("400") and "max_tokens" in error.inner_text()
    assert "context" in error.inner_text()
    assert chat.page.locator("#transcript > li").count() == 0
    assert chat.page.input_value("#question") == QUESTIONS[0]

    chat.set("max-tokens", 4)
    chat.set("api-key", "wrong")
    chat.page.wait_for_function("() => document.getElementById('model-name').textContent === 'unknown'")
    with chat.page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as response:
        chat.ask(QUESTIONS[0])
    assert response.value.status == 401
    chat.wait_idle()
    assert error.inner_text() == "401 Unauthorized: incorrect API key — enter the API key in Settings."
    assert chat.page.locator("#transcript > li").count() == 0


def test_stage_web_false_serves_the_api_only(served, tok):
    assert serve.page_dir(OmegaConf.create({"web": True, "static_dir": None})) == serve.PAGE_DIR
    assert (serve.PAGE_DIR / "index.html").is_file()
    assert serve.page_dir(OmegaConf.create({"web": False, "static_dir": None})) is None
    with pytest.raises(ConfigError, match="stage.web must be true or false"):
        serve.page_dir(OmegaConf.create({"web": "yes", "static_dir": None}))
    with pytest.raises(ConfigError, match="stage.static_dir: /nonexistent"):
        serve.page_dir(OmegaConf.create({"web": True, "static_dir": "/nonexistent"}))
    engine = served[1]
    api_only = InProcessServer(create_app(engine, tok, ServeOptions(model_name=MODEL, static_dir=None)))
    try:
        with httpx.Client(base_url=api_only.url, timeout=30) as http:
            page = http.get("/")
            assert page.status_code == 404 and page.json()["error"]["type"] == "not_found"
            assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
    finally:
        api_only.close()


def test_the_page_is_package_data():
    """A non-editable install carries the page only if pyproject.toml names its files."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib: Python 3.11+")
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llama_zh.infer"]
    files = [p.relative_to(serve.PAGE_DIR.parent).as_posix() for p in serve.PAGE_DIR.iterdir()]
    assert {"static/index.html", "static/chat.js", "static/chat.css"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
