"""Progress that reads well both in a terminal and in a log file.

    bar = progress_bar(total=200, desc="training", enabled=is_main, initial=resumed_step)
    for step in ...:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()

In a terminal this is a tqdm bar. In a log file (Slurm output, CI) a bar's carriage-return frames
pile up into one unreadable line per refresh, so there it is a plain line now and then instead:

    [tunefleet] training: 40/200 steps (20%), loss=2.1234, 1.2 steps/s, eta 2m13s

printed at every `every_percent` (10%) of the total, at least every `every_s` (30 s) while
updates arrive, and once at the end.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, *, unit: str = "steps",
                 leave: bool = True, every_percent: int | None = 10, every_s: float = 30.0,
                 stream: IO[str] | None = None):
    """A progress display with update(n)/set_postfix(**values)/close(), also a context manager.

    enabled=False (e.g. on every rank but the main one) gives one that shows nothing. leave=False:
    the terminal bar disappears when closed, and a log gets no final line unless it printed one
    before (a short evaluation stays silent; a long one is still visible). every_percent=None:
    lines only by time.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return _Silent()
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                    dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, initial=initial, unit=unit, leave=leave, every_percent=every_percent,
                        every_s=every_s, stream=stream)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Context:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(_Context):
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress(_Context):
    """Whole lines, never a carriage return: what a log file can show."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, unit: str = "steps", leave: bool = True,
                 every_percent: int | None = 10, every_s: float = 30.0, stream: IO[str]):
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.n = self._start_n = initial
        self.every_percent, self.every_s, self.stream = every_percent, every_s, stream
        self.postfix: dict[str, Any] = {}
        self._started = self._last_print = time.monotonic()
        self._printed_n: int | None = None
        self._closed = False

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = time.monotonic()
        if self._crossed_mark(before) or now - self._last_print >= self.every_s:
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        """Shown in the next line (values as the loop gives them; floats get 4 significant digits)."""
        self.postfix = values

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._printed_n != self.n and (self.leave or self._printed_n is not None):
            self._print(time.monotonic())

    def _crossed_mark(self, before: int) -> bool:
        """Whether n passed a multiple of every_percent of the total (the end counts as one)."""
        if not self.every_percent or self.total <= 0:
            return False
        step = self.total * self.every_percent / 100
        return int(self.n / step) > int(before / step) or (self.n >= self.total > before)

    def line(self, now: float) -> str:
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"
                 + (f" ({100 * self.n // self.total}%)" if self.total > 0 else "")]
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items()]
        elapsed, done = now - self._started, self.n - self._start_n
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s")
            left = max(self.total - self.n, 0)
            parts.append(f"eta {_duration(left / rate)}" if left else f"took {_duration(elapsed)}")
        return "[tunefleet] " + ", ".join(parts)

    def _print(self, now: float) -> None:
        self._last_print, self._printed_n = now, self.n
        try:
            print(self.line(now), file=self.stream, flush=True)
        except OSError:  # a log pipe that went away must not stop training
            pass


def _duration(seconds: float) -> str:
    """1h02m, 2m13s, 45s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
