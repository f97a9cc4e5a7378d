"""Chinese vocabulary extension, measured: (a) tokens per character, (b) which init of the new rows starts lower.

Run by hand (about 15 minutes on 2 idle CPU cores; a rerun with the same --workdir reuses the
pretrained base model). Figures of both parts: experiments/README.md, "Vocabulary extension".

    python experiments/vocab_extension.py [--workdir DIR] [--pretrain-steps 600] [--tune-steps 100]

There is no LLaMA tokenizer here (no network). Its stand-in, the "base": an 8000-piece BPE with byte
fallback (train_sentencepiece, as for LLaMA's) trained on English that ships with Python itself, the
docstrings of the standard library's modules (via `ast`) and the documentation topics of
`pydoc_data.topics`. Chinese falls to UTF-8 bytes with it, as it largely does with LLaMA's.
The Chinese pieces: the 8000-piece sample_zh tokenizer exactly as `python -m llama_zh` builds it
(llama_zh/conf/tokenizer/sample_zh.yaml on the training split of llama_zh/conf/data/sample_zh.yaml).
Held-out text: the sha1 rule of llama_zh.data.corpus, for the Chinese sources and the English alike.

(a) tokens per character and byte-fallback shares of base, sample_zh, base+sample_zh (llama_zh's scores)
    and base+sample_zh with Chinese-LLaMA-Alpaca's score 0, on each held-out source; how many held-out
    English documents change ids under each extension.
(b) a tiny model (llama_zh/conf/model/tiny.yaml) pretrained from scratch on the base tokenizer, alternating
    English and Chinese batches (Chinese as bytes, as LLaMA saw it); resized to base+sample_zh with
    each init; held-out loss at step 0, then while training on Chinese with the new tokenizer, either
    the embedding and head only (Chinese-LLaMA's stage 1) or the whole model.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import platform
import random
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics

import torch

from llama_zh import ModelConfig, build_model, load_checkpoint, save_checkpoint
from llama_zh.config import from_mapping, group_defaults
from llama_zh.data.corpus import is_held_out, read_documents
from llama_zh.data.datasets import PackedDataset
from llama_zh.data.packing import token_dtype
from llama_zh.data.prepare import DataConfig, prepare_corpus, sources_of
from llama_zh.eval.perplexity import perplexity
from llama_zh.tokenizer import Tokenizer, train_sentencepiece
from llama_zh.train.module import causal_lm_loss, lr_factor
from llama_zh.vocab import INITS, extend_tokenizer, load_model_proto, resize_checkpoint, tokenizer_report

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN, BATCH, EVAL_DOCS = 256, 8, 400


def english_documents() -> list[str]:
    """Paragraphs of the stdlib's docstrings and of Python's documentation topics, whitespace folded."""
    texts = list(topics.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.rglob("*.py")):
        if {"site-packages", "test", "tests"} & set(f.parts):
            continue
        try:
            tree = ast.parse(f.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                texts.append(ast.get_docstring(node) or "")
    paragraphs = (" ".join(p.split()) for text in texts for p in text.split("\n\n"))
    return [p for p in paragraphs if len(p.split()) > 3]


def build_tokenizers(work: Path, english_train: list[str], data_cfg) -> dict[str, Path]:
    corpus = prepare_corpus(data_cfg)
    (work / "en.train.txt").write_text("\n".join(english_train) + "\n", encoding="utf-8")
    base = train_sentencepiece(work / "en.train.txt", work / "base.model", vocab_size=8000)
    train = group_defaults("tokenizer", "sample_zh")["train"]
    files = ",".join(str(corpus / f"{s.name}.train.txt") for s in sources_of(data_cfg))
    sample = train_sentencepiece(files, work / "sample_zh.model", **train)
    report = extend_tokenizer(base, sample, work / "extended.model")
    print(f"extension: {report.to_dict()}")
    # Chinese-LLaMA-Alpaca's variant: the same pieces, every appended one with score 0.
    proto = load_model_proto(work / "extended.model")
    for p in proto.pieces[report.base_size :]:
        p.score = 0.0
    (work / "extended_score0.model").write_bytes(proto.SerializeToString())
    return {
        "base": base,
        "sample_zh": sample,
        "base+sample_zh": work / "extended.model",
        "base+sample_zh, score 0": work / "extended_score0.model",
    }


def part_a(tokenizers: dict[str, Path], held_out: dict[str, list[str]]) -> list[dict]:
    print(
        "\n(a) held-out text: tokens per character, tokens per UTF-8 byte, % of tokens that are byte pieces, "
        "% of characters spelled in bytes"
    )
    print(
        f"| {'text':<10} | {'tokenizer':<24} | {'pieces':>6} | {'tok/char':>8} | {'tok/byte':>8} | "
        f"{'byte tok %':>10} | {'byte char %':>11} |"
    )
    print(f"|{'-' * 12}|{'-' * 26}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 13}|")
    rows = []
    for text_name, docs in held_out.items():
        for tok_name, path in tokenizers.items():
            r = tokenizer_report(path, docs)
            rows.append({"text": text_name, "tokenizer": tok_name, "pieces": Tokenizer(path).vocab_size, **r})
            print(
                f"| {text_name:<10} | {tok_name:<24} | {Tokenizer(path).vocab_size:>6} | "
                f"{r['tokens_per_char']:>8.3f} | {r['tokens_per_byte']:>8.3f} | "
                f"{100 * r['byte_token_share']:>10.1f} | {100 * r['byte_char_share']:>11.1f} |"
            )
    base = Tokenizer(tokenizers["base"]).encode_batch(held_out["english"])
    for name in ("base+sample_zh", "base+sample_zh, score 0"):
        tok = Tokenizer(tokenizers[name])
        ids = tok.encode_batch(held_out["english"])
        changed = [(a, b) for a, b in zip(ids, base, strict=False) if a != b]
        pieces = Counter(tok.sp.IdToPiece(i) for a, b in changed for i in set(a) - set(b))
        print(
            f"held-out English documents whose ids differ from the base's, {name}: {len(changed)} of {len(base)}; "
            f"pieces most often new in them: {', '.join(f'{p!r} {n}' for p, n in pieces.most_common(8))}"
        )
    return rows


def packed(docs: list[str], tokenizer: Tokenizer, path: Path) -> PackedDataset:
    """`<s> doc </s>` back to back, in memory (the same layout as a packed shard); `path` names it."""
    tokens, _ = tokenizer.documents_encoder().encode(docs, token_dtype(tokenizer.vocab_size))
    return PackedDataset(tokens, SEQ_LEN, str(path))


def batches(dataset: PackedDataset, seed: int):
    """Endless batches of random windows, the same sequence for a given seed."""
    rng = random.Random(seed)
    while True:
        windows = [dataset[rng.randrange(len(dataset))] for _ in range(BATCH)]
        yield torch.stack([w["input_ids"] for w in windows]), torch.stack([w["labels"] for w in windows])


def train(model, streams, steps: int, lr: float, params=None, warmup: int = 20):
    """AdamW (decay on matrices only), warmup + cosine; the batch streams are taken in turn."""
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, steps, 0.1))
    model.train()
    for step in range(steps):
        x, y = next(streams[step % len(streams)])
        loss = causal_lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        yield step + 1, loss.item()
    model.eval()


def eval_loss(model, dataset: PackedDataset) -> float:
    """Nats per token over the whole packed held-out text, in back-to-back windows of SEQ_LEN."""
    return perplexity(model, [dataset.tokens], SEQ_LEN, batch_size=BATCH)["loss"]


def held_out_loss(model, dataset: PackedDataset, tokens_per_char: float) -> str:
    loss = eval_loss(model, dataset)
    return f"{loss:.3f} ({loss * tokens_per_char / math.log(2):.2f} bits/char)"


def part_b(
    work: Path,
    tokenizers: dict[str, Path],
    train_docs: dict[str, list[str]],
    held_out: dict[str, list[str]],
    pretrain_steps: int,
    tune_steps: int,
    seed: int,
) -> None:
    base_tok, ext_tok = Tokenizer(tokenizers["base"]), Tokenizer(tokenizers["base+sample_zh"])
    zh_half = len(train_docs["chinese"]) // 2  # pretraining and tuning see different Chinese documents
    eval_zh = held_out["news"][:EVAL_DOCS] + held_out["reviews"][:EVAL_DOCS]
    eval_en = held_out["english"][:EVAL_DOCS]
    # tokens per character of the packed eval text (with <s> and </s>), to turn nats per token into bits per character
    tpc = {
        (name, which): (sum(map(len, tok.encode_batch(docs))) + 2 * len(docs)) / sum(map(len, docs))
        for name, tok in (("base", base_tok), ("ext", ext_tok))
        for which, docs in (("zh", eval_zh), ("en", eval_en))
    }
    data = {
        "base zh eval": packed(eval_zh, base_tok, work / "eval_zh.base.bin"),
        "base en eval": packed(eval_en, base_tok, work / "eval_en.base.bin"),
        "ext zh eval": packed(eval_zh, ext_tok, work / "eval_zh.ext.bin"),
        "ext en eval": packed(eval_en, ext_tok, work / "eval_en.ext.bin"),
        "pretrain en": packed(train_docs["english"], base_tok, work / "pretrain_en.bin"),
        "pretrain zh": packed(train_docs["chinese"][:zh_half], base_tok, work / "pretrain_zh.bin"),
        "tune zh": packed(train_docs["chinese"][zh_half:], ext_tok, work / "tune_zh.bin"),
    }
    print(
        f"\n(b) model {ModelConfig.from_name('tiny').to_dict()}, seq {SEQ_LEN}, batch {BATCH}; held-out eval: "
        f"{len(eval_zh)} Chinese documents (news + reviews), {len(eval_en)} English; loss = nats per token"
    )
    checkpoint, done = work / "base-ckpt", work / "base-ckpt.json"
    recipe = {"pretrain_steps": pretrain_steps, "seed": seed, "tokenizer_sha256": base_tok.sha256()}
    if done.is_file() and json.loads(done.read_text()) == recipe:
        model, _ = load_checkpoint(checkpoint)
        print(f"pretrained base model of an earlier run reused: {checkpoint} ({recipe})")
    else:
        model = build_model(ModelConfig.from_name("tiny").with_vocab(base_tok.vocab_size), seed=seed)
        start = time.perf_counter()
        streams = [batches(data["pretrain en"], seed), batches(data["pretrain zh"], seed + 1)]
        for step, loss in train(model, streams, pretrain_steps, lr=1e-3):
            if step % 100 == 0 or step == pretrain_steps:
                print(f"pretrain step {step}: train loss {loss:.3f} ({time.perf_counter() - start:.0f} s)")
        done.unlink(missing_ok=True)
        save_checkpoint(model, checkpoint, tokenizer=tokenizers["base"])
        done.write_text(json.dumps(recipe))
    print(
        "base model, base tokenizer: "
        f"Chinese held-out {held_out_loss(model, data['base zh eval'], tpc['base', 'zh'])}, "
        f"English held-out {held_out_loss(model, data['base en eval'], tpc['base', 'en'])}"
    )

    checkpoints = {
        init: resize_checkpoint(
            checkpoint, tokenizers["base+sample_zh"], work / f"resized-{init}", init=init, seed=seed, overwrite=True
        )
        for init in INITS
    }
    print(f"\nstep 0 after resizing to {ext_tok.vocab_size} pieces, base+sample_zh tokenizer:")
    for init, path in checkpoints.items():
        resized, _ = load_checkpoint(path)
        print(
            f"  {init:<14} Chinese held-out {held_out_loss(resized, data['ext zh eval'], tpc['ext', 'zh'])}, "
            f"English held-out {held_out_loss(resized, data['ext en eval'], tpc['ext', 'en'])}"
        )

    marks = sorted({s for s in (10, 25, 50, tune_steps) if s <= tune_steps})
    for regime in ("embeddings", "full"):
        trained = "embed + head only, the rest frozen" if regime == "embeddings" else "every parameter"
        print(
            f"\ntuning on Chinese with the new tokenizer, {regime} ({trained}), "
            f"lr 1e-3, {tune_steps} steps: Chinese held-out loss at steps {marks}, English held-out at the end"
        )
        for init, path in checkpoints.items():
            resized, _ = load_checkpoint(path)
            params = (
                [resized.embed.weight, resized.head.weight] if regime == "embeddings" else list(resized.parameters())
            )
            for p in resized.parameters():
                p.requires_grad_(any(p is q for q in params))
            losses = []
            for step, _ in train(
                resized, [batches(data["tune zh"], seed + 2)], tune_steps, lr=1e-3, params=params, warmup=10
            ):
                if step in marks:
                    resized.eval()
                    losses.append(eval_loss(resized, data["ext zh eval"]))
                    resized.train()
            en = eval_loss(resized, data["ext en eval"])
            print(
                f"  {init:<14} "
                + "  ".join(f"{s}: {loss:.3f}" for s, loss in zip(marks, losses, strict=False))
                + f"   English {en:.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep the tokenizers and checkpoints here")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--tune-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tokens-only", action="store_true", help="part (a) only: the tokenizer table, no training")
    parser.add_argument("--json", type=Path, default=None, help="also write part (a)'s rows to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vocab_extension-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"python {platform.python_version()}; "
        f"torch {torch.__version__}; {torch.get_num_threads()} threads; workdir {work}"
    )

    english = english_documents()
    data_cfg = from_mapping(DataConfig, group_defaults("data", "sample_zh") | {"dir": str(work / "sample_zh")}, "data")
    tokenizers = build_tokenizers(work, [d for d in english if not is_held_out(d)], data_cfg)
    corpus = prepare_corpus(data_cfg)
    held_out = {s.name: list(read_documents(corpus / f"{s.name}.val.txt")) for s in sources_of(data_cfg)}
    held_out["english"] = [d for d in english if is_held_out(d)]
    print(
        f"English: {len(english) - len(held_out['english'])} training paragraphs, {len(held_out['english'])} held out, "
        f"{sum(map(len, english)) / 1e6:.2f} M characters"
    )
    rows = part_a(tokenizers, held_out)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(args.json)
    if args.tokens_only:
        return

    chinese = [d for s in sources_of(data_cfg) for d in read_documents(corpus / f"{s.name}.train.txt")]
    random.Random(args.seed).shuffle(chinese)
    train_docs = {"english": [d for d in english if not is_held_out(d)], "chinese": chinese}
    part_b(work, tokenizers, train_docs, held_out, args.pretrain_steps, args.tune_steps, args.seed)


if __name__ == "__main__":
    main()
