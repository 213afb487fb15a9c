"""Warm local jobs: each job's controller is forked from a "zygote" that has torch, MLflow and the trainer imported.

submitit's LocalExecutor starts a controller and a fresh Python per job, which imports torch, MLflow and the
trainer again: seconds per trial. Here one zygote per driver imports them once and forks each job's controller,
which forks its tasks; a task runs submitit's own `process_job`. So a job keeps everything a cold one has: the
same folder, pickles, logs and result files, the controller's pid as job id (jobstate, trial.json), USR2 before
the timeout, requeue on exit 144, SIGINT then SIGKILL to stop; one process tree per job, so a trial that crashes
its process costs the next one nothing. Jobs outlive the zygote and the driver: a rerun re-attaches by pid.

The zygote (mgbench.study.warm_zygote) exits when the driver's end of its pipe closes (the driver ended or was
killed). A zygote that died is started again at the next submit; one that cannot start, or whose imports made
forking unsafe (a CUDA context, threads), leaves the jobs to cold controllers (one line on stderr). The zygote tells
the driver at once when a job ends, so the driver need not sleep out its poll interval. `executor: {type: local,
warm: false}`: always cold.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.local.local import LocalExecutor, LocalJob

from mgbench.study.jobstate import pid_alive

PRELOAD = ("torch", "mlflow", "optuna", "submitit.core.submission", "mgbench.study.trial")  # + the spec's entry modules
START_TIMEOUT_S = 300.0   # the zygote's imports (torch under load) before its first fork; longer: jobs start cold
MAX_FAILED_STARTS = 2     # zygotes that died or never answered in a row before every job starts cold


class ZygoteError(RuntimeError):
    """The zygote did not fork a job (it died, never answered, or cannot fork safely)."""

    def __init__(self, message: str, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting  # starting another zygote would not help (its imports make forking unsafe)


class Zygote:
    """The driver's handle on its zygote process: ask for a job controller, hear when jobs end."""

    def __init__(self, preload: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mgbench.study.warm_zygote", *preload],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ended = 0             # job ends heard and not yet waited for
        self._buf = b""

    def fork(self, folder: Path, env: dict[str, str], timeout_s: float = START_TIMEOUT_S) -> int:
        """Fork a job controller for `folder` with this environment; its pid."""
        self._send({"folder": str(folder), "env": env, "cwd": os.getcwd()})
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._next(deadline - time.monotonic())
            if msg is None:
                raise ZygoteError(f"no answer within {timeout_s:.0f} s")
            if msg["event"] == "forked":
                return int(msg["pid"])
            if msg["event"] == "ended":
                self.ended += 1
            elif msg["event"] == "ready" and msg.get("problem"):
                raise ZygoteError(f"cannot fork safely: {msg['problem']}", lasting=True)
            elif msg["event"] == "error":
                raise ZygoteError(msg["error"])

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, less when one of its jobs ends (or ended since the last wait)."""
        deadline = time.monotonic() + seconds
        while not self.ended:
            try:
                msg = self._next(deadline - time.monotonic())
            except ZygoteError:  # gone: nothing will wake us early
                time.sleep(max(0.0, deadline - time.monotonic()))
                return
            if msg is None:
                return
            if msg["event"] == "ended":
                self.ended += 1
        self.ended = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Close its pipe (it exits; the jobs it forked run on)."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError) as e:
            raise ZygoteError(f"gone ({e})") from None

    def _next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message; None when none came within timeout_s."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise ZygoteError(f"exited with code {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


class WarmJob(LocalJob):
    """A job whose controller the zygote forked: running while its pid lives (the zygote, not the driver, reaps it)."""

    def get_info(self, mode: str = "force") -> dict[str, str]:  # submitit's signature
        if pid_alive(int(self.job_id)):
            return {"jobState": "RUNNING"}
        return {"jobState": "FINISHED" if self.paths.result_pickle.exists() else "INTERRUPTED"}

    def cancel(self, check: bool = True) -> None:  # as LocalJob: SIGINT to the controller
        with contextlib.suppress(OSError):
            os.kill(int(self.job_id), signal.SIGINT)


class WarmExecutor(LocalExecutor):
    """submitit's LocalExecutor whose job controllers the zygote forks (a cold controller when it cannot)."""

    def __init__(self, folder: str | Path, preload: list[str]) -> None:
        super().__init__(folder)
        self.preload = preload
        self.zygote: Zygote | None = None
        self.cold_reason: str | None = None  # why every job now starts cold
        self._failed_starts = 0

    def _submit_command(self, command: str) -> LocalJob:
        if self.parameters.get("setup") or self.cold_reason:  # set-up lines need the shell a cold controller has
            return super()._submit_command(command)
        try:
            pid = self._fork(controller_env(self.parameters, command))
        except ZygoteError as e:  # the real stderr: the driver keeps submitit's own echo back (lifecycle)
            later = " (and every later one)" if self.cold_reason else ""
            print(f"warm local executor: {e}; this job starts cold{later}", file=sys.__stderr__, flush=True)
            return super()._submit_command(command)
        return WarmJob(folder=self.folder, job_id=str(pid), tasks=list(range(self.parameters.get("tasks_per_node", 1))))

    def _fork(self, env: dict[str, str]) -> int:
        """Fork a controller from the zygote, started first when there is none or it died; after a failure the job
        starts cold, after MAX_FAILED_STARTS in a row (or an unsafe zygote) every job does."""
        if self.zygote is None or not self.zygote.alive():
            self.zygote = Zygote(self.preload)
        try:
            pid = self.zygote.fork(self.folder, env)
        except ZygoteError as e:
            self.close()
            self._failed_starts += 1
            if e.lasting or self._failed_starts >= MAX_FAILED_STARTS:
                self.cold_reason = str(e)
            raise
        self._failed_starts = 0
        return pid

    def pause(self, seconds: float) -> None:
        """Sleep up to `seconds`, less when a job of this executor ends."""
        if self.zygote is None or not self.zygote.alive():
            time.sleep(seconds)
        else:
            self.zygote.wait(seconds)

    def close(self) -> None:
        """Let the zygote go (jobs already forked run on); a later submit starts another."""
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None


class WarmAutoExecutor(submitit.AutoExecutor):
    """submitit's AutoExecutor for cluster "local" (its parameter names and checks) whose jobs start warm."""

    def __init__(self, folder: str | Path, preload: list[str]) -> None:
        super().__init__(folder=folder, cluster="local")
        self._executor: WarmExecutor = WarmExecutor(folder, preload)  # in place of the LocalExecutor it made
        self.parameters = self._executor.parameters

    def pause(self, seconds: float) -> None:
        self._executor.pause(seconds)

    def close(self) -> None:
        self._executor.close()


def controller_env(params: dict[str, Any], command: str) -> dict[str, str]:
    """The environment of a job controller, as submitit.local.local.start_controller sets it (its defaults too)."""
    n_gpus = params.get("gpus_per_node", 0)
    visible = params.get("visible_gpus", ())
    gpus = range(n_gpus) if visible == () else visible[:n_gpus]
    return {**os.environ, "SUBMITIT_LOCAL_NTASKS": str(params.get("tasks_per_node", 1)),
            "SUBMITIT_LOCAL_COMMAND": command,
            "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * params.get("timeout_min", 2.0))),
            "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(int(params.get("signal_delay_s", 30))),
            "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
            "SUBMITIT_STDERR_TO_STDOUT": "1" if params.get("stderr_to_stdout", False) else "",
            "SUBMITIT_EXECUTOR": "local", "CUDA_VISIBLE_DEVICES": ",".join(str(k) for k in gpus),
            "SUBMITIT_LOCAL_WITH_SHELL": ""}
