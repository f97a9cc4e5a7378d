"""Lightning DataModules: packed pretraining windows and instruction records."""

from __future__ import annotations

import random
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader

from llama_zh.data.corpus import DataError
from llama_zh.data.datasets import PackedSFTDataset, SFTDataset, packed_shards, pad_collate
from llama_zh.data.mix import MixedWindows, mix_weights
from llama_zh.data.prepare import DataConfig, prepare_tokens
from llama_zh.data.sft import Template, load_records, pack_examples, tokenize_record
from llama_zh.tokenizer import Tokenizer


class PretrainData(pl.LightningDataModule):
    """Training windows drawn from the sources of data= in their configured proportions; validation in order.

    The position in the training stream is part of the Lightning checkpoint (`state_dict`), so a
    resumed run continues with the batch that would have come next.
    """

    def __init__(self, data_cfg: DataConfig, tokenizer: Tokenizer, seed: int = 0):
        super().__init__()
        self.cfg, self.tokenizer, self.seed = data_cfg, tokenizer, seed
        self.start_batch = 0

    def prepare_data(self) -> None:
        prepare_tokens(self.cfg, self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        files = prepare_tokens(self.cfg, self.tokenizer)  # no-op once prepared
        windows = {
            split: {
                source: packed_shards(shards, self.tokenizer, self.cfg.seq_len, f"{source}.{split}")
                for source, shards in by_source.items()
            }
            for split, by_source in files.items()
        }
        self.train_sources = select_sources(windows["train"], self.cfg.train_sources)
        self.val = ConcatDataset(list(windows["val"].values()))
        self.source_names = list(self.train_sources)
        # Weights share out training windows (= tokens); none given: the sources' natural sizes.
        self.weights = mix_weights(self.cfg.sources, {name: len(ds) for name, ds in self.train_sources.items()})

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        stream = MixedWindows(
            list(self.train_sources.values()),
            self.weights,
            self.seed,
            self.cfg.batch_size,
            rank=rank,
            world_size=world,
            start_batch=self.start_batch,
            names=self.source_names,
        )
        return DataLoader(stream, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)

    def state_dict(self) -> dict:
        # Micro-batches this rank has consumed: optimizer steps x accumulation.
        trainer = self.trainer
        return {
            "batches_consumed": trainer.global_step * trainer.accumulate_grad_batches if trainer else self.start_batch
        }

    def load_state_dict(self, state: dict) -> None:
        self.start_batch = int(state["batches_consumed"])


def select_sources(by_source: dict, names) -> dict:
    """`data.train_sources`: the sources training draws from (null: all). The others are still packed and
    validated on, so that runs on different subsets of one corpus share its tokenizer, shards and val/loss."""
    if names is None:
        return by_source
    names = list(names)
    unknown = [n for n in names if n not in by_source]
    if not names or unknown:
        raise DataError(f"data.train_sources: {unknown or names!r}; expected a non-empty list of {sorted(by_source)}")
    return {n: by_source[n] for n in names}


class InstructionData(pl.LightningDataModule):
    """Alpaca records -> (prompt, response) token pairs; a held-out slice of the train file for validation.

    `pack`: short examples share a sequence, each marked by its segment ids and positions so that
    the model keeps them apart (no attention between them, positions from 0 in each)."""

    def __init__(
        self,
        train_file: Path,
        template: Template,
        tokenizer: Tokenizer,
        max_len: int,
        batch_size: int,
        val_fraction: float = 0.02,
        seed: int = 0,
        num_workers: int = 0,
        pack: bool = False,
    ):
        super().__init__()
        self.train_file, self.template, self.tokenizer = Path(train_file), template, tokenizer
        self.max_len, self.batch_size, self.val_fraction = max_len, batch_size, val_fraction
        self.seed, self.num_workers, self.pack = seed, num_workers, pack

    def setup(self, stage: str | None = None) -> None:
        records = load_records(self.train_file)
        examples = [tokenize_record(r, self.template, self.tokenizer, self.max_len) for r in records]
        random.Random(self.seed).shuffle(examples)
        n_val = max(1, int(len(examples) * self.val_fraction)) if len(examples) > 1 else 0
        if len(examples) - n_val < 1:
            raise DataError(f"{self.train_file}: too few records to train on")
        val, train = examples[:n_val], examples[n_val:]
        if self.pack:  # after the split, so validation records never share a sequence with training ones
            self.val = PackedSFTDataset(pack_examples(val, self.max_len))
            self.train = PackedSFTDataset(pack_examples(train, self.max_len))
        else:
            self.val, self.train = SFTDataset(val), SFTDataset(train)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else self.tokenizer.eos_id
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=pad_collate(pad),
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)
