"""Lightning DataModules: packed pretraining windows and instruction records."""

from __future__ import annotations

import random
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader

from llama_zh.data.corpus import DataError
from llama_zh.data.datasets import SFTDataset, packed_shards, pad_collate
from llama_zh.data.prepare import prepare_tokens
from llama_zh.data.sft import Template, load_records, tokenize_record
from llama_zh.tokenizer import Tokenizer


class PretrainData(pl.LightningDataModule):
    def __init__(self, data_cfg: DictConfig, tokenizer: Tokenizer, seed: int = 0):
        super().__init__()
        self.cfg, self.tokenizer, self.seed = data_cfg, tokenizer, seed

    def prepare_data(self) -> None:
        prepare_tokens(self.cfg, self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        files = prepare_tokens(self.cfg, self.tokenizer)  # no-op once prepared
        self.splits = {
            split: ConcatDataset([packed_shards(shards, self.tokenizer, self.cfg.seq_len, f"{source}.{split}")
                                  for source, shards in by_source.items()])
            for split, by_source in files.items()
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits[split], batch_size=self.cfg.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.cfg.num_workers, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)


class InstructionData(pl.LightningDataModule):
    """Alpaca records -> (prompt, response) token pairs; a held-out slice of the train file for validation."""

    def __init__(self, train_file: Path, template: Template, tokenizer: Tokenizer, max_len: int, batch_size: int,
                 val_fraction: float = 0.02, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.train_file, self.template, self.tokenizer = Path(train_file), template, tokenizer
        self.max_len, self.batch_size, self.val_fraction = max_len, batch_size, val_fraction
        self.seed, self.num_workers = seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        records = load_records(self.train_file)
        examples = [tokenize_record(r, self.template, self.tokenizer, self.max_len) for r in records]
        random.Random(self.seed).shuffle(examples)
        n_val = max(1, int(len(examples) * self.val_fraction)) if len(examples) > 1 else 0
        if len(examples) - n_val < 1:
            raise DataError(f"{self.train_file}: too few records to train on")
        self.val, self.train = SFTDataset(examples[:n_val]), SFTDataset(examples[n_val:])

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else self.tokenizer.eos_id
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=pad_collate(pad),
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)
