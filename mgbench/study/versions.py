"""One study name, one spec: the resolved spec a study first ran with is recorded in its folder, and a rerun
with a spec that would change any trial's result is refused (its old trials would pass for the new spec's).

What is compared is what decides results: the resolved base config (extends, inline base, --set), the
space, sampler, objective, pruning, trainer and evaluation entry points, and where trials and runs are
stored. Settings that only decide how the study runs may change between runs: parallelism, poll_s,
max_retries, n_trials (a longer search), reuse, report, and the executor (type, profile, options such as
the partition). `study run --new-version` runs a changed spec as `<name>-v2` in `<out_dir>-v2` (the
first version whose record is this spec or missing, so the same command resumes it).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Callable

import yaml

from mgbench.config import ConfigError
from mgbench.redact import mask_uri

RECORD_FILE = "spec.recorded.yaml"  # in out_dir: the result-deciding fields of the spec the study first ran with
OUT_DIR = "${out_dir}"              # the study folder in recorded paths (so a new version compares equal)


def spec_record(spec: Any) -> dict[str, Any]:
    """The fields of a spec that decide its trials' results, as plain data (out_dir written as ${out_dir})."""
    data = {"base": spec.base, "space": {k: dataclasses.asdict(p) for k, p in spec.space.items()},
            # `objective`: the name of `optimize` before its rename, kept so that older studies' records still compare
            "sampler": dataclasses.asdict(spec.sampler), "objective": dataclasses.asdict(spec.optimize),
            "pruning": dataclasses.asdict(spec.pruning), "entry": spec.entry, "eval_hook": spec.eval_hook,
            "storage": mask_uri(spec.storage), "tracking_uri": mask_uri(spec.tracking_uri)}
    text = json.dumps(data, sort_keys=True, default=str).replace(json.dumps(spec.out_dir)[1:-1], OUT_DIR)
    return json.loads(text)


def recorded(out_dir: str | Path) -> dict[str, Any] | None:
    """The record of the study in out_dir, or None (never run, or run before records existed)."""
    path = Path(out_dir) / RECORD_FILE
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted fields whose values differ between two records."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


def check_unchanged(spec: Any) -> None:
    """Refuse a spec that differs from the one its study was first run with, naming the changed fields."""
    old = recorded(spec.out_dir)
    if old is None:
        return
    changed = changed_fields(old, spec_record(spec))
    if changed:
        raise ConfigError(f"{spec.path}:{changed[0]}: study {spec.name} in {spec.out_dir} was run with another "
                          f"spec (changed: {', '.join(changed)}); restore it, or run the new spec as a new study "
                          "with `mgbench study run --new-version`")


def record_spec(spec: Any) -> None:
    """Check the spec against the study's record; write the record on the study's first run."""
    check_unchanged(spec)
    path = Path(spec.out_dir) / RECORD_FILE
    if not path.is_file():
        tmp = path.with_name(f".{RECORD_FILE}.tmp")
        tmp.write_text(yaml.safe_dump(spec_record(spec), sort_keys=True), encoding="utf-8")
        tmp.replace(path)


def new_version(spec: Any, load: Callable[[dict[str, str]], Any]) -> Any:
    """The first version of the study whose record is this spec or missing: the spec itself, else the spec
    loaded by `load({name, out_dir})` as `<name>-vK` in `<out_dir>-vK`."""
    for k in itertools.count(1):
        version = spec if k == 1 else load({"name": f"{spec.name}-v{k}", "out_dir": f"{spec.out_dir}-v{k}"})
        old = recorded(version.out_dir)
        if old is None or not changed_fields(old, spec_record(version)):
            return version
    raise AssertionError("unreachable")


_MISSING = object()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out
