"""Tensor files read and written one tensor at a time.

Why not `safetensors.torch.save_file`/`load_file`: they hold every tensor of a file in memory at
once, and `safe_open` maps the file, so every page read stays resident. Converting a 7B model with
them peaks at one or two full copies. Here the safetensors header is written first from the planned
names, dtypes and shapes, then each tensor is appended as it is produced, and reads go straight
into each tensor's own buffer: this module holds one tensor at a time and never a second copy
of it (figures from experiments/convert_memory.py in experiments/README.md). The files are ordinary
safetensors, read back by the `safetensors` library in the tests.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from llama_zh.atomic import AtomicOutput
from llama_zh.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES
from llama_zh.errors import LlamaZhError


class CheckpointError(LlamaZhError, RuntimeError):
    """A weight file that is missing, unreadable, unsafe or does not fit the model."""


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section), every entry checked against the file's size.

    A truncated or damaged file fails here, before a conversion has written anything.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, truncated or empty)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header of {n} bytes, file of {size})"
                )
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a table of tensors)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = int(np.prod(shape, dtype=np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name}: malformed header entry {entry!r}") from e
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; readable: {', '.join(SAFETENSORS_DTYPES)}")
        if (
            not 0 <= begin <= end
            or end - begin != numel * torch.empty(0, dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        ):
            raise CheckpointError(f"{path}: tensor {name}: data_offsets {[begin, end]} do not fit {dtype} {shape}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} needs bytes up to {8 + n + end}, the file has {size}"
            )
    return header, 8 + n


def iter_safetensors(path: Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order (or in `names` order), reading each tensor alone."""
    path = Path(path)
    header, data_start = safetensors_header(path)
    order = list(names) if names is not None else sorted(header, key=lambda k: header[k]["data_offsets"][0])
    with open(path, "rb") as f:
        for name in order:
            entry = header[name]
            begin, end = entry["data_offsets"]
            f.seek(data_start + begin)
            raw = bytearray(end - begin)  # read straight into the tensor's buffer: no second copy
            if f.readinto(raw) != end - begin:
                raise CheckpointError(f"{path}: truncated data for tensor {name}")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            t = t.reshape(entry["shape"])
            del raw  # held by `t` alone, so this frame keeps nothing once the consumer drops it
            yield name, t
            del t


class SafetensorsWriter:
    """Writes a safetensors file whose tensors arrive one by one, in the planned order.

    Writes under a temporary name and renames on `close()` (llama_zh.atomic), so a failed conversion
    leaves no file that looks complete; the caller holds the lock of the directory written into.
    """

    def __init__(
        self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ):
        self.path = Path(path)
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._expected = []
        for name, dtype, shape in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((name, dtype, tuple(shape)))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._out = AtomicOutput(self.path, mode="wb", lock=False).begin()
        self.tmp = self._out.tmp
        try:
            self._out.file.write(struct.pack("<Q", len(blob)) + blob)
        except BaseException as e:
            self._out.abort(e)
            raise
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, exp_dtype, exp_shape):
            raise CheckpointError(
                f"{self.path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                f"planned {exp_name} {exp_dtype} {exp_shape}"
            )
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._out.file.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes, no copy
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            self._out.abort()
            raise CheckpointError(f"{self.path}: only {self._next} of {len(self._expected)} tensors written")
        try:
            self._out.commit()
        except BaseException as e:
            self._out.abort(e)
            raise

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the temporary file; a full disk behind `exc` is raised as a one-line error."""
        self._out.abort(exc)


def torch_load_weights(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A pickled state dict, with code execution refused (`weights_only=True`).

    `mmap=True` keeps tensors on disk until touched (zip-format files); old-format pickles fall back
    to a full load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):
                state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: keep only what was refused.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        what = next((line for line in lines if "global" in line.lower()), lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{path}: refused to load: the pickle holds more than tensors ({what})") from e
    except Exception as e:  # corrupt zip, truncated file, not a pickle
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state
