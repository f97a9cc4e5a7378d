"""stage=infer: answers for a prompts file (batched), or an interactive multi-turn chat (stage.mode=chat).

mode=file: one prompt per line -> one answer per prompt followed by a blank line (the reference tool's
layout, docs/reference.md#recipe). Prompts are decoded `stage.batch_size` at a time, longest first (less padding);
the answers keep the file's order, and prompt i samples with seed + i, so the answers do not depend
on the batch size.

mode=chat: reads turns from stdin, streams each answer to stdout. The conversation is laid out as
SFT lays out multi-turn data (the template= chat template rendered over the conversation; chat is
the reference's `User: ...\nBot: ...`). The oldest exchanges are dropped,
counted in tokens, so that the conversation leaves room for stage.max_new_tokens. `clear` forgets
the conversation, `exit` (or end of input) quits. Ctrl-C while an answer streams stops that answer
(the exchange is not kept) and returns to the prompt; Ctrl-C at the prompt ends the session.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig

from llama_zh.atomic import AtomicOutput
from llama_zh.config import ConfigError
from llama_zh.data.corpus import DataError
from llama_zh.data.sft import Template
from llama_zh.generate import PromptTooLong, SamplingConfig, generate_batch, stream_generate
from llama_zh.infer.loader import load_for_stage
from llama_zh.model import Transformer
from llama_zh.stages import plain, quant_slice, trainer_slice
from llama_zh.tokenizer import Tokenizer

log = logging.getLogger(__name__)
MODES = ("file", "chat")
PRESETS = ("greedy", "reference")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "repetition_window", "penalty_after_filters")


# ------------------------------------------------------------------------------------------ shared setup


def sampling_config(stage: DictConfig) -> SamplingConfig:
    """stage.preset's values (greedy, or the reference tool's), overridden by every non-null stage key."""
    preset = stage.get("preset") or "greedy"
    if preset not in PRESETS:
        raise ConfigError(f"stage.preset: {preset!r}; expected one of {', '.join(PRESETS)}")
    values = {k: stage[k] for k in SAMPLING_KEYS if stage.get(k) is not None}
    values.update(
        max_new_tokens=stage.max_new_tokens,
        seed=stage.seed,
        stop_strings=list(stage.stop),
        long_prompt=stage.long_prompt,
    )
    try:
        return (
            SamplingConfig.reference(**values)
            if preset == "reference"
            else SamplingConfig(**{"temperature": 0.0, **values})
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for the non-empty lines of a UTF-8 file; invalid UTF-8 names the line."""
    if not path.is_file():
        raise DataError(f"stage.prompts: {path} does not exist")
    prompts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                prompts.append((lineno, line))
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty or blank)")
    return prompts


def run(cfg: DictConfig):
    stage = cfg.stage
    mode = stage.mode
    if mode not in MODES:
        raise ConfigError(f"stage.mode: {mode!r}; expected one of {', '.join(MODES)}")
    if not int(stage.batch_size) >= 1:
        raise ConfigError(f"stage.batch_size must be >= 1, got {stage.batch_size}")
    sampling = sampling_config(stage)
    if mode == "file":
        if not stage.get("prompts"):
            raise ConfigError("stage.prompts: a prompts file is needed in stage.mode=file (or use stage.mode=chat)")
        prompts = read_prompts(Path(stage.prompts))  # before loading the model: bad input fails fast
    rows = 1 if mode == "chat" else min(int(stage.batch_size), len(prompts))
    model, tokenizer, _ = load_for_stage(
        stage.checkpoint, trainer_slice(cfg), quant_slice(cfg), stage.backend, stage.prefix, rows
    )
    if mode == "chat":
        template = Template.from_config(plain(cfg.template))
        if stage.stop_at_user_turn:
            header = user_header(template)
            if header and header not in sampling.stop_strings:
                sampling.stop_strings.append(header)
        return run_chat(model, tokenizer, template, sampling, sys.stdin, sys.stdout)
    template = Template.from_config(plain(cfg.template)) if stage.apply_template else None
    return answer_file(
        model, tokenizer, prompts, sampling, Path(stage.output), int(stage.batch_size), template, str(stage.prompts)
    )


# ---------------------------------------------------------------------------------------------- file mode


def answer_file(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[tuple[int, str]],
    sampling: SamplingConfig,
    out: Path,
    batch_size: int,
    template: Template | None = None,
    source: str = "prompts",
) -> str:
    texts = [template.format(p) if template else p for _, p in prompts]
    ids = [tokenizer.encode(t, bos=True) for t in texts]
    max_len = model.config.max_seq_len
    if sampling.long_prompt == "fail":
        for (lineno, _), p in zip(prompts, ids, strict=False):
            if len(p) >= max_len:
                raise DataError(
                    f"{source}:{lineno}: prompt of {len(p)} tokens does not fit the context of "
                    f"{max_len} (stage.long_prompt=fail; truncate keeps its end)"
                )
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: padding stays small
    answers: list[list[int]] = [[] for _ in ids]
    seed = sampling.seed
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        seeds = [seed + i for i in batch] if seed is not None else None
        try:
            out_ids = generate_batch(model, [ids[i] for i in batch], sampling, tokenizer=tokenizer, seeds=seeds)
        except PromptTooLong as e:  # only if the check above was bypassed
            raise DataError(f"{source}:{prompts[batch[e.row]][0]}: {e}") from None
        for i, new in zip(batch, out_ids, strict=False):
            answers[i] = new
        log.info("[%d/%d] prompts answered", min(b + batch_size, len(order)), len(order))
    elapsed = time.perf_counter() - start
    new_tokens = sum(map(len, answers))

    with AtomicOutput(out, mode="w", encoding="utf-8", lock=False) as written:
        for (lineno, prompt), new in zip(prompts, answers, strict=False):
            answer = tokenizer.decode(new)
            written.file.write(answer + "\n\n")
            log.debug("line %d: %s -> %s", lineno, prompt[:40], answer[:80].replace("\n", " "))
    log.info(
        "%d answers, %d new tokens in %.1f s (%.1f tokens/s, batch size %d): %s",
        len(prompts),
        new_tokens,
        elapsed,
        new_tokens / max(elapsed, 1e-9),
        batch_size,
        out,
    )
    return str(out)


# ---------------------------------------------------------------------------------------------- chat mode


def user_header(template: Template) -> str:
    """The text a user turn starts with (`User:` in the chat template), stripped; "" if none."""
    return template.user_header()


def chat_prompt_ids(
    history: list[tuple[str, str]], user_text: str, template: Template, tokenizer: Tokenizer, budget: int
) -> tuple[list[int], int]:
    """The conversation's ids for the next answer and how many of the oldest exchanges were dropped.

    Laid out as SFT lays out conversations: the chat template rendered over the history and the new
    user turn, with its generation prompt, tokenized whole. Whole exchanges are dropped, oldest first,
    until it fits in `budget` tokens; a new turn too long alone keeps its last tokens.
    """
    exchanges = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in history]
    turn = [{"role": "user", "content": user_text}]
    for dropped in range(len(exchanges) + 1):
        ids = template.prompt_ids([m for ex in exchanges[dropped:] for m in ex] + turn, tokenizer)
        if len(ids) <= budget:
            return ids, dropped
    return ids[:1] + ids[len(ids) - budget + 1 :], len(exchanges)  # bos stays


def run_chat(
    model: Transformer,
    tokenizer: Tokenizer,
    template: Template,
    sampling: SamplingConfig,
    stdin: TextIO,
    stdout: TextIO,
) -> list[tuple[str, str]]:
    """The interactive loop; returns the conversation since the last `clear`."""
    history: list[tuple[str, str]] = []
    stdout.write(
        "chat: type a message; `clear` forgets the conversation, `exit` or Ctrl-C quits; "
        "Ctrl-C during an answer stops it\n"
    )
    try:
        _chat_turns(model, tokenizer, template, sampling, stdin, stdout, history)
    except KeyboardInterrupt:  # Ctrl-C anywhere but in an answer: the user is leaving, not a failure
        stdout.write("\n")
    stdout.flush()
    return history


def _chat_turns(
    model: Transformer,
    tokenizer: Tokenizer,
    template: Template,
    sampling: SamplingConfig,
    stdin: TextIO,
    stdout: TextIO,
    history: list[tuple[str, str]],
) -> None:
    max_len = model.config.max_seq_len
    budget = max(max_len - sampling.max_new_tokens, max_len // 2)
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if text == "exit":
            break
        if text == "clear":
            history.clear()
            stdout.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        try:
            ids, dropped = chat_prompt_ids(history, text, template, tokenizer, budget)
            if dropped:
                log.info("chat: %d oldest exchange(s) no longer fit the context and were dropped", dropped)
            answer = stream_answer(model, tokenizer, ids, sampling, stdout)
        except KeyboardInterrupt:
            # A cut-off answer would be laid out as a finished one (eos after it) in the next prompt.
            stdout.write("\n(answer stopped)\n")
            continue
        history.append((text, answer.strip()))


def stream_answer(
    model: Transformer, tokenizer: Tokenizer, ids: list[int], sampling: SamplingConfig, stdout: TextIO
) -> str:
    """Generate one answer, writing its text to `stdout` as it comes; returns the whole answer."""
    new: list[int] = []
    shown = ""
    for token in stream_generate(model, ids, sampling, tokenizer=tokenizer):
        new.append(token)
        text_so_far = tokenizer.decode(new)
        # A character split across byte tokens decodes as U+FFFD until its last byte: wait for it.
        if not text_so_far.endswith("\ufffd") and text_so_far.startswith(shown):
            stdout.write(text_so_far[len(shown) :])
            stdout.flush()
            shown = text_so_far
    answer = tokenizer.decode(new)
    stdout.write(answer[len(shown) :] + "\n")
    stdout.flush()
    return answer
