"""One module per stage, each with `run(cfg)`: a thin composition of the library's parts."""

import importlib

STAGES = ("prepare", "tokenizer", "convert", "pretrain", "sft", "eval", "infer", "serve")


def run_stage(cfg):
    return importlib.import_module(f"llama_zh.stages.{cfg.stage.name}").run(cfg)
