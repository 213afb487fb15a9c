"""Checks before a study creates anything: the environment for `study run`, start-up checks for `study validate`.

`check_environment` runs before any Optuna storage, MLflow run or job exists: the tracking server answers
(http(s) tracking URIs; a database server takes TCP connections), within REACH_TIMEOUT_S in all; the runs
folder and local store folders are writable; the disk under them has `min_free_gib` free. Each failure is one
ConfigError `file:field: ...` (exit 2). Without it an unreachable MLflow server meant minutes of MLflow's own
retries and then a traceback, after the Optuna storage had been created.

`trial_problems` runs the trainer's own start-up checks (mgbench.trainer.startup) on every trial config
`study validate` resolves (every grid point, or the corners of the ranges) with the world size and GPUs the
executor gives a job, and names each problem by the spec field it comes from.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from mgbench.config import ConfigError
from mgbench.redact import mask_uri
from mgbench.study.space import corner_points, grid_points, validate_trial
from mgbench.study.spec import StudySpec
from mgbench.study.spec_checks import DEFAULT_EVAL_HOOK

MIN_FREE_GIB = 1.0        # `study run --min-free-gib`: free disk (GiB) required where out_dir and local stores live
REACH_TIMEOUT_S = 10.0    # the tracking server (and a database server) must answer within this many seconds
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # default ports of database URIs (storage, tracking)


def check_environment(spec: StudySpec, min_free_gib: float = MIN_FREE_GIB) -> None:
    """Refuse (one-line ConfigError) a study whose servers do not answer, or whose folders cannot take its files."""
    for key in ("tracking_uri", "storage"):
        problem = server_problem(getattr(spec, key))
        if problem:
            raise ConfigError(f"{spec.path}:{key}: {problem}")
    for key, folder in store_folders(spec).items():
        problem = folder_problem(folder) or disk_problem(folder, min_free_gib)
        if problem:
            raise ConfigError(f"{spec.path}:{key}: {problem}")


# ----------------------------------------------------------------------------- servers


def server_problem(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """Why a tracking or storage server does not answer (None: it answers, or the URI names no server)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        probe: Callable[[], str | None] = lambda: _http_problem(parts, timeout_s)
    elif scheme in DB_PORTS and parts.hostname:
        probe = lambda: _tcp_problem(parts.hostname, parts.port or DB_PORTS[scheme], timeout_s)
    else:
        return None  # sqlite, file, journal, a socket path: local, checked by the folder checks
    problem = _within(probe, timeout_s)
    if problem is None:
        return None
    return f"{mask_uri(uri)} does not answer ({problem}); start the server or fix the URI (allowed: a server " \
           "that answers from this machine)"


def _within(probe: Callable[[], str | None], timeout_s: float) -> str | None:
    """Run a probe in a thread and give up after `timeout_s` (a DNS lookup ignores socket timeouts)."""
    out: list[str | None] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: out.append(probe()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not out:
        return f"no answer within {timeout_s:g} s"
    problem = out[0]
    return f"{problem} after {time.monotonic() - started:.1f} s" if problem else None


def _http_problem(parts: Any, timeout_s: float) -> str | None:
    """GET <uri>/health of an MLflow server: any HTTP answer below 500 counts as up (401: it asks for a login)."""
    host, port = parts.hostname, parts.port
    try:
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=timeout_s,
                                                                           context=_tls_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        conn.request("GET", parts.path.rstrip("/") + "/health")
        status = conn.getresponse().status
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        return _reason(e)
    return f"GET /health answers HTTP {status}" if status >= 500 else None


def _tls_context() -> ssl.SSLContext:
    """The TLS settings MLflow's client would use (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH)."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 - what the user asked MLflow for
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)


def _tcp_problem(host: str, port: int, timeout_s: float) -> str | None:
    """Whether a database server takes a TCP connection."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return _reason(e)
    return None


def _reason(e: BaseException) -> str:
    """An exception as a short reason, e.g. `ConnectionRefusedError: [Errno 111] Connection refused`."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- folders and disk


def store_folders(spec: StudySpec) -> dict[str, Path]:
    """The folders a study writes to, by the spec field that names them: out_dir, and the folder of a local
    storage or tracking store outside it."""
    folders = {"out_dir": Path(spec.out_dir)}
    for key, prefix in (("storage", "sqlite:///"), ("storage", "journal://"), ("tracking_uri", "sqlite:///"),
                        ("tracking_uri", "file://")):
        uri = getattr(spec, key)
        if uri.startswith(prefix):
            folder = Path(uri[len(prefix):]).expanduser().resolve().parent
            if not folder.is_relative_to(Path(spec.out_dir)):
                folders[key] = folder
    return folders


def _existing(folder: Path) -> Path:
    """The folder itself, or its nearest ancestor that exists (what `mkdir -p` would create into)."""
    folder = folder.expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def folder_problem(folder: Path) -> str | None:
    """Whether the study can create `folder` and write files in it, tried for real (a file or folder made and
    removed at once: permission bits do not tell root, read-only mounts or quotas)."""
    base = _existing(folder)
    if not base.is_dir():
        return f"{str(base)!r} is a file, so {str(folder)!r} cannot be created (allowed: a writable folder)"
    try:
        if base == folder.expanduser().absolute():
            fd, name = tempfile.mkstemp(prefix=".mgbench-write-test-", dir=base)
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".mgbench-write-test-", dir=base))
    except OSError as e:
        what = "write in" if base == folder.expanduser().absolute() else f"create {str(folder)!r} in"
        return f"cannot {what} {str(base)!r} ({_reason(e)}; allowed: a writable folder)"
    return None


def disk_problem(folder: Path, min_free_gib: float) -> str | None:
    """Whether the file system under `folder` has less than `min_free_gib` GiB free."""
    base = _existing(folder)
    free = shutil.disk_usage(base).free / 2**30
    if free >= min_free_gib:
        return None
    return (f"{free:.3g} GiB free on the file system of {str(base)!r}, below the {min_free_gib:g} GiB required "
            "(free space or choose another folder; the threshold is `study run --min-free-gib`)")


# ----------------------------------------------------------------------------- trial configs (study validate)


def trial_problems(spec: StudySpec) -> list[str]:
    """Every start-up problem of every trial config the spec resolves to, as `file:field: ... (trial {...})`."""
    from mgbench.study.executors import executor_params
    from mgbench.trainer.startup import check_startup, clear_caches

    clear_caches()
    params_ex = executor_params(spec)
    world = job_world_size(spec.executor.type, params_ex)
    local = spec.executor.type != "slurm"
    evaluation = spec.eval_hook == DEFAULT_EVAL_HOOK   # mgbench's own hook: its weights files are checked too
    if evaluation:
        from mgbench.evaluation.hook import startup_problems

    points = grid_points(spec) if spec.sampler.type == "grid" else corner_points(spec)
    out: list[str] = []
    for params in points:
        cfg = validate_trial(spec, params)
        problems = check_startup(cfg, world, local) + (startup_problems(cfg) if evaluation else [])
        found = [locate(spec, params, p) for p in problems]
        found += [f"{spec.path}:{p}" + (f" (trial {params})" if params else "") for p in gpu_problems(cfg, params_ex, spec.executor.type)]
        out += [line for line in found if line not in out]
    return out


def report_trial_problems(spec: StudySpec, prog: str) -> int:
    """Print each trial start-up problem as `PROG: error: file:field: ...` on stderr; returns how many."""
    from mgbench.config import print_error

    problems = trial_problems(spec)
    for line in problems:
        print_error(prog, line)
    return len(problems)


def locate(spec: StudySpec, params: dict[str, Any], problem: str) -> str:
    """A start-up problem `field: ...` named by the spec field it comes from: space.<key> (searched), a named
    grid of settings, --set <key>, or base.<key>."""
    fld, _, rest = problem.partition(": ")
    bundled = [k for k in params if spec.space.get(k) and spec.space[k].bundles
               and fld in spec.space[k].bundles.get(params[k], {})]
    if fld in params:
        where = f"space.{fld}"
    elif bundled:
        where = f"space.{bundled[0]}.{fld}"
    elif fld in spec.sets:
        where = f"--set {fld}"
    else:
        where = f"base.{fld}"
    return f"{spec.path}:{where}: {rest}" + (f" (trial {params})" if params else "")


def job_world_size(kind: str, params: dict[str, Any]) -> int:
    """The ranks of one trial's job: tasks per node x nodes (SLURM), tasks per node (local), 1 (debug)."""
    if kind == "debug":
        return 1
    tasks = params.get("slurm_ntasks_per_node") or params.get("tasks_per_node") or 1
    nodes = (params.get("slurm_nodes") or params.get("nodes") or 1) if kind == "slurm" else 1
    return int(tasks) * int(nodes)


def gpu_problems(cfg: Any, params: dict[str, Any], kind: str) -> list[str]:
    """A job whose ranks would not each get a GPU: more tasks per node than GPUs per node (rank r uses cuda:r),
    or train.device cuda on SLURM with no GPU asked for."""
    if cfg.train.device == "cpu":
        return []
    tasks = int(params.get("slurm_ntasks_per_node") or params.get("tasks_per_node") or 1)
    gpus = params.get("slurm_gpus_per_node", params.get("gpus_per_node"))
    if isinstance(gpus, str):
        gpus = int(gpus.rsplit(":", 1)[-1]) if gpus.rsplit(":", 1)[-1].isdigit() else None  # "a100:4"
    if gpus and tasks > int(gpus):
        return [f"executor.tasks_per_node: {tasks} tasks per node share {gpus} GPUs per node; each rank needs its own "
                f"(allowed: tasks_per_node <= gpus_per_node, or train.device: cpu)"]
    asked = gpus or params.get("slurm_gpus_per_task") or params.get("slurm_gres") or \
        any("gpu" in str(k) or "gres" in str(k) for k in (params.get("slurm_additional_parameters") or {}))
    if kind == "slurm" and cfg.train.device == "cuda" and not asked:
        return ["executor.gpus_per_node: train.device is cuda but the job asks for no GPU (allowed: "
                "gpus_per_node >= 1, a gres, or train.device: auto/cpu)"]
    return []
