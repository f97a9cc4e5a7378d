"""The README's picture of the chat page (docs/chat_page.png): a real `python -m llama_zh stage=serve`,
the page in headless chromium (the system's, as tests/test_chat_page.py drives it), two Chinese
questions typed and sent, a third typed, then a screenshot.

    python -m llama_zh                 # the default job: the tiny model, 300 steps on the sample corpus
    python experiments/chat_page_screenshot.py --checkpoint outputs/pretrain/latest/checkpoints/final

Chinese in the picture needs a CJK font on the system (Debian: fonts-wqy-zenhei or fonts-noto-cjk);
without one chromium draws boxes. The tiny model of the default job has only been pretrained (no
instruction tuning): its answers are Chinese-looking continuations, not replies. Sampling is seeded
(--seed, the page's Seed field), so a rerun on the same checkpoint and machine draws the same answers.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["你好，请介绍一下北京。", "那上海呢？"]
TYPED = "这个手机的电池怎么样？"


def start_server(checkpoint: Path, run_dir: Path) -> tuple[subprocess.Popen, str]:
    """The stage in a subprocess on a free port; returns it and the page's address, read from its log."""
    args = [
        sys.executable,
        "-m",
        "llama_zh",
        "stage=serve",
        f"stage.checkpoint={checkpoint}",
        "stage.port=0",
        "stage.model_name=tiny-zh",
        "template=chat",
        "stage.access_log=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    log, deadline = "", time.monotonic() + 180
    while not (m := re.search(r"web page at (http://\S+/)", log)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start:\n{log}")
        try:
            log += lines.get(timeout=1)
        except queue.Empty:
            pass
    return proc, m.group(1)


def screenshot(url: str, out: Path, chromium: str, seed: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 760, "height": 540}, color_scheme="light")
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-zh'")
        page.click("#settings summary")
        page.fill("#system", "你是一个乐于助人的中文助手。")
        page.fill("#temperature", "0.8")
        page.fill("#max-tokens", "48")
        page.fill("#seed", str(seed))
        for question in QUESTIONS:
            page.fill("#question", question)
            page.press("#question", "Enter")
            page.wait_for_selector(".msg.streaming", state="detached")
        page.click("#settings summary")  # folded again: the conversation is the picture
        page.fill("#question", TYPED)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        for item in page.locator("#transcript > li").all_inner_texts():
            print(item.replace("\n", " | "))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "chat_page.png")
    parser.add_argument("--seed", type=int, default=2, help="the page's Seed field")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    if not Path(args.chromium).is_file():
        raise SystemExit(f"--chromium: {args.chromium} does not exist (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as run_dir:
        proc, url = start_server(args.checkpoint.resolve(), Path(run_dir))
        try:
            screenshot(url, args.out, args.chromium, args.seed)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
