"""The checks a study spec makes against what lies outside it, before anything is submitted: that a custom entry
or evaluation hook imports, that the Optuna storage and MLflow tracking URIs are usable from here, and that the
metric to optimise is one the evaluation reports. Each raises a one-line `file:field: ...` ConfigError.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mgbench.config import ConfigError, TrainConfig
from mgbench.metric_registry import family_metrics
from mgbench.redact import mask_uri
from mgbench.study.space import corner_points, grid_points, validate_trial

if TYPE_CHECKING:
    from mgbench.study.spec import StudySpec

DEFAULT_ENTRY = "mgbench.trainer.loop:train"          # the trainer (mgbench.study.trial imports it directly)
DEFAULT_EVAL_HOOK = "mgbench.evaluation:make_eval_hook"  # mgbench's evaluation hook factory (likewise)
STORAGE_SCHEMES = ("sqlite", "journal", "postgresql", "mysql")  # Optuna storages (RDB schemes may add +driver)
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")  # MLflow
GRID2D_METRICS = tuple(family_metrics("grid2d"))  # the registry, in mgbench.evaluation.grid2d.grid_metrics order
IMAGE_METRICS = tuple(family_metrics("image"))  # mgbench.evaluation.metrics computes these


def check_import(value: str, key: str, src: str) -> None:
    """`module:function` must import here, before any job would fail on it (mgbench's own defaults always do)."""
    if value in (DEFAULT_ENTRY, DEFAULT_EVAL_HOOK):
        return  # importing the trainer loads torch: seconds that a one-line spec error should not wait for
    module, _, attr = value.partition(":")
    if not module or not attr:
        raise ConfigError(f"{src}:{key}: expected module:function, got {value!r}")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise ConfigError(f"{src}:{key}: cannot import {module!r} ({type(e).__name__}: {_first_line(e)}); "
                          "expected an importable module:function") from None
    if not callable(getattr(mod, attr, None)):
        raise ConfigError(f"{src}:{key}: module {module!r} has no function {attr!r} (expected module:function)")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def check_uris(spec: StudySpec, src: str) -> None:
    """Storage and tracking URIs: a known scheme, and a local database file in a folder that exists (or in out_dir)."""
    scheme = spec.storage.split("://", 1)[0]
    if scheme.split("+", 1)[0] not in STORAGE_SCHEMES:
        raise ConfigError(f"{src}:storage: scheme {scheme!r} is not one of sqlite:///, journal:///, postgresql://, "
                          f"mysql:// (got {mask_uri(spec.storage)!r})")
    if scheme == "sqlite":
        _check_db_file(spec.storage, "sqlite:///", spec.out_dir, f"{src}:storage")
    elif scheme == "journal":
        _check_db_file(spec.storage, "journal://", spec.out_dir, f"{src}:storage")
    uri = spec.tracking_uri
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    if m is None or len(m.group(1)) == 1:  # a plain path (or a Windows drive letter): MLflow's file store
        _check_folder(Path(uri).expanduser().resolve().parent, spec.out_dir, f"{src}:tracking_uri", uri)
        return
    scheme = m.group(1)
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise ConfigError(f"{src}:tracking_uri: scheme {scheme!r} is not one of {', '.join(TRACKING_SCHEMES)} "
                          f"(got {mask_uri(uri)!r})")
    if scheme == "sqlite":
        _check_db_file(uri, "sqlite:///", spec.out_dir, f"{src}:tracking_uri")
    elif scheme in ("http", "https") and not re.match(r"https?://[^/:]+", uri):
        raise ConfigError(f"{src}:tracking_uri: expected http(s)://host[:port], got {mask_uri(uri)!r}")


def _check_db_file(uri: str, prefix: str, out_dir: str, where: str) -> None:
    if not uri.startswith(prefix) or len(uri) == len(prefix) or uri.endswith(":memory:"):
        raise ConfigError(f"{where}: expected {prefix}<file> (a file shared by the driver and every job), got {uri!r}")
    path = Path(uri[len(prefix):]).expanduser().resolve()
    if path.is_dir():
        raise ConfigError(f"{where}: {str(path)!r} is a folder; expected a file in it, "
                          f"e.g. {prefix}{path / 'study.db'}")
    _check_folder(path.parent, out_dir, where, uri)


def _check_folder(folder: Path, out_dir: str, where: str, uri: str) -> None:
    """A local store's folder must exist, or be out_dir, inside it or above it (the driver creates out_dir with its
    parents): a typo makes no new study."""
    out = Path(out_dir).expanduser().resolve()
    if folder.is_dir() or folder.is_relative_to(out) or out.is_relative_to(folder):
        return
    raise ConfigError(f"{where}: folder {str(folder)!r} does not exist (create it, or keep the file under "
                      f"out_dir {out_dir!r}); got {uri!r}")


def evaluation_metrics(cfg: TrainConfig) -> list[str]:
    """The final metrics mgbench's evaluation hook (mgbench.evaluation.hook) reports for a trial config."""
    ev = cfg.eval
    if cfg.data.name == "grid2d":
        names = list(GRID2D_METRICS)
    else:
        wanted = set()
        for m in ev.metrics:
            wanted.update(("precision", "recall") if m in ("prc", "precision", "recall") else (m,))
        names = [m for m in IMAGE_METRICS if m in wanted]
        if ev.extractor == "classifier" or (ev.extractor == "auto" and cfg.data.name in ("digits", "mnist")):
            names.append("extractor_acc")
    names.append("nfe")
    sweep = [f"sweep/cfg_scale_{float(s):.2f}/{m}" for s in ev.cfg_sweep for m in names]
    if "img_per_s" in ev.metrics:
        names.append("img_per_s")
    return names + sweep


def check_metric(spec: StudySpec, src: str) -> None:
    """With mgbench's own evaluation, the optimised metric must be one it reports (else every trial fails at the end)."""
    if spec.eval_hook != DEFAULT_EVAL_HOOK:
        return  # a custom hook reports what it likes
    points = grid_points(spec) if spec.sampler.type == "grid" else corner_points(spec)
    names = evaluation_metrics(validate_trial(spec, points[0]))
    metric = spec.optimize.metric
    if metric not in names:
        raise ConfigError(f"{src}:optimize.metric: {metric!r} is not reported by the evaluation of this study "
                          f"(allowed: {', '.join(names)})")
