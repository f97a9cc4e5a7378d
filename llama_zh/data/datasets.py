"""Torch datasets over packed tokens (pretraining) and instruction records (SFT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from llama_zh.data.corpus import DataError
from llama_zh.data.packing import load_tokens
from llama_zh.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value cross_entropy skips


class PackedDataset(Dataset):
    """Consecutive windows of `seq_len` + 1 tokens: inputs are the first `seq_len`, labels the last."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "tokens"):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{name}: {len(tokens)} tokens, fewer than one sequence of {seq_len} + 1")
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}


def packed_shards(shards: list[Path], tokenizer: Tokenizer, seq_len: int, name: str) -> ConcatDataset:
    """One PackedDataset per shard, concatenated (windows never span two shards).

    A shard's last partial window is dropped, as is a shard shorter than one window: under
    `seq_len` tokens per shard, nothing at the usual shard sizes.
    """
    tokens = [load_tokens(Path(p), tokenizer) for p in shards]
    parts = [PackedDataset(t, seq_len, str(p)) for p, t in zip(shards, tokens, strict=False) if len(t) >= seq_len + 1]
    if not parts:
        raise DataError(
            f"{name}: {sum(map(len, tokens))} tokens in {len(shards)} shards, "
            f"fewer than one sequence of {seq_len} + 1 in any shard"
        )
    return ConcatDataset(parts)


def _example_tokens(example: list[tuple[list[int], bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels): labels are the trained segments' tokens, -100 elsewhere (not yet shifted)."""
    ids = [t for seg, _ in example for t in seg]
    labels = [t if trained else IGNORE_INDEX for seg, trained in example for t in seg]
    return ids, labels


class SFTDataset(Dataset):
    """Examples as segments (ids, trained): labels are the trained segments' tokens, -100 elsewhere."""

    def __init__(self, examples: list[list[tuple[list[int], bool]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = _example_tokens(self.examples[i])
        ids_t, labels_t = torch.tensor(ids), torch.tensor(labels)
        # Shift: position t predicts token t + 1.
        return {"input_ids": ids_t[:-1], "labels": labels_t[1:]}


class PackedSFTDataset(Dataset):
    """Packs of whole examples (llama_zh.data.sft.pack_examples) as one sequence each, with
    `segment_ids` (the example's index in the pack) and `positions` (from 0 in each example) for the
    model's block-diagonal attention.

    Each example's labels are shifted within the example: its last token predicts nothing (not the
    next example's first token), so the trained positions and their targets are exactly those of
    the examples unpacked. The pack's last token is only a label, as in SFTDataset."""

    def __init__(self, packs: list[list[list[tuple[list[int], bool]]]]):
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels, segments, positions = [], [], [], []
        for index, example in enumerate(self.packs[i]):
            example_ids, example_labels = _example_tokens(example)
            ids += example_ids
            labels += example_labels[1:] + [IGNORE_INDEX]
            segments += [index] * len(example_ids)
            positions += range(len(example_ids))
        return {
            "input_ids": torch.tensor(ids[:-1]),
            "labels": torch.tensor(labels[:-1]),
            "segment_ids": torch.tensor(segments[:-1]),
            "positions": torch.tensor(positions[:-1]),
        }


# Fill values of the per-token fields a batch may carry. Padding is a segment (-1) of its own:
# it attends to itself only, and no example attends to it.
PAD_VALUES = {"labels": IGNORE_INDEX, "segment_ids": -1, "positions": 0}


def pad_collate(pad_id: int):
    """Right-pad a batch; padded label positions are ignored."""

    def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        out = {}
        for key in batch[0]:
            column = torch.full((len(batch), length), PAD_VALUES.get(key, pad_id), dtype=torch.long)
            for row, b in enumerate(batch):
                column[row, : len(b[key])] = b[key]
            out[key] = column
        return out

    return collate
