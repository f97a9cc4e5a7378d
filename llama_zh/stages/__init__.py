"""One module per stage, each with `run(cfg)`: a thin composition of the library's parts."""

import importlib

STAGES = ("convert", "pretrain", "sft", "eval", "infer", "tokenizer")


def run_stage(cfg):
    return importlib.import_module(f"llama_zh.stages.{cfg.stage.name}").run(cfg)
