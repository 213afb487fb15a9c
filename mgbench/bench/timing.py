"""Timing and machine helpers shared by the benchmark sections: interleaved repeats, medians, peak memory.

Every comparison in `mgbench bench` runs its variants in the same process, interleaved (A B C, B C A,
...), and reports medians, so a machine that slows down or speeds up mid-run affects all variants alike.
Each call is timed twice: wall time and this process's CPU time. On a CPU the ratios come from CPU time
(time spent descheduled by other jobs does not count); on a GPU from wall time. A check whose repeats
spread by more than SPREAD_LIMIT, or whose ratio is further below its FLOP bound than fixed costs can
explain (less than FLOOR_SHARE of the extra FLOPs showed up as time), is reported as unreliable, not met.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

SPREAD_LIMIT = 0.20     # repeats spreading more than this ((max - min) / median) make a check unreliable
FLOOR_SHARE = 0.5       # a cost ratio must show at least this share of its extra FLOPs: >= 1 + share * (bound - 1)


@dataclass
class Check:
    """One claim: a measured ratio next to its goal."""

    name: str                      # what is compared, e.g. "sampling MG/CFG img/s, DiT-T/2 (1, 8, 8)"
    value: float | None            # the measured ratio (None: not measured)
    goal: str                      # the goal in words, e.g. "~2.0 (NFE bound; paper 1.95)"
    ok: bool | None                # whether the goal is met (None: no verdict)
    unreliable: str = ""           # why the timings give no verdict (then ok is None), e.g. "spread 35% > 20%"

    def line(self) -> str:
        """One printable line: name, value, goal, verdict."""
        value = "not measured" if self.value is None else f"{self.value:.3f}"
        verdict = {True: "ok", False: "MISSED", None: "-"}[self.ok]
        if self.unreliable:
            verdict = f"UNRELIABLE: {self.unreliable}"
        return f"{self.name}: {value}  (goal {self.goal})  [{verdict}]"


def unreliable_because(spreads: list[float], ratio: float | None = None, bound: float | None = None) -> str:
    """Why a ratio measured with these repeat spreads cannot be trusted ("" when it can).

    `bound` is the ratio the FLOPs predict (> 1: the variant does that much more work); fixed costs pull a
    measured ratio below it, but not under 1 + FLOOR_SHARE * (bound - 1).
    """
    worst = max(spreads, default=0.0)
    if worst > SPREAD_LIMIT:
        return f"spread {worst:.0%} > {SPREAD_LIMIT:.0%}"
    if ratio is not None and bound is not None and bound > 1:
        floor = 1 + FLOOR_SHARE * (bound - 1)
        if ratio < floor:
            return f"ratio {ratio:.3f} < {floor:.3f}, less than the FLOP bound {bound:.3f} allows"
    return ""


def judged(name: str, value: float, goal: str, ok: bool, spreads: list[float], bound: float | None = None) -> Check:
    """A check whose verdict is withheld (ok None, the reason in `unreliable`) when its timings are not trusted."""
    why = unreliable_because(spreads, value, bound)
    return Check(name, value, goal, None if why else ok, why)


@dataclass
class Section:
    """One benchmark section: a table (list of rows), its checks and notes."""

    name: str                      # sampling | training | models | harness | report
    title: str                     # heading in benchmarks.md
    rows: list[dict[str, Any]] = field(default_factory=list)  # table rows, same keys in every row
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how it was measured, caveats

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "rows": self.rows, "notes": self.notes,
                "checks": [vars(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Section":
        return cls(d["name"], d["title"], list(d.get("rows", [])), [Check(**c) for c in d.get("checks", [])],
                   list(d.get("notes", [])))


def sync(device: torch.device | str | None) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timed:
    """The repeats of one timed function."""

    wall: list[float] = field(default_factory=list)   # seconds per call, wall clock
    cpu: list[float] = field(default_factory=list)    # seconds per call, CPU time of this process (all its threads)
    load: float | None = None                         # 1-minute load average when the repeats ended

    def basis(self, device: torch.device | str | None) -> list[float]:
        """The times ratios are taken from: CPU time on a CPU, wall time on a GPU."""
        return self.wall if device is not None and torch.device(device).type == "cuda" else self.cpu

    def columns(self, device: torch.device | str | None, scale: float = 1.0) -> dict[str, Any]:
        """Table columns: median wall and CPU ms (divided by `scale`), spread of the basis, load average."""
        return {"wall ms": round(1000 * median(self.wall) / scale, 1),
                "cpu ms": round(1000 * median(self.cpu) / scale, 1),
                "spread": f"{spread(self.basis(device)):.0%}", "load": self.load}


def measure(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
            device: torch.device | str | None = None) -> dict[str, Timed]:
    """Wall and CPU seconds per call of each fn: warm-up calls, then `repeats` rounds, order rotated each round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {n: Timed() for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            times[name].wall.append(time.perf_counter() - w0)
            times[name].cpu.append(time.process_time() - c0)
    for t in times.values():
        t.load = load_average()
    return times


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Wall seconds per call of each fn (see `measure`)."""
    return {n: t.wall for n, t in measure(fns, repeats=repeats, warmup=warmup, device=device).items()}


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def median(xs: list[float]) -> float:
    """The median of a non-empty list."""
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy a set of repeats was."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m > 0 else 0.0


# ----------------------------------------------------------------------------- peak memory (CPU)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    """A `VmXXX:` field of /proc/self/status in kB, or None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), so a rerun's allocations show in RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb(fn: Callable[[], Any]) -> float | None:
    """Peak resident-set increase (MB) while fn runs: trims the heap, resets VmHWM via /proc/self/clear_refs."""
    _trim_heap()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(0.0, (peak - before) / 1024)


def peak_cuda_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak CUDA memory allocated above the level before fn (MB), from torch's allocator statistics."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, torch, threads, GPU, date."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the device when asked (the GPU mode), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
