"""Progress of long work (training steps, evaluation samples): a tqdm bar on a terminal, plain lines elsewhere.

The trainer prints nothing itself: it hands a `Progress` to the callable it is given (`train(...,
progress=...)`). `ConsoleProgress` is the usual one: attached to a terminal it drives a tqdm bar; in a
log file (SLURM's --output, a submitit job log, `> train.log`) it prints one plain line per report,

    step 200/3000 (7%)  41.2 steps/s  ETA 1m08s  loss=0.4123

where the rate is this invocation's (a resumed run counts from where it resumed) and the ETA is the
steps left at that rate.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO


@dataclass
class Progress:
    done: int                      # units done in total (a resumed run starts past 0)
    total: int                     # units when finished (train.steps; samples to draw)
    start: int                     # units done when this invocation started
    elapsed_s: float               # wall time of this invocation so far
    unit: str = "step"             # what is counted: step | sample
    kind: str = "train"            # train: a logged window (values = its means) | eval: values = an evaluation
    values: dict[str, float] = field(default_factory=dict)  # shown after the rate: loss, w / eval metrics

    @property
    def rate(self) -> float | None:
        """Units per second in this invocation, or None before the first unit."""
        if self.elapsed_s <= 0 or self.done <= self.start:
            return None
        return (self.done - self.start) / self.elapsed_s

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate (0 when done), or None while the rate is unknown."""
        if self.done >= self.total:
            return 0.0
        rate = self.rate
        return (self.total - self.done) / rate if rate else None


ProgressFn = Callable[[Progress], None]


def format_duration(seconds: float | None) -> str:
    """12 -> '12s', 68 -> '1m08s', 3725 -> '1h02m'; None -> '--'."""
    if seconds is None:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(rate: float | None, unit: str) -> str:
    """41.23 -> '41.2 steps/s'; None -> '-- steps/s'."""
    if rate is None:
        return f"-- {unit}s/s"
    return f"{rate:.0f} {unit}s/s" if rate >= 100 else f"{rate:.3g} {unit}s/s"


def shown_values(values: dict[str, float]) -> dict[str, float]:
    """The headline values of a report: metric means, without sweeps, per-seed values and standard errors."""
    return {k: v for k, v in values.items() if "/" not in k and not k.endswith("_se")}


def progress_line(p: Progress) -> str:
    """One plain line: `step 200/3000 (7%)  41.2 steps/s  ETA 1m08s  loss=0.4123`."""
    pct = 100.0 * p.done / p.total if p.total else 100.0
    parts = [f"{p.unit} {p.done}/{p.total} ({pct:.0f}%)", format_rate(p.rate, p.unit),
             f"ETA {format_duration(p.eta_s)}"]
    values = " ".join(f"{k}={v:.4g}" for k, v in shown_values(p.values).items())
    if p.kind == "eval":
        parts.append(f"eval: {values}" if values else "eval")
    elif values:
        parts.append(values)
    return "  ".join(parts)


class ConsoleProgress:
    """A progress callable: a tqdm bar on a terminal (its owner calls `close()` at the end), else a plain line
    for every `every`-th train report, every evaluation and the last unit (`min_interval_s`: plain lines at
    most this often, except those)."""

    def __init__(self, stream: TextIO | None = None, every: int = 1, bar: bool | None = None,
                 min_interval_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self.every = max(1, every)
        self.bar_wanted = _is_terminal(self.stream) if bar is None else bar
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._bar: Any = None
        self._count = 0
        self._last_line: float | None = None

    def __call__(self, p: Progress) -> None:
        if p.kind == "eval" and not shown_values(p.values):
            return   # nothing was evaluated (`train --no-eval`: the trainer still reports its evaluation points)
        if self.bar_wanted:
            self._update_bar(p)
            return
        if p.kind == "train":
            self._count += 1
        final, now = p.done >= p.total, self.clock()
        due = self._last_line is None or now - self._last_line >= self.min_interval_s
        if p.kind == "eval" or final or (self._count % self.every == 0 and due):
            print(progress_line(p), file=self.stream, flush=True)
            self._last_line = now

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar (plain lines need no ending)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _update_bar(self, p: Progress) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=p.total, initial=p.start, unit=p.unit, file=self.stream, dynamic_ncols=True)
        self._bar.update(p.done - self._bar.n)
        if p.kind == "eval":
            self._bar.write(f"{p.unit} {p.done}/{p.total}  " + progress_line(p).split("  ")[-1], file=self.stream)
        elif p.values:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown_values(p.values).items()}, refresh=False)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
