"""Chat templates: Jinja text in the Hugging Face convention, the one source of the SFT layout.

The text an SFT example is trained on is the template rendered over the example's messages, and the
same Jinja text is written into the checkpoint and exported (HF `tokenizer_config.json`, GGUF
`tokenizer.chat_template`), so that serving formats a conversation exactly as training did.

Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja environment with
`trim_blocks`/`lstrip_blocks`, the variables `messages`, `bos_token`, `eos_token`,
`add_generation_prompt`, and `{% generation %}...{% endgeneration %}` around the text trained on.
Tokenizing also follows it: the whole rendered text at once, special-token strings (`<s>`, `</s>`)
taken as their ids and the text between them encoded piece by piece. A token is trained when any of
its characters lies inside a generation block (transformers' `return_assistant_tokens_mask`).

The packaged templates are the `*.jinja` files beside this module; `template=` picks one by name
(llama_zh/conf/template/*.yaml), or gives a custom one as inline text (`chat_template:`) or a file (`path:`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.ext
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_zh.errors import LlamaZhError

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
CHECKPOINT_KEY = "chat_template"  # the field in a native checkpoint's model_config.yaml
# Private-use characters that bracket generation blocks in the rendered text; removed before tokenizing.
_OPEN, _CLOSE = "\ue000", "\ue001"

Segment = tuple[list[int], bool]  # (ids, trained)


class TemplateError(LlamaZhError, ValueError):
    pass


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


class _GenerationMarks(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}`: the body, bracketed by markers when marks are on."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(
            self.call_method("_mark", [jinja2.nodes.Name("_marks", "load")]), [], [], body
        ).set_lineno(lineno)

    @staticmethod
    def _mark(marks, caller) -> str:
        text = caller()
        return _OPEN + text + _CLOSE if marks is True else text


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    # The settings transformers renders chat templates with: the same text must render the same here.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationMarks, jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    return env


@dataclass
class ChatTemplate:
    """A compiled chat template; `source` is the Jinja text that is rendered and exported."""

    source: str
    name: str = "custom"  # for messages: the template name or file
    # An Alpaca record's instruction and input become one user message joined by this.
    input_separator: str = "\n"
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise TemplateError(f"chat template {self.name}: empty")
        try:
            self._compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template {self.name}: line {e.lineno}: {e.message}") from None

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def named(cls, name: str, input_separator: str = "\n") -> ChatTemplate:
        """A packaged template (`template_names()`), or a `.jinja` file when `name` is a path to one."""
        name = str(name)
        if name.endswith(".jinja"):
            return cls.from_file(Path(name), input_separator)
        path = TEMPLATE_DIR / f"{name}.jinja"
        if not path.is_file():
            raise TemplateError(
                f"chat template {name!r}: unknown; expected one of {', '.join(template_names())} "
                f"or a path to a .jinja file"
            )
        return cls(path.read_text(encoding="utf-8"), name=name, input_separator=input_separator)

    @classmethod
    def from_file(cls, path: Path, input_separator: str = "\n") -> ChatTemplate:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TemplateError(f"chat template {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TemplateError(f"chat template {path}: unreadable ({e})") from None
        return cls(source, name=str(path), input_separator=input_separator)

    @classmethod
    def from_config(cls, cfg) -> ChatTemplate:
        """From a `template=` config: `name` (packaged) or `path` (a .jinja file) or `chat_template` (inline)."""
        keys = set(cfg.keys())
        unknown = keys - {"name", "path", "chat_template", "input_separator"}
        if unknown:
            raise TemplateError(
                f"template: unknown field(s) {', '.join(sorted(unknown))}; a template is a Jinja chat "
                f"template given by name, path or chat_template (and input_separator)"
            )
        separator = str(cfg.get("input_separator", "\n"))
        if cfg.get("chat_template"):
            return cls(
                str(cfg["chat_template"]),
                name=str(cfg.get("name") or "template.chat_template"),
                input_separator=separator,
            )
        if cfg.get("path"):
            return cls.from_file(Path(str(cfg["path"])), separator)
        if not cfg.get("name"):
            raise TemplateError(
                "template: give name (one of " + ", ".join(template_names()) + "), path or chat_template"
            )
        return cls.named(str(cfg["name"]), separator)

    # ------------------------------------------------------------------------------------ rendering

    def render(self, messages: list[dict], add_generation_prompt: bool = False, marks: bool = False) -> str:
        """The rendered text; with `marks`, generation blocks bracketed by private-use characters."""
        if marks:
            for m in messages:
                if _OPEN in m["content"] or _CLOSE in m["content"]:
                    raise TemplateError(
                        f"chat template {self.name}: a message holds U+E000/U+E001, which rendering reserves"
                    )
        try:
            return self._compiled.render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
                _marks=marks,
            )
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template {self.name}: {type(e).__name__}: {e}") from None

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt text of an Alpaca record (without the leading bos), ready for `encode(..., bos=True)`."""
        text = self.render(record_messages(instruction, input, self.input_separator), add_generation_prompt=True)
        return text.removeprefix(self.bos_token)

    def user_header(self) -> str:
        """The text a later user turn starts with, stripped ("User:" for chat): a stop string in chat mode."""
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        before = self.render(probe)
        after = self.render(probe + [{"role": "user", "content": _OPEN}])
        if not after.startswith(before) or _OPEN not in after:
            return ""
        return after[len(before) :].split(_OPEN)[0].replace(self.bos_token, "").strip()

    # ------------------------------------------------------------------------------------ tokenizing

    def encode(
        self, messages: list[dict], tokenizer, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered messages and, per token, whether it is trained on."""
        text = self.render(messages, add_generation_prompt, marks=True)
        plain, spans = _strip_marks(text)
        ids, offsets = _encode_with_offsets(plain, tokenizer, self.bos_token, self.eos_token)
        return ids, [_in_spans(begin, end, spans) for begin, end in offsets]

    def prompt_ids(self, messages: list[dict], tokenizer) -> list[int]:
        """Ids of the prompt for the next answer (no offsets needed: any tokenizer with `encode`)."""
        return encode_text(self.render(messages, add_generation_prompt=True), tokenizer, self.bos_token, self.eos_token)


def record_messages(instruction: str, input: str = "", separator: str = "\n", output: str | None = None) -> list[dict]:
    """An Alpaca record as messages: instruction and input are one user message."""
    messages = [{"role": "user", "content": instruction + separator + input if input else instruction}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


def _strip_marks(text: str) -> tuple[str, list[tuple[int, int]]]:
    plain, spans, start = [], [], None
    pos = 0
    for ch in text:
        if ch == _OPEN:
            start = pos
        elif ch == _CLOSE:
            spans.append((start, pos))
        else:
            plain.append(ch)
            pos += 1
    return "".join(plain), spans


def _in_spans(begin: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # A token without characters of its own (the dummy-prefix "▁", the leading bytes of a byte-fallback
    # character) counts where it starts.
    return any((begin < e and end > s) if end > begin else s <= begin < e for s, e in spans)


def _split_special(text: str, specials: dict[str, int]) -> list[tuple[int, str | int]]:
    """(character offset, text chunk or special id) in order, chunks never empty."""
    out, pos = [], 0
    while pos < len(text):
        found = [(text.find(s, pos), s) for s in specials if text.find(s, pos) >= 0]
        if not found:
            out.append((pos, text[pos:]))
            break
        at, s = min(found, key=lambda f: (f[0], -len(f[1])))
        if at > pos:
            out.append((pos, text[pos:at]))
        out.append((at, specials[s]))
        pos = at + len(s)
    return out


def encode_text(text: str, tokenizer, bos_token: str = "<s>", eos_token: str = "</s>") -> list[int]:
    """`text` as transformers tokenizes a rendered chat: special-token strings as ids, each chunk between encoded."""
    ids: list[int] = []
    for _, part in _split_special(text, {bos_token: tokenizer.bos_id, eos_token: tokenizer.eos_id}):
        ids += [part] if isinstance(part, int) else tokenizer.encode(part)
    return ids


def _encode_with_offsets(
    text: str, tokenizer, bos_token: str, eos_token: str
) -> tuple[list[int], list[tuple[int, int]]]:
    ids, offsets = [], []
    for at, part in _split_special(text, {bos_token: tokenizer.bos_id, eos_token: tokenizer.eos_id}):
        if isinstance(part, int):
            ids.append(part)
            token = bos_token if part == tokenizer.bos_id else eos_token
            offsets.append((at, at + len(token)))
            continue
        piece_ids, spans = tokenizer.encode_with_offsets(part)
        ids += piece_ids
        offsets += [(at + begin, at + end) for begin, end in spans]
    return ids, offsets


# ---------------------------------------------------------------------------------------------- export


def checkpoint_template(directory: Path) -> str | None:
    """The chat template a checkpoint directory carries: a native checkpoint's model_config.yaml field,
    else a tokenizer_config.json's `chat_template` (Hugging Face, or beside a tokenizer.json); None if none."""
    directory = Path(directory)
    native = directory / "model_config.yaml"
    if native.is_file():
        try:
            meta = yaml.safe_load(native.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return None  # the checkpoint reader reports a broken file
        text = meta.get(CHECKPOINT_KEY) if isinstance(meta, dict) else None
        if isinstance(text, str) and text.strip():
            return text
    # A Hugging Face directory's, or the one a byte-level BPE tokenizer brought into a native checkpoint.
    hf = directory / "tokenizer_config.json"
    if hf.is_file():
        import json

        try:
            text = json.loads(hf.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return text if isinstance(text, str) and text.strip() else None
    return None


def export_template(src: Path, override: str | None) -> str | None:
    """The chat template a conversion writes: `override` (a name or .jinja path) or the source's; logged."""
    if override:
        text = ChatTemplate.named(override).source
        log.info("chat template: %s (stage.template)", override)
        return text
    text = checkpoint_template(src) if Path(src).is_dir() else None
    if text is None:
        log.info("chat template: %s carries none, so none is exported (stage.template=<name> sets one)", src)
    else:
        log.info("chat template: the one %s was trained with", src)
    return text


def template_record(template: ChatTemplate) -> dict:
    """What a training stage writes into its native checkpoints' model_config.yaml: the template text."""
    return {CHECKPOINT_KEY: template.source}
