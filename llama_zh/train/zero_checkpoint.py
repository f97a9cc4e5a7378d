"""A DeepSpeed ZeRO training state (stage 1-3, any number of ranks) as a native `WeightStream`.

The fp32 master weights live in the optimizer shards, as flat vectors per rank. Every file is
opened memory-mapped, and each tensor is cut out of the shards only when the writer asks for it,
so consolidating a 7B state needs about one tensor of RAM, not a copy of the model (DeepSpeed's
own zero_to_fp32 concatenates the ZeRO-1/2 partitions into one full vector first).

Layouts (from the files DeepSpeed writes; `W` ranks):
- stage 1/2: per parameter group, the group's parameters back to back (plus the alignment padding
  recorded per parameter), the whole cut into W equal consecutive partitions, one per rank.
- stage 3: every parameter cut into W pieces of ceil(numel / W); rank r holds piece r of each, back
  to back over all its sub-groups.
- Frozen parameters (LoRA's base weights) are not in the optimizer: stage 1/2 keep them whole in
  `frozen_param_fragments`, stage 3 one piece per rank there.

LoRA adapters (`<linear>.lora_a/.lora_b` beside `<linear>.base.weight`) are merged into the
native weight as it streams out.

Command line: `python -m llama_zh.train.zero_checkpoint STATE_DIR OUT_DIR [--dtype bfloat16]`.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from llama_zh.checkpoint import WeightStream, expected_specs, write_native
from llama_zh.config import ModelConfig, from_mapping
from llama_zh.dtypes import FLOAT_DTYPES
from llama_zh.errors import LlamaZhError
from llama_zh.tokenizer import find_tokenizer
from llama_zh.train.callbacks import STATE_META

PREFIX = "model."  # the LightningModule holds the Transformer as `model`


def _load(path: str) -> dict:
    """A DeepSpeed state file, with pickled code refused: only tensors, containers and the plain
    DeepSpeed data classes its optimizer files record (the ZeRO stage enum, the loss scalers, the
    fragment addresses of ZeRO-1/2 flat groups) may be built."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it names {unsupported.group(1)}" if unsupported else str(e).splitlines()[0]
        raise LlamaZhError(f"{path}: refused to unpickle: {why}, which is not a tensor or plain state") from None


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _slice(parts: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of the virtual concatenation of `parts` (copies only those)."""
    pieces, offset = [], 0
    for part in parts:
        n = part.numel()
        lo, hi = max(start, offset), min(start + length, offset + n)
        if lo < hi:
            pieces.append(part.reshape(-1)[lo - offset : hi - offset])
        offset += n
        if offset >= start + length:
            break
    if sum(p.numel() for p in pieces) != length:
        raise LlamaZhError(f"ZeRO state: elements {start}..{start + length} run past the shards")
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()


def _tag_dir(path: Path) -> Path:
    """The directory holding the *_states.pt files, from a step directory, a `state` directory or itself."""
    path = Path(path)
    for candidate in (path / "state", path):
        latest = candidate / "latest"
        if latest.is_file():
            return candidate / latest.read_text().strip()
    if glob.glob(str(path / "*_optim_states.pt")):
        return path
    raise LlamaZhError(f"{path}: not a DeepSpeed state (no `latest` file nor *_optim_states.pt)")


class ZeroState:
    """Lazy accessor to the full fp32 tensors of a ZeRO state, by the module's parameter names."""

    def __init__(self, tag_dir: Path):
        optim_files = sorted(glob.glob(str(tag_dir / "*_optim_states.pt")), key=_natural)
        model_files = sorted(glob.glob(str(tag_dir / "*_model_states.pt")), key=_natural)
        if not optim_files or not model_files:
            raise LlamaZhError(f"{tag_dir}: no *_optim_states.pt / *_model_states.pt files")
        self.optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
        model0 = _load(model_files[0])
        self.stage = int(self.optim[0]["zero_stage"])
        count = self.optim[0]["partition_count"]
        self.world = max(count) if isinstance(count, list) else int(count)
        if self.world != len(self.optim):
            raise LlamaZhError(
                f"{tag_dir}: written by {self.world} ranks but {len(self.optim)} optimizer shards found "
                "(an incomplete or overwritten state)"
            )
        self.locate: dict[str, Callable[[], torch.Tensor]] = {}
        self.shapes: dict[str, torch.Size] = {}
        if self.stage <= 2:
            self._index_stage12(model0)
        else:
            self._index_stage3(model0)
        self._index_frozen(model0, [_load(f) for f in model_files] if self.stage == 3 else [model0])
        self.client_state = {k: v for k, v in model0.items() if k in ("global_step", "epoch", "llama_zh_counters")}

    def _index_stage12(self, model0: dict) -> None:
        groups = [o["single_partition_of_fp32_groups"] for o in self.optim]  # [rank][group]
        paddings = self.optim[0].get("param_alignment_paddings")
        for g, shapes in enumerate(model0["param_shapes"]):
            parts = [groups[r][g] for r in range(self.world)]  # consecutive partitions of the group
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self.shapes[name] = torch.Size(shape)
                self.locate[name] = lambda parts=parts, offset=offset, numel=numel, shape=shape: _slice(
                    parts, offset, numel
                ).view(shape)
                offset += numel + (paddings[g][i] if paddings else 0)

    def _index_stage3(self, model0: dict) -> None:
        flats = [o["fp32_flat_groups"] for o in self.optim]  # [rank][sub-group]
        shapes: dict[str, torch.Size] = {}
        for group in model0["param_shapes"]:  # every rank's model states carry all the shapes
            shapes.update(group)
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            piece = math.ceil(numel / self.world)
            self.shapes[name] = torch.Size(shape)
            self.locate[name] = lambda offset=offset, piece=piece, numel=numel, shape=shape: torch.cat(
                [_slice(flats[r], offset, piece) for r in range(self.world)]
            )[:numel].view(shape)
            offset += piece

    def _index_frozen(self, model0: dict, model_states: list[dict]) -> None:
        for name, shape in (model0.get("frozen_param_shapes") or {}).items():
            numel = math.prod(shape)
            self.shapes[name] = torch.Size(shape)
            if self.stage <= 2:
                self.locate[name] = lambda name=name, shape=shape: (
                    model0["frozen_param_fragments"][name].clone().view(shape)
                )
            else:
                self.locate[name] = lambda name=name, shape=shape, numel=numel: torch.cat(
                    [s["frozen_param_fragments"][name].reshape(-1) for s in model_states]
                )[:numel].view(shape)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.locate:
            raise LlamaZhError(f"ZeRO state: no parameter {name}")
        return self.locate[name]()


def read_zero(path: Path, config: ModelConfig | None = None, tokenizer: Path | None = None) -> WeightStream:
    """The native weights of a llama_zh training state written under a ZeRO strategy."""
    path = Path(path)
    step_dir = path if (path / STATE_META).is_file() else path.parent if (path.parent / STATE_META).is_file() else None
    if config is None:
        if step_dir is None:
            raise LlamaZhError(f"{path}: no {STATE_META} beside the DeepSpeed state; pass the model config")
        meta_file = step_dir / STATE_META
        config = from_mapping(
            ModelConfig, json.loads(meta_file.read_text())["model"], f"{meta_file}: model", what="field"
        )
    if tokenizer is None and step_dir is not None:
        tokenizer = find_tokenizer(step_dir)
    state = ZeroState(_tag_dir(path))
    names = state.shapes

    def native(name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        lora = f"{PREFIX}{module}.lora_a"
        if leaf == "weight" and lora in names:  # merge W + (alpha/r) B A
            base = state.tensor(f"{PREFIX}{module}.base.weight")
            delta = state.tensor(f"{PREFIX}{module}.lora_b") @ state.tensor(lora)
            return base + delta * _lora_scale(step_dir)
        return state.tensor(PREFIX + name)

    specs = {n: (torch.float32, s) for n, s in expected_specs(config).items()}
    missing = [
        n for n in specs if PREFIX + n not in names and f"{PREFIX}{n.rpartition('.')[0]}.base.weight" not in names
    ]
    if missing:
        raise LlamaZhError(f"{path}: the ZeRO state lacks {', '.join(missing[:4])} for the model config it names")

    def tensors():
        for name in specs:
            t = native(name)
            yield name, t
            del t

    return WeightStream(config, specs, tensors, tokenizer, source=str(path))


def _lora_scale(step_dir: Path | None) -> float:
    meta = json.loads((step_dir / STATE_META).read_text()) if step_dir else {}
    lora = meta.get("lora")
    if not lora:
        raise LlamaZhError(f"{step_dir}: LoRA weights found but no `lora` (rank, alpha) in {STATE_META}")
    return float(lora["alpha"]) / float(lora["rank"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("state", type=Path, help="a step-NNNNNN training state directory (or its state/ inside)")
    parser.add_argument("output", type=Path, help="native checkpoint directory to write")
    parser.add_argument("--dtype", choices=list(FLOAT_DTYPES), default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        stream = read_zero(args.state).cast(FLOAT_DTYPES.get(args.dtype))
        out = write_native(stream, args.output, overwrite=args.overwrite)
    except LlamaZhError as e:
        print(f"llama_zh: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
