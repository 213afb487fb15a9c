"""`mgbench ui`: an MLflow tracking server (UI + REST + proxied artifacts) on a study's store.

One process group per server: `mlflow server` starts uvicorn (or gunicorn) workers, and `stop()` signals
the whole group, so Ctrl-C leaves no orphan workers holding the port. The port is checked by binding
before anything starts, so a busy port is one clear line instead of a worker traceback.

Studies log through the server with `tracking_uri: http://127.0.0.1:PORT` in their spec; artifacts then
travel over HTTP (`--serve-artifacts`) into `--artifacts-destination`.

With `--study` it prints a link straight to the study's trials in MLflow 3's classic ML view. MLflow 3.17's web
app opens in its GenAI view unless the URL says `workflowType=machine_learning` (older 3.x releases read the
experiment tag `mlflow.experimentKind` instead, which the study runner sets too); its runs table shows only
Source/Models/Dataset columns unless a saved view says otherwise, so the study's experiment carries one
(`tracking.study_ui_tags`: searched params, the objective and its SE, best first) and the link opens it
with `viewStateShareKey`. Column choices are not URL params in MLflow 3 (only searchFilter, orderByKey, ...).
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_HOST = "127.0.0.1"    # loopback only: the UI has no authentication
DEFAULT_PORT = 5000           # MLflow's usual port
DASHBOARD_PORT = 8080         # optuna-dashboard's usual port
READY_TIMEOUT_S = 180.0       # mlflow server needs ~20-30 s to answer here (2 busy cores)
STOP_TIMEOUT_S = 15.0         # SIGTERM grace before SIGKILL of the process group
WORKERS = 1                   # server workers: one is plenty for a UI and a few trial processes
JOBS = False                  # MLflow's job runner (GenAI judges, trace rollups): 8 more processes, unused here
WORKFLOW_ML = "machine_learning"  # MLflow 3 UI `workflowType`: the classic runs/metrics view (its default is genai)


class UiError(RuntimeError):
    """A server that cannot start (busy port, bad store, early exit); the message is one line."""


@dataclass
class UiServer:
    """A running MLflow server: `url`, `stop()`, and a context manager that stops it."""

    url: str                                   # http://HOST:PORT
    process: subprocess.Popen                  # the `mlflow server` process (leader of its own group)
    backend_store_uri: str                     # where runs live
    artifacts_destination: str                 # where proxied artifacts land
    log_path: Path                             # the server's stdout + stderr
    started_s: float = 0.0                     # seconds from spawn to the first HTTP 200
    name: str = "mlflow server"                # what runs (for messages)
    _log: Any = field(default=None, repr=False)

    @property
    def pgid(self) -> int:
        """The server's process group id (the same as its pid: it leads a new session)."""
        return self.process.pid

    def alive(self) -> bool:
        """True while any live (non-zombie) process of the server's group remains."""
        return bool(group_members(self.pgid))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `timeout`, reap the leader."""
        _signal_group(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while group_members(self.pgid) and time.monotonic() < deadline:
            self.process.poll()
            time.sleep(0.2)
        if group_members(self.pgid):
            _signal_group(self.pgid, signal.SIGKILL)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        _wait_until(lambda: not group_members(self.pgid), 5.0)
        if self._log is not None and not self._log.closed:
            self._log.close()

    def __enter__(self) -> "UiServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def check_port_free(host: str, port: int) -> None:
    """Raise UiError (one line) if `host:port` cannot be bound right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not busy
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UiError(f"port {port} on {host} is busy (another server is listening there); "
                              f"pick another with --port") from None
            raise UiError(f"cannot bind {host}:{port}: {e.strerror}") from None


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that the OS says is free on `host` now (for tests and `--port 0`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(backend_store_uri: str, artifacts_destination: str, host: str, port: int,
                   workers: int = WORKERS) -> list[str]:
    """The `mlflow server` command line (run with this interpreter, so the venv's mlflow is used)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--serve-artifacts", "--artifacts-destination", artifacts_destination,
            "--host", host, "--port", str(port), "--workers", str(workers)]


def start_ui(backend_store_uri: str, artifacts_destination: str | Path, host: str = DEFAULT_HOST,
             port: int = DEFAULT_PORT, log_path: str | Path | None = None,
             timeout: float = READY_TIMEOUT_S, workers: int = WORKERS, jobs: bool = JOBS) -> UiServer:
    """Start `mlflow server` in its own process group and return once it answers HTTP 200."""
    port = free_port(host) if port == 0 else port
    check_port_free(host, port)
    dest = _artifacts_uri(artifacts_destination)
    _make_sqlite_folder(backend_store_uri)
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(jobs).lower()}
    return launch(server_command(backend_store_uri, dest, host, port, workers), host, port, backend_store_uri,
                  dest, log_path or _tmp_log("ui", port), env, timeout)


def launch(cmd: list[str], host: str, port: int, store: str, dest: str, log_path: str | Path,
           env: dict[str, str] | None = None, timeout: float = READY_TIMEOUT_S, name: str = "mlflow server") -> UiServer:
    """Run `cmd` as the leader of a new process group, logging to `log_path`; return once it answers."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = UiServer(f"http://{_url_host(host)}:{port}", proc, store, dest, log_path, name=name, _log=log)
    try:
        wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    server.started_s = time.monotonic() - t0
    return server


def _tmp_log(kind: str, port: int) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"mgbench-{kind}-{port}.log"


def wait_ready(server: UiServer, timeout: float) -> None:
    """Poll /health (then /) until HTTP 200; raise UiError with the log's last line if the server dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise UiError(f"{server.name} exited with code {server.process.returncode}: "
                          f"{_last_line(server.log_path)} (log: {server.log_path})")
        for path in ("/health", "/"):
            if _http_ok(server.url + path):
                return
        time.sleep(0.5)
    raise UiError(f"{server.name} did not answer on {server.url} within {timeout:.0f} s (log: {server.log_path})")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is `pgid`, read from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def store_for_study(spec_path: str | Path) -> tuple[str, str, int | None]:
    """(backend store URI, artifacts destination, port or None) for a study spec's MLflow store."""
    from mgbench.study.spec import load_spec

    spec = load_spec(spec_path)
    out = Path(spec.out_dir)
    uri = spec.tracking_uri
    if uri.startswith(("http://", "https://")):
        # The study logs through a server: serve its folder's store on the port its spec names.
        return f"sqlite:///{out / 'mlflow.db'}", str(out / "mlartifacts"), urlparse(uri).port
    return uri, str(out / "mlartifacts"), None


def _artifacts_uri(dest: str | Path) -> str:
    s = str(dest)
    if "://" in s or s.startswith("mlflow-artifacts:"):
        return s
    path = Path(s).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _make_sqlite_folder(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


# --- the study's page in the UI -----------------------------------------------------------------------------

def runs_page_link(url: str, experiment_id: str) -> str:
    """The UI page of a study's trials: the classic ML runs table opened on the study's saved view."""
    from mgbench.tracking import RUNS_VIEW_ID

    return f"{url}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_ID}&workflowType={WORKFLOW_ML}"


def mark_study_experiment(tracking_uri: str, spec: Any) -> str | None:
    """Set the study's UI tags on its experiment (studies from before them lack them); its id, None if none yet."""
    from mgbench.tracking import RunStore, study_ui_tags

    store = RunStore(tracking_uri)
    exp_id = store.experiment_id(spec.name)
    if exp_id is not None:
        store.set_experiment_tags(exp_id, study_ui_tags(spec))
    return exp_id


def study_link_lines(url: str, spec: Any) -> list[str]:
    """What `mgbench ui --study` prints about the study: the link to its trials, or how to make some."""
    from mgbench.tracking import tracked_eval

    exp_id = mark_study_experiment(url, spec)
    if exp_id is None:
        return [f"study {spec.name} has no runs yet: `mgbench study run {spec.path}` makes them "
                f"(then run this command again for their link)"]
    metric = next(iter(tracked_eval({spec.optimize.metric: 0.0})))
    return [f"study {spec.name}: {runs_page_link(url, exp_id)}",
            f"  (its trials with columns {', '.join(spec.space)}, {metric} and its SE; best first)"]


# --- command line -------------------------------------------------------------------------------------------

def add_ui_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `ui` (an MLflow tracking server for a study) to an argparse subparsers object."""
    p = subparsers.add_parser("ui", help="serve the MLflow UI and tracking API for a study's runs",
                              description="Start an MLflow tracking server (UI, REST, proxied artifacts) "
                                          "until Ctrl-C. Studies can log through it with "
                                          "tracking_uri: http://HOST:PORT.")
    _add_ui_args(p)
    p.set_defaults(func=cmd_ui)
    return p


def _add_ui_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--study", metavar="SPEC", help="serve this study spec's MLflow store (studies/*.yaml)")
    src.add_argument("--backend-store-uri", metavar="URI",
                     help="MLflow backend store (default: sqlite:///mlflow.db in the current folder)")
    p.add_argument("--artifacts-destination", metavar="DIR",
                   help="where proxied artifacts land (default: mlartifacts next to the store)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None,
                   help=f"port (default: the study's http tracking_uri port, else {DEFAULT_PORT}; 0 = any free)")
    p.add_argument("--workers", type=int, default=WORKERS, help=f"server worker processes (default {WORKERS})")
    p.add_argument("--timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for the server")


def resolve_args(args: argparse.Namespace) -> tuple[str, str, int]:
    """(backend store URI, artifacts destination, port) from parsed `ui` arguments."""
    port_hint = None
    if args.study:
        store, dest, port_hint = store_for_study(args.study)
    else:
        store = args.backend_store_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        dest = str(_default_artifacts(store))
    dest = args.artifacts_destination or dest
    port = args.port if args.port is not None else (port_hint or DEFAULT_PORT)
    return store, dest, port


def _default_artifacts(store: str) -> Path:
    if store.startswith("sqlite:///"):
        return Path(store[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts"
    return Path.cwd() / "mlartifacts"


def cmd_ui(args: argparse.Namespace) -> int:
    """Run the server until Ctrl-C (or SIGTERM); a busy port or a failed start is one line and exit 2."""
    from mgbench.config import ConfigError

    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the server as cleanly as Ctrl-C
    try:
        store, dest, port = resolve_args(args)
        check_port_free(args.host, port)  # before anything is spawned (or a spec's folder is created)
        print(f"starting mlflow server on {args.host}:{port} (store {store}) ...", file=sys.stderr, flush=True)
        server = start_ui(store, dest, args.host, port, timeout=args.timeout, workers=args.workers)
    except (UiError, ConfigError) as e:
        print(f"mgbench ui: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # start_ui has stopped what it started
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    lines = [f"MLflow UI at {server.url}  (store {store}, artifacts {dest}, "
             f"up in {server.started_s:.0f} s, log {server.log_path})"]
    if args.study:
        lines += _study_lines(server, args.study)
    lines.append(f"log studies through it with  tracking_uri: {server.url}   (Ctrl-C stops)")
    return _serve(server, lines)


def _study_lines(server: UiServer, spec_path: str) -> list[str]:
    """study_link_lines, or one line saying why there is no link (the server keeps serving)."""
    from mgbench.study.spec import load_spec

    try:
        return study_link_lines(server.url, load_spec(spec_path))
    except Exception as e:  # noqa: BLE001 - an unreadable experiment must not stop a running server
        reason = (str(e).splitlines() or [""])[0]
        return [f"mgbench ui: warning: no link to the study's runs: {type(e).__name__}: {reason}"]


def _serve(server: UiServer, lines: list[str]) -> int:
    """Print where the server is, wait for Ctrl-C / SIGTERM (or the server's death), then stop the group."""
    for line in lines:
        print(line, flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = server.process.wait()
        print(f"mgbench: {server.name} exited with code {code}: {_last_line(server.log_path)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopping the {server.name} ...", flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


# --- optuna-dashboard (optional: only where the package is installed) ---------------------------------------

def dashboard_command(storage: str, host: str, port: int) -> list[str]:
    """The optuna-dashboard command line for an Optuna storage URI (mgbench's `journal:///path` included)."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise UiError("optuna-dashboard is not installed (pip install optuna-dashboard); it is optional")
    cmd = [sys.executable, "-m", "optuna_dashboard._cli"]
    if storage.startswith("journal://"):
        cmd += [storage[len("journal://"):], "--storage-class", "JournalFileStorage"]
    else:
        cmd += [storage]
    return cmd + ["--host", host, "--port", str(port), "--server", "wsgiref"]


def start_dashboard(storage: str, host: str = DEFAULT_HOST, port: int = DASHBOARD_PORT,
                    log_path: str | Path | None = None, timeout: float = READY_TIMEOUT_S) -> UiServer:
    """Start optuna-dashboard on a study's storage in its own process group; return once it answers."""
    port = free_port(host) if port == 0 else port
    cmd = dashboard_command(storage, host, port)
    check_port_free(host, port)
    return launch(cmd, host, port, storage, "", log_path or _tmp_log("dashboard", port), timeout=timeout,
                  name="optuna-dashboard")


def add_dashboard_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `dashboard` (optuna-dashboard on a study's Optuna storage) to an argparse subparsers object."""
    p = subparsers.add_parser("dashboard", help="serve optuna-dashboard for a study (needs optuna-dashboard)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", metavar="SPEC", help="the study spec whose Optuna storage to show")
    src.add_argument("--storage", metavar="URI", help="an Optuna storage URI (sqlite:///..., journal:///...)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DASHBOARD_PORT, help=f"port (default {DASHBOARD_PORT}; 0 = any free)")
    p.set_defaults(func=cmd_dashboard)
    return p


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Run optuna-dashboard until Ctrl-C; a missing package, busy port or bad spec is one line and exit 2."""
    from mgbench.config import ConfigError

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.study:
            from mgbench.study.spec import load_spec

            storage = load_spec(args.study).storage
        else:
            storage = args.storage
        server = start_dashboard(storage, args.host, args.port)
    except (UiError, ConfigError) as e:
        print(f"mgbench dashboard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _serve(server, [f"optuna-dashboard at {server.url}  (storage {storage}, log {server.log_path})"])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`python -m mgbench.ui ...`: the same as `mgbench ui ...`."""
    p = argparse.ArgumentParser(prog="mgbench ui", description="Serve the MLflow UI for a study.")
    _add_ui_args(p)
    return cmd_ui(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
