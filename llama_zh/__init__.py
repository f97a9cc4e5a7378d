"""llama_zh: build Chinese LLaMA models from one experiment-tracked framework."""

from llama_zh.checkpoint import save_checkpoint
from llama_zh.config import ModelConfig
from llama_zh.convert import load_checkpoint
from llama_zh.model import Transformer, build_model

__all__ = ["ModelConfig", "Transformer", "build_model", "load_checkpoint", "save_checkpoint"]
