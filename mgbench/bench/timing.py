"""Timing and machine helpers shared by the benchmark sections: interleaved repeats, medians, peak memory.

Every comparison in `mgbench bench` runs its variants in the same process, interleaved (A B C, B C A,
...), and reports medians, so a machine that slows down or speeds up mid-run affects all variants alike.
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


@dataclass
class Check:
    """One claim: a measured ratio next to its goal."""

    name: str                      # what is compared, e.g. "sampling MG/CFG img/s, DiT-T/2 (1, 8, 8)"
    value: float | None            # the measured ratio (None: not measured)
    goal: str                      # the goal in words, e.g. "~2.0 (NFE bound; paper 1.95)"
    ok: bool | None                # whether the goal is met (None: no verdict)

    def line(self) -> str:
        """One printable line: name, value, goal, verdict."""
        value = "not measured" if self.value is None else f"{self.value:.3f}"
        verdict = {True: "ok", False: "MISSED", None: "-"}[self.ok]
        return f"{self.name}: {value}  (goal {self.goal})  [{verdict}]"


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


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn: warm-up calls, then `repeats` rounds with the order rotated each round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    """The median of a non-empty list."""
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy a set of repeats was."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m > 0 else 0.0


def near(value: float, target: float, tol: float) -> bool:
    """Whether value is within a relative tolerance of target."""
    return abs(value / target - 1.0) <= tol


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
