"""Chat mode and Ctrl-C: it stops the answer being streamed (back to the prompt), and at the prompt
it ends the session cleanly (exit 0, no traceback)."""

import io
import os
import select
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from helpers import REPO
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.data.sft import Template
from llama_zh.generate import SamplingConfig
from llama_zh.stages import infer


class CharTokenizer:
    """One id per character ('<s>' 1, '</s>' 2)."""

    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [ord(c) for c in text] + [2] * eos

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 2)


class Lines:
    """stdin that gives `lines`, then raises KeyboardInterrupt (Ctrl-C at the prompt)."""

    def __init__(self, *lines):
        self.lines = list(lines)

    def readline(self):
        if not self.lines:
            raise KeyboardInterrupt
        return self.lines.pop(0)


def test_ctrl_c_stops_the_answer_then_ends_the_session(monkeypatch):
    calls = []

    def generate(model, ids, sampling, tokenizer=None):
        calls.append(ids)
        yield from (ord(c) for c in "abc")
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first answer streams
        yield from (ord(c) for c in "def")

    monkeypatch.setattr(infer, "stream_generate", generate)
    template = Template(
        "{% for m in messages %}{% if m.role == 'user' %}U:{{ m.content }}\n{% else %}"
        "{% generation %}{{ m.content }}\n{% endgeneration %}{% endif %}{% endfor %}"
    )
    model = SimpleNamespace(config=SimpleNamespace(max_seq_len=256))
    out = io.StringIO()
    try:
        history = infer.run_chat(
            model, CharTokenizer(), template, SamplingConfig(max_new_tokens=8), Lines("first\n", "second\n"), out
        )
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl-C escaped the chat loop; it had written {out.getvalue()!r}")
    assert history == [("second", "abcdef")]  # the stopped exchange is not kept
    text = out.getvalue()
    assert "abc\n(answer stopped)\n> " in text and "abcdef\n" in text
    assert text.count("> ") == 3 and text.endswith("> \n")  # back at the prompt twice; Ctrl-C there ends it
    assert "first" not in CharTokenizer().decode(calls[1])  # nor sent with the next question


@pytest.mark.slow
def test_sigint_at_the_chat_prompt_exits_cleanly(tmp_path):
    tok = train_tokenizer(tmp_path / "tok")
    path, _ = make_checkpoint(tmp_path / "ckpt", tok)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    args = [
        sys.executable,
        "-m",
        "llama_zh",
        "stage=infer",
        "stage.mode=chat",
        "template=chat",
        f"stage.checkpoint={path}",
        "stage.max_new_tokens=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
    )
    try:
        shown = b""
        deadline = time.monotonic() + 300
        while not shown.endswith(b"> ") and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                shown += os.read(proc.stdout.fileno(), 4096)
        assert shown.endswith(b"> "), shown.decode(errors="replace")[-2000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr
