"""Torch datasets over packed tokens (pretraining) and instruction records (SFT)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from llama_zh.data.corpus import DataError

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


class SFTDataset(Dataset):
    """Examples as segments (ids, trained): labels are the trained segments' tokens, -100 elsewhere."""

    def __init__(self, examples: list[list[tuple[list[int], bool]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = [t for seg, _ in self.examples[i] for t in seg]
        labels = [t if trained else IGNORE_INDEX for seg, trained in self.examples[i] for t in seg]
        ids_t, labels_t = torch.tensor(ids), torch.tensor(labels)
        # Shift: position t predicts token t + 1.
        return {"input_ids": ids_t[:-1], "labels": labels_t[1:]}


def pad_collate(pad_id: int):
    """Right-pad a batch; padded label positions are ignored."""

    def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        for row, b in enumerate(batch):
            ids[row, : len(b["input_ids"])] = b["input_ids"]
            labels[row, : len(b["labels"])] = b["labels"]
        return {"input_ids": ids, "labels": labels}

    return collate
