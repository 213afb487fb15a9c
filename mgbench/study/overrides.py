"""`--set` on studies: dotted base-config overrides recorded in the study's folder, so a resume runs the same spec.

The first `study run` writes `<out_dir>/set.yaml` (empty when no --set was given). A later run, resume,
validate or status without --set reuses the recorded values; one with different values is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mgbench.config import ConfigError

SETS_FILE = "set.yaml"   # in out_dir: the --set values the study was first run with ({dotted key: value})
TRIALS_DIR = "trials"    # in out_dir: a study run before set.yaml existed has this folder and no record


def recorded_sets(out_dir: str | Path) -> dict[str, Any] | None:
    """The --set values a study was run with; None for a study that never ran."""
    path = Path(out_dir) / SETS_FILE
    if path.is_file():
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {} if (Path(out_dir) / TRIALS_DIR).is_dir() else None


def resolve_sets(given: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """The --set values to apply: the given ones (equal to the recorded ones, if any), else the recorded ones."""
    recorded = recorded_sets(out_dir)
    if not given:
        return recorded or {}
    _check_same(given, recorded, out_dir)
    return given


def record_sets(spec: Any) -> None:
    """Write the spec's --set values on the study's first run; refuse a spec whose values differ from the record."""
    _check_same(spec.sets, recorded_sets(spec.out_dir), spec.out_dir)
    path = Path(spec.out_dir) / SETS_FILE
    if not path.is_file():
        path.write_text(yaml.safe_dump(_normal(spec.sets), sort_keys=True), encoding="utf-8")


def _check_same(given: dict[str, Any], recorded: dict[str, Any] | None, out_dir: str | Path) -> None:
    """A one-line ConfigError naming the keys whose values differ from the study's record."""
    if recorded is None:
        return
    given = _normal(given)
    keys = sorted(k for k in set(given) | set(recorded) if k not in given or k not in recorded
                  or given[k] != recorded[k])
    if keys:
        was = " ".join(f"{k}={_show(v)}" for k, v in sorted(recorded.items())) or "no --set"
        raise ConfigError(f"{Path(out_dir) / SETS_FILE}:set: --set differs on {', '.join(keys)} from what this study "
                          f"was run with ({was}); repeat those values, or give no --set to reuse them")


def _normal(sets: dict[str, Any]) -> dict[str, Any]:
    """The values as they read back from set.yaml (so a value compares equal to its own record)."""
    return yaml.safe_load(yaml.safe_dump(dict(sets))) or {}


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
