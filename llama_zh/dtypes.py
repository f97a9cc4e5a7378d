"""The names of torch dtypes as configs, Lightning and safetensors spell them: one table each, here,
so that an option, a loader and a file format can never disagree about what a name means."""

from __future__ import annotations

import torch

# stage.dtype (convert), quant.compute_dtype, `python -m llama_zh.train.zero_checkpoint --dtype`: torch's own names.
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# trainer.precision (Lightning's names) -> the dtype the weights are held in for inference.
PRECISION_DTYPES = {
    "32": torch.float32,
    "32-true": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "16": torch.float16,
}

# The "dtype" codes of a safetensors header, in both directions.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def is_sixteen_bit(precision: str) -> bool:
    """Whether trainer.precision (Lightning's name) computes in 16 bits; an unknown name counts as fp32."""
    return PRECISION_DTYPES.get(str(precision), torch.float32).itemsize == 2


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the spelling of FLOAT_DTYPES and of config.json's torch_dtype."""
    return str(dtype).removeprefix("torch.")
