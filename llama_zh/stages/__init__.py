"""One module per stage, each with `run(cfg)`: a thin composition of the library's parts."""

import importlib

STAGES = ("prepare", "tokenizer", "convert", "pretrain", "sft", "dpo", "eval", "infer")


def run_stage(cfg):
    return importlib.import_module(f"llama_zh.stages.{cfg.stage.name}").run(cfg)
