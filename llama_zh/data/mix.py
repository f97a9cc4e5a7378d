"""A weighted mixture of sources, as one deterministic stream of training windows.

The stream is a pure function of (seed, position): position g names one window of one source.
- Sources: positions come in blocks of `block` windows; each block holds each source exactly its
  quota (weights apportioned by largest remainder), in a seeded order. Realised proportions are
  therefore off by less than one window per source per block, at any length.
- Windows within a source: the k-th draw from a source takes window `perm(k mod n)`, perm being a
  seeded pseudo-random permutation (a Feistel network, O(1) memory: a stored permutation of 10^8
  windows would cost 800 MB), reseeded for each pass over the source.
- Ranks and workers: rank r of R takes positions r, r + R, ...; among its batches, dataloader worker
  w of W builds batches w, w + W, ... (the order in which a DataLoader collects them). Disjoint and,
  together, complete.
- Resume: the stream restarts at any batch index, so a run that has consumed b batches per rank
  continues with exactly batch b.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from llama_zh.data.corpus import DataError


def _hash64(*parts: int | str) -> int:
    blob = "\x1f".join(map(str, parts)).encode()
    return struct.unpack("<Q", hashlib.blake2b(blob, digest_size=8).digest())[0]


class FeistelPermutation:
    """A seeded bijection of range(n): balanced Feistel rounds over 2^(2h) >= n, cycle-walking back into range."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half_bits) - 1
        self.keys = [_hash64(seed, r) for r in range(self.ROUNDS)]

    def _round(self, x: int, key: int) -> int:
        return (x * 0x9E3779B1 ^ key ^ (x >> 3)) * 0x85EBCA6B & self.mask

    def __call__(self, i: int) -> int:
        x = i
        while True:  # cycle-walk: at most a few steps, the domain is < 4n
            left, right = x >> self.half_bits, x & self.mask
            for key in self.keys:
                left, right = right, left ^ self._round(right, key)
            x = (left << self.half_bits) | right
            if x < self.n:
                return x


def apportion(weights: Sequence[float], total: int) -> list[int]:
    """Integer quotas summing to `total`, proportional to `weights` (largest remainder)."""
    exact = [w / sum(weights) * total for w in weights]
    quotas = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - quotas[i], reverse=True)
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def source_weight(name: str, block: Mapping[str, Any]) -> float | None:
    """`data.sources.<name>.weight`: a finite number > 0, or None (unset: the source's size decides).

    0 is refused rather than read as "unset" or "skip": a user who writes 0 means "none of this
    source", and silently giving it its natural share (or a quota of 0 windows that the stream
    cannot represent) would train on data they meant to leave out. Dropping a source is done by
    removing it or by `data.train_sources`.
    """
    value = block.get("weight") if block is not None else None
    if value is None:
        return None
    where = f"data.sources.{name}.weight"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: {value!r}; expected a number > 0 or null")
    if value <= 0:
        raise DataError(
            f"{where}: {value!r}; a weight must be > 0 (to leave the source out of training, "
            f"remove it or list the others in data.train_sources)"
        )
    return float(value)


def check_source_weights(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Every source's weight, checked (also those training does not draw from: a bad value is a typo
    wherever it sits, and `data.train_sources` may change on the next run)."""
    return {name: source_weight(name, block) for name, block in sources.items()}


def mix_weights(sources: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int]) -> list[float]:
    """The mixture weights of the sources in `sizes` (the ones training draws from), in its order.

    All unset: each source's size (windows). Some set and some not is refused: a size in windows and
    a share such as 0.3 are not on one scale, so the unset source would swamp the others.
    """
    weights = {name: source_weight(name, sources[name]) for name in sizes}
    unset = [name for name, w in weights.items() if w is None]
    if not unset:
        return [weights[name] for name in sizes]
    if len(unset) < len(weights):
        given = [name for name, w in weights.items() if w is not None]
        raise DataError(
            f"data.sources: {', '.join(given)} set a weight but {', '.join(unset)} do not; "
            f"give every training source a weight, or none (shares by size)"
        )
    return [float(sizes[name]) for name in sizes]


@dataclass
class MixtureSchedule:
    """Which (source, window) sits at each global position of the stream."""

    sizes: Sequence[int]  # windows per source
    weights: Sequence[float]
    seed: int
    block: int = 1000
    names: Sequence[str] | None = None  # for messages; default: the source's index

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.weights) or not self.sizes:
            raise DataError("data.sources: need one weight per source and at least one source")
        names = list(self.names) if self.names is not None else [str(i) for i in range(len(self.sizes))]
        for name, n, w in zip(names, self.sizes, self.weights, strict=False):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise DataError(f"data.sources.{name}.weight: {w!r}; a weight must be a finite number > 0")
            if n <= 0:
                raise DataError(f"data.sources.{name}: no training windows")
        self.quotas = apportion(self.weights, self.block)
        starved = [name for name, q in zip(names, self.quotas, strict=False) if q == 0]
        if starved:
            raise DataError(
                f"data.sources: the weight of {', '.join(starved)} is below 1/{self.block} of the "
                f"total; raise it or drop the source"
            )
        self._block_order = lru_cache(maxsize=4)(self._make_block_order)
        self._perm = lru_cache(maxsize=64)(self._make_perm)

    def _make_block_order(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each offset in block b, how many of that source precede it in the block)."""
        order = np.repeat(np.arange(len(self.quotas)), self.quotas)
        np.random.default_rng(_hash64(self.seed, "block", b)).shuffle(order)
        rank = np.zeros_like(order)
        seen = np.zeros(len(self.quotas), dtype=np.int64)
        for i, s in enumerate(order):
            rank[i] = seen[s]
            seen[s] += 1
        return order, rank

    def _make_perm(self, source: int, epoch: int) -> FeistelPermutation:
        return FeistelPermutation(self.sizes[source], _hash64(self.seed, "source", source, epoch))

    def __getitem__(self, g: int) -> tuple[int, int]:
        b, offset = divmod(g, self.block)
        order, rank = self._block_order(b)
        source = int(order[offset])
        k = b * self.quotas[source] + int(rank[offset])  # draws from this source before position g
        epoch, i = divmod(k, self.sizes[source])
        return source, self._perm(source, epoch)(i)


class MixedWindows(IterableDataset):
    """Endless batches' worth of windows from `sources` in the mixture's proportions.

    Yields single examples; with a DataLoader of `batch_size` and `num_workers` W, the batches come
    out in stream order. `start_batch` (per rank) is where a resumed run picks up.
    """

    def __init__(
        self,
        sources: Sequence[Dataset],
        weights: Sequence[float],
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        names: Sequence[str] | None = None,
    ):
        self.sources = list(sources)
        self.schedule = MixtureSchedule([len(s) for s in self.sources], weights, seed, names=names)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_batch = start_batch

    def positions(self, batch: int) -> range:
        """Global positions of this rank's batch number `batch`."""
        first = batch * self.batch_size
        return range(
            (first * self.world_size) + self.rank, ((first + self.batch_size) * self.world_size), self.world_size
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader workers hand out batches round-robin starting with worker 0: worker w must build
        # the batches start + w, start + w + W, ... for the stream to come out in order.
        batch = self.start_batch + worker
        while True:
            for g in self.positions(batch):
                source, window = self.schedule[g]
                item = dict(self.sources[source][window])
                item["source"] = torch.tensor(source)
                yield item
            batch += n_workers
