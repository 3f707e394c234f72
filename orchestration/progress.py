"""Progress of long work (curation passes, training steps, gate generation and scoring), one way.

On a terminal: a tqdm bar with rate and ETA, redrawn in place. Anywhere else (a CI log, a file the
pipeline runner tees, a pipe): a plain line every `every_s` seconds and a last one at the end,

    [train] step 120/360 (33%) 2.1 steps/s, ETA 1m54s | loss 0.4121 | 33.6 img/s

because a bar redrawn with carriage returns becomes thousands of lines in a log. Only rank 0 of a
distributed job reports (`rank`); `enabled=False` prints nothing at all. The environment can turn
every reporter off (DECO_PROGRESS=0) or change the line period (DECO_PROGRESS_EVERY=seconds),
e.g. for a CI job, without a config field in every stage.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

DEFAULT_EVERY_S = 30.0


def _env_enabled() -> bool:
    return os.environ.get("DECO_PROGRESS", "1").strip().lower() not in ("0", "off", "false", "no")


def _env_every_s() -> float:
    try:
        return float(os.environ.get("DECO_PROGRESS_EVERY", DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S


def _terminal_columns(stream: TextIO) -> int:
    """The width of the terminal `stream` writes to; 0 when it is no terminal, or one that reports no
    size (a pseudo-terminal nobody sized), where tqdm would cut its bar to nothing."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, ValueError, OSError):  # no fileno or isatty, or a closed stream
        return 0


def format_duration(seconds: float) -> str:
    """45s, 1m54s, 2h03m: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_rate(per_s: float, unit: str) -> str:
    """Per second, or seconds per unit when slower than one in ten seconds (a large model's prompt)."""
    if per_s <= 0:
        return f"? {unit}s/s"
    if per_s < 0.1:
        return f"{1 / per_s:.1f} s/{unit}"
    return f"{per_s:.{0 if per_s >= 100 else 1 if per_s >= 1 else 2}f} {unit}s/s"


class Progress:
    """Counts `unit`s done out of `total` (None: unknown) under the label `desc`.

    `update(n, note=..., **counts)`: n more units; `note` replaces the free text after the counts
    (training's loss); each keyword count (samples=..., images=...) is summed and shown with its
    own rate. `initial`: units already done before this run (a resumed training): they count
    towards the percentage, not the rate. `clock` is injectable so that tests need no sleeps.
    """

    def __init__(self, desc: str, total: int | None, unit: str = "item", *, enabled: bool = True, rank: int = 0,
                 initial: int = 0, every_s: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit, self.initial = desc, total, unit, initial
        self.n, self.note, self.counts = initial, "", {}
        self.enabled = enabled and rank == 0 and _env_enabled()
        self.every_s = _env_every_s() if every_s is None else every_s
        self.stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self.started = self._last_line = clock()
        self._last_line_n = None  # the count the last line showed: close() repeats no line
        self._bar = None
        self._closed = False
        if self.enabled and _terminal_columns(self.stream) > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream,
                             dynamic_ncols=True)

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    def update(self, n: int = 1, *, note: str | None = None, **counts: int) -> None:
        self.n += n
        if note is not None:
            self.note = note
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        if not self.enabled:
            return
        if self._bar is not None:
            # tqdm squeezes the bar to make room for a long postfix: cut the postfix instead.
            room = _terminal_columns(self.stream) - len(self.desc) - 60
            extra = self._extra()
            if extra:
                self._bar.set_postfix_str(extra[:max(room, 0)], refresh=False)
            self._bar.update(n)
        elif self._clock() - self._last_line >= self.every_s:
            self._print_line()

    def line(self) -> str:
        """The plain line of the current state (what a log gets every `every_s` seconds)."""
        elapsed = self.elapsed
        per_s = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"[{self.desc}] {self.unit} {self.n}"]
        if self.total:
            parts[0] += f"/{self.total} ({100 * self.n // self.total}%)"
        timing = format_rate(per_s, self.unit)
        if self.total and self.n >= self.total:
            timing += f", done in {format_duration(elapsed)}"
        elif self.total:
            timing += f", ETA {format_duration((self.total - self.n) / per_s) if per_s > 0 else '?'}"
        parts.append(timing)
        line = " ".join(parts)
        extra = self._extra()
        return f"{line} | {extra}" if extra else line

    def print(self, text: str, file: TextIO | None = None) -> None:
        """A line of the caller's own (stdout by default), above the bar when one is drawn; printed
        whether or not this reporter is enabled."""
        file = file if file is not None else sys.stdout
        if self._bar is not None:
            self._bar.write(text, file=file)
            file.flush()
        else:
            print(text, file=file, flush=True)

    def close(self) -> None:
        """The final line (or the bar's last state); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n != self._last_line_n and (self.n > self.initial or self.total):
            self._print_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _extra(self) -> str:
        elapsed = self.elapsed
        shown = [f"{value} {name} ({value / elapsed:.1f}/s)" if elapsed > 0 else f"{value} {name}"
                 for name, value in self.counts.items()]
        return " | ".join(shown + ([self.note] if self.note else []))

    def _print_line(self) -> None:
        self._last_line, self._last_line_n = self._clock(), self.n
        print(self.line(), file=self.stream, flush=True)
