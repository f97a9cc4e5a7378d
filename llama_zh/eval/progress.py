"""Progress of an eval task: a tqdm bar on a terminal, a periodic line in a log.

A task over thousands of questions runs for minutes; without this nothing shows until it ends. When
stderr is not a terminal (a batch job, a file) a bar's carriage returns make an unreadable log, so a
plain line is written every `every_s` seconds instead, and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm


class Progress:
    """`update(n)` after each batch: n documents / questions / windows finished."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str,
        every_s: float = 30.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.done = 0
        self.start = self.last = clock()
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (
            tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True) if interactive else None
        )

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = f", {self.done / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        print(
            f"{self.desc}: {self.done}/{self.total} {self.unit}{share}, {elapsed:.0f} s{rate}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(self.clock())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
