"""The zygote of warm local jobs (mgbench.study.warm): imports torch, MLflow and the trainer once, then forks one job
controller per request of its driver (a JSON line on stdin; replies and job ends on stdout) until stdin closes.

The controller is submitit's local controller (timeout, USR2 before it, requeue on exit 144, SIGINT then SIGKILL)
whose tasks are forks too; a task runs submitit's `process_job` as `python -u -m submitit.core._submit` would, with
the driver's environment and directory, then ends as a Python process ends (threads joined, atexit run). Run as
`python -m mgbench.study.warm_zygote MODULE...`.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn, TextIO

import submitit
from submitit.core import utils
from submitit.local.local import Controller

FORK_SAFE_THREADS = {"jemalloc_bg_thd"}  # pyarrow's allocator thread (mlflow -> pandas): jemalloc re-arms it in a fork
PICKLE_WAIT_S = 60.0      # a forked controller waits this long for the driver to move the job's pickle in place
DEFAULT_THREADS: int | None = None  # torch threads of a fresh Python without OMP_NUM_THREADS (set by main)


def main(preload: list[str]) -> None:
    """The zygote: import `preload`, then fork one job controller per request line until stdin closes."""
    global DEFAULT_THREADS
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the driver and the jobs; this ends with the driver
    replies = os.dup(1)
    os.dup2(2, 1)  # what an import prints goes to stderr, never into the replies
    unset = "OMP_NUM_THREADS" not in os.environ
    if unset:  # else importing torch starts OpenMP's threads, and a fork of a process with them may hang
        os.environ["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the job itself raises the real error
            pass
    if unset and "torch" in sys.modules:  # torch's default when OMP_NUM_THREADS is unset (the interop pool's too)
        DEFAULT_THREADS = sys.modules["torch"].get_num_interop_threads()
    problem = fork_problem()
    _reply(replies, {"event": "ready", "import_s": time.perf_counter() - t0, "problem": problem})
    if problem:
        return
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD wakes select through wake_w
    buf = b""
    while True:
        ready = select.select([0, wake_r], [], [])[0]
        if wake_r in ready:
            os.read(wake_r, 1 << 12)
            for pid, code in _reap():
                _reply(replies, {"event": "ended", "pid": pid, "code": code})
        if 0 in ready:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return  # the driver is gone; its jobs run on
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                _reply(replies, _fork_controller(json.loads(line), (replies, wake_r, wake_w)))


def fork_problem() -> str | None:
    """Why a fork of this process could not run a job safely (a CUDA context, other threads), or None."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised while importing"
    try:
        tasks = [t for t in os.listdir("/proc/self/task") if int(t) != threading.get_native_id()]
        names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in tasks]
    except OSError:  # no /proc: Python's own threads only
        names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    others = sorted({n for n in names if n not in FORK_SAFE_THREADS})
    return f"threads running after the imports ({', '.join(others)})" if others else None


def _reply(fd: int, msg: dict[str, Any]) -> None:
    os.write(fd, json.dumps(msg).encode() + b"\n")


def _reap() -> list[tuple[int, int]]:
    """Reap every ended child (job controllers): (pid, exit code)."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, os.waitstatus_to_exitcode(status)))


def _fork_controller(req: dict[str, Any], close: tuple[int, ...]) -> dict[str, Any]:
    """Fork the controller of one job (the reply to the driver); the child runs it and exits."""
    try:
        pid = os.fork()
    except OSError as e:
        return {"event": "error", "error": f"fork failed ({e})"}
    if pid:
        return {"event": "forked", "pid": pid}
    code = 1
    try:
        _become_job(req, close)
        WarmController(Path(req["folder"])).run()
        code = 0
    except BaseException:  # noqa: BLE001 - as an uncaught error ends a cold controller
        traceback.print_exc()
    finally:
        _exit(code, run_atexit=False)  # nothing of a controller's is registered there


def _become_job(req: dict[str, Any], close: tuple[int, ...]) -> None:
    """Turn a fresh fork of the zygote into a job's process: signals, files, directory and environment of the driver."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in close:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[1:1] = entries  # as a fresh Python would put them (the zygote's own are there already)


class ForkedTask:
    """A task the controller forked, as the controller handles a subprocess: poll() and send_signal()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, sig)


class WarmController(Controller):
    """submitit's local job controller (timeout, USR2, requeue, SIGINT then SIGKILL) whose tasks are forks."""

    def start_tasks(self) -> None:
        self.folder.mkdir(exist_ok=True)
        paths = [utils.JobPaths(self.folder, self.pid, k) for k in range(self.ntasks)]
        _wait_for_pickle(paths[0].submitted_pickle)
        self.stdouts = [p.stdout.open("a") for p in paths]
        self.stderrs = self.stdouts if self.stderr_to_stdout else [p.stderr.open("a") for p in paths]
        for k in range(self.ntasks):
            pid = os.fork()
            if pid == 0:
                _run_task(str(self.folder), k, self.pid, self.stdouts[k], self.stderrs[k])
            self.tasks.append(ForkedTask(pid))  # type: ignore[arg-type]


def _wait_for_pickle(path: Path) -> None:
    """Wait until the driver has moved the job's pickle into its folder (a fork starts sooner than a new Python, so
    the folder may not be there yet); after PICKLE_WAIT_S go on as submitit does (process_job waits, then fails)."""
    deadline = time.monotonic() + PICKLE_WAIT_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    path.parent.mkdir(parents=True, exist_ok=True)


def _run_task(folder: str, k: int, job_id: str, out: TextIO, err: TextIO) -> NoReturn:
    """Task k of a job: what `python -u -m submitit.core._submit <folder>` does, in this fork; never returns."""
    from submitit.core.submission import process_job

    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the controller's forwarding handler is not the task's
        os.environ.update(SUBMITIT_LOCAL_LOCALID=str(k), SUBMITIT_LOCAL_GLOBALID=str(k), SUBMITIT_LOCAL_JOB_ID=job_id)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = io.TextIOWrapper(open(1, "wb", 0, closefd=False), write_through=True)  # python -u
        sys.stderr = io.TextIOWrapper(open(2, "wb", 0, closefd=False), write_through=True, errors="backslashreplace")
        sys.argv = [str(Path(submitit.__file__).parent / "core" / "_submit.py"), folder]
        _fresh_state()
        process_job(folder)
        code = 0
    except SystemExit as e:  # submitit's requeue exits 144
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # noqa: BLE001 - as an uncaught error ends a cold task: traceback on stderr, exit 1
        traceback.print_exc()
    finally:
        _exit(code, run_atexit=True)


def _fresh_state() -> None:
    """What a fresh Python would differ in: numpy's global seed (random reseeds itself in a fork), torch's threads
    (the zygote imported torch on one thread: OMP_NUM_THREADS of the job's environment, else torch's default)."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
    torch = sys.modules.get("torch")
    named = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(named) if named.isdigit() and int(named) > 0 else DEFAULT_THREADS
    if torch is not None and threads:
        torch.set_num_threads(threads)


def _exit(code: int, run_atexit: bool) -> NoReturn:
    """End this fork as Python ends a process (threads joined, atexit handlers run, streams flushed), without
    unwinding into the zygote's or the controller's loop."""
    if run_atexit:
        for t in threading.enumerate():
            if t is not threading.current_thread() and not t.daemon:
                t.join()
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
    os._exit(0)  # no teardown of torch & co. (a second): the driver waits for this exit when it lets the zygote go
