"""Read-only checks of a study's MLflow store: whether it holds trial runs, without creating a database or folder.

Opening MLflow on a missing sqlite file creates it (with an empty schema), so commands that only read
(`report`, `frontier`) ask here first and say which command produces the runs.
"""
from __future__ import annotations

import re
from pathlib import Path


Source = tuple[str, "str | None"]   # (study name, its MLflow tracking URI), as mgbench.report.renderers.resolve_studies gives


def local_store(tracking_uri: str) -> Path | None:
    """The file or folder of a local tracking URI (sqlite:///x.db, file:///dir, a plain path); None for a server."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).expanduser()
    if tracking_uri.startswith("file:"):
        return Path(re.sub(r"^file:(//)?", "", tracking_uri)).expanduser()
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*):", tracking_uri)
    return Path(tracking_uri).expanduser() if scheme is None or len(scheme.group(1)) == 1 else None


def require_runs(sources: list[Source], given: list[str]) -> None:
    """LookupError (one line: the study, and `mgbench study run SPEC` to produce its runs) unless every study
    has trial runs; `given` are the --study values (a spec file names itself in the hint)."""
    for (study, uri), value in zip(sources, given):
        hint = f"run `mgbench study run {value if value.endswith(('.yaml', '.yml')) else 'SPEC'}` first"
        if not uri:
            raise LookupError(f"study {study}: no tracking URI to read its runs from (give --tracking-uri or the "
                              "study's spec file)")
        path = local_store(uri)
        if path is not None and not path.exists():
            raise LookupError(f"study {study} has no runs yet (no MLflow store at {path}); {hint}")
        if not _has_trial_runs(study, uri):
            raise LookupError(f"study {study} has no trial runs at {uri}; {hint}")


def _has_trial_runs(study: str, tracking_uri: str) -> bool:
    """Whether the study's experiment holds at least one trial run (reads an existing store only)."""
    from mgbench.tracking import RunStore

    return RunStore(tracking_uri).has_trials(study)
