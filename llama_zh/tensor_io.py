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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from llama_zh.atomic import AtomicOutput, write_text
from llama_zh.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES
from llama_zh.errors import LlamaZhError

Spec = tuple[torch.dtype, tuple[int, ...]]  # a tensor's dtype and shape, known before it is read


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


# ------------------------------------------------------------------------ checkpoint directories
# Shared by every format kept as safetensors files (native, Hugging Face): the reader of each format
# decides the names, these functions move the bytes.


class CheckpointDir(AtomicOutput):
    """A checkpoint directory built under a temporary name beside `path`, entered with `with`:
    locked, checked against `overwrite` (again before the rename), renamed into place by `commit()`
    and removed on any failure (llama_zh.atomic)."""

    def __init__(self, path: Path, overwrite: bool, need_bytes: int | None = None):
        super().__init__(
            Path(path), directory=True, overwrite=overwrite, need_bytes=need_bytes, exists_error=CheckpointError
        )


def stream_bytes(specs: dict[str, Spec]) -> int:
    """The bytes of the tensors of `specs`: what writing them needs on disk (headers aside)."""
    return sum(
        torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for dtype, shape in specs.values()
    )


def plan_shards(specs: dict[str, Spec], max_shard_bytes: int) -> list[list[str]]:
    """The names of `specs` cut, in order, into shards of at most `max_shard_bytes` (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for name, (dtype, shape) in specs.items():
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_safetensors_shards(
    directory: Path,
    specs: dict[str, Spec],
    tensors: Iterator[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    prefix: str = "model",
    rename: Callable[[str], str] = lambda n: n,
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream tensors into one or more safetensors files (+ an index when sharded), HF naming."""
    shards = plan_shards(specs, max_shard_bytes)
    files = (
        [f"{prefix}.safetensors"]
        if len(shards) == 1
        else [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    tensors = iter(tensors)
    for filename, names in zip(files, shards, strict=False):
        plan = [(rename(n), specs[n][0], specs[n][1]) for n in names]
        writer = SafetensorsWriter(directory / filename, plan, metadata)
        try:
            for expected in names:
                name, t = next(tensors)
                if name != expected:
                    raise CheckpointError(f"weight stream out of order: got {name}, expected {expected}")
                writer.write(rename(name), t)
                total += t.numel() * t.element_size()
                weight_map[rename(name)] = filename
                del t
            writer.close()
        except BaseException as e:
            writer.abort(e)
            raise
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text(directory / f"{prefix}.safetensors.index.json", json.dumps(index, indent=2))


def safetensors_files(directory: Path, prefix: str) -> list[Path]:
    """`prefix`.safetensors, or the shards its index lists (each checked present); [] when neither exists."""
    index = directory / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (directory / f).is_file():
                raise CheckpointError(f"{index}: lists {f}, which is missing")
        return [directory / f for f in files]
    single = directory / f"{prefix}.safetensors"
    return [single] if single.is_file() else []


def safetensors_stream(
    files: list[Path], rename: Callable[[str], str | None], transform=None
) -> tuple[dict[str, Spec], Callable]:
    """Specs and tensor generator over safetensors files; `rename` maps a file key to a native name (None: skip)."""
    entries: list[tuple[str, Path, str]] = []  # (native name, file, key in file), in file order
    specs: dict[str, Spec] = {}
    for f in files:
        header, _ = safetensors_header(f)
        for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            name = rename(key)
            if name is None:
                continue
            if name in specs:
                raise CheckpointError(f"{f}: tensor {key} maps to {name}, which another tensor already gave")
            specs[name] = (SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
            entries.append((name, f, key))

    def tensors():
        for f in files:
            mine = [(name, key) for name, ff, key in entries if ff == f]
            reader = iter_safetensors(f, [key for _, key in mine])
            for name, _ in mine:
                t = next(reader)[1]
                t = transform(name, t) if transform else t
                yield name, t
                del t  # a loop variable would keep it alive while the next tensor is read

    return specs, tensors


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
