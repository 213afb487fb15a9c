"""Checks on what a spec or site profile can pass to a shell: option names, control characters, time limits.

submitit writes every executor option into the sbatch script as `#SBATCH --<key>=<quoted value>`: the
key is not quoted, and a newline in a value (quoted or not) ends the comment line, so the rest runs as
shell code and sbatch stops reading `#SBATCH` lines there. Both are refused here, at `study validate`.
"""
from __future__ import annotations

import re
from typing import Any

from mgbench.config import ConfigError

OPTION_KEY = re.compile(r"[A-Za-z0-9_-]+")          # executor / profile option names (and sbatch flag names)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")        # C0 and C1 control characters, DEL (newline, CR, NUL, ...)
SLURM_SIGNAL_DELAY_S = 90                           # submitit's default `--signal=USR2@90` (slurm_signal_delay_s)


def _show(key: Any) -> str:
    """A key as it goes into a `file:field` error: itself when plain, else its repr (one line)."""
    return key if isinstance(key, str) and not CONTROL.search(key) else repr(key)


def check_text(value: Any, where: str) -> None:
    """Refuse a control character in any string, key or value, of a nested mapping (`where`: `file:field`)."""
    if isinstance(value, dict):
        for key, item in value.items():
            field = f"{where}.{_show(key)}" if not where.endswith(":") else f"{where}{_show(key)}"
            if isinstance(key, str) and CONTROL.search(key):
                raise ConfigError(f"{field}: a key with a control character (allowed: printable text on one line)")
            check_text(item, field)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_text(item, f"{where}[{i}]")
    elif isinstance(value, str):
        m = CONTROL.search(value)
        if m:
            raise ConfigError(f"{where}: control character {m.group()!r} at position {m.start()} in {value!r} "
                              "(allowed: printable text on one line; give a list for several lines)")


def check_option_keys(options: dict[str, Any], where: str) -> None:
    """Executor option names, and the keys of mappings inside them (additional sbatch flags), must match
    [A-Za-z0-9_-]+: they reach the sbatch script unquoted."""
    for key, value in options.items():
        field = f"{where}.{_show(key)}" if not where.endswith(":") else f"{where}{_show(key)}"
        if not isinstance(key, str) or not OPTION_KEY.fullmatch(key):
            raise ConfigError(f"{field}: {key!r} is not an option name (allowed: letters, digits, '_', '-')")
        if isinstance(value, dict):
            check_option_keys(value, field)


def slurm_seconds(value: Any) -> int:
    """A SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; already checked) in seconds."""
    if isinstance(value, int):
        return 60 * value
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:
        return 60 * parts[0]
    if len(parts) == 2:
        return 60 * parts[0] + parts[1]
    return 3600 * parts[0] + 60 * parts[1] + parts[2]


def time_limit_problem(params: dict[str, Any]) -> tuple[str, str] | None:
    """(the time option, what is wrong) when a SLURM job's time limit is not longer than its USR2 delay: the
    signal that lets a trial checkpoint would come at or before the start, so it could never resume."""
    key = "slurm_time" if params.get("slurm_time") is not None else "timeout_min"
    if params.get(key) is None:
        return None
    limit = slurm_seconds(params[key]) if key == "slurm_time" else int(60 * params[key])
    delay = params.get("slurm_signal_delay_s")
    delay = SLURM_SIGNAL_DELAY_S if delay is None else delay
    if limit > delay:
        return None
    return key, (f"a time limit of {limit} s is not longer than the USR2 signal delay of {delay} s "
                 "(slurm_signal_delay_s, submitit's default 90): raise the limit or lower signal_delay_s")
