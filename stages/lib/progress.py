"""Progress of a long loop: a bar with the time left in a terminal, a few log lines otherwise.

    for image in track(images, total=len(images), what="augment train", unit="images", logger=log):
        ...
    with Progress(total=len(test), what="int8 on test", unit="images", logger=log) as bar:
        bar.update(len(batch))

On a terminal (stderr is a TTY) tqdm draws a bar with the rate and the time left. Otherwise
(`dvc repro` piped to a file, CI logs) the work is cut into `steps` equal steps (10 by default),
each one log line: count, share done, time elapsed and left. STAGES_PROGRESS=bar|log|off forces
one (off: nothing). `usable_cpus()`: the CPUs this process may run on (default --workers).
Invariant: it writes to stderr or the stage's logger only, never changing what a stage computes.
Why: a 40-minute run must say where it is without flooding a log. Log format: docs/faults.md.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")
MODES = ("bar", "log", "off")
ENV = "STAGES_PROGRESS"


def mode(stream: IO[str] | None = None) -> str:
    """bar in a terminal, log otherwise; STAGES_PROGRESS overrides."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in MODES:
        return forced
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


def duration(seconds: float) -> str:
    """1:02:03, 4:05 or 7 s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs} s"


class Progress:
    """Counts work done out of `total`; shows it as a bar (TTY) or as one log line per step."""

    def __init__(self, total: int, what: str, unit: str = "items", logger: logging.Logger | None = None,
                 steps: int = 10, stream: IO[str] | None = None) -> None:
        self.total, self.what, self.unit = max(int(total), 0), what, unit
        self.logger = logger or logging.getLogger("stages.lib.progress")
        self.steps = max(int(steps), 1)
        self.done = 0
        self.started = time.perf_counter()
        self.mode = mode(stream)
        self._next_step = 1
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=what, unit=f" {unit}", file=stream or sys.stderr,
                             dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log" and self.total:
            crossed = False
            while self._next_step <= self.steps and self.done * self.steps >= self._next_step * self.total:
                self._next_step += 1
                crossed = True
            if crossed:  # one line, however many steps one update crossed
                self._log()

    def _log(self) -> None:
        elapsed = time.perf_counter() - self.started
        done = min(self.done, self.total)
        left = elapsed * (self.total - done) / done if done else 0.0
        self.logger.info("%s: %d/%d %s (%d%%), %s elapsed, about %s left", self.what, done, self.total, self.unit,
                         round(100 * done / self.total), duration(elapsed), duration(left))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], total: int, what: str, unit: str = "items", logger: logging.Logger | None = None,
          steps: int = 10, stream: IO[str] | None = None) -> Iterator[T]:
    """Yield the items of `iterable`, counting each as one unit of `total`."""
    with Progress(total, what, unit, logger, steps, stream) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroups cpusets), at least 1.

    os.cpu_count() counts the machine's CPUs, which overcommits a process pinned to fewer.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1
