"""What became of a trial's job: alive, ended, cancelled, unknown (the grace clock runs) or unreachable.

SLURM jobs are asked of the controller first (`squeue --states=all`: pending, running and recently ended
jobs, no accounting lag), then of accounting (`sacct`) for the rest. A job that SLURM reports UNKNOWN, or that
neither knows (MISSING: accounting forgot an old id, a cluster restarted), is `unknown`; the driver calls it
lost once it stays so for `LOST_AFTER_S`. A controller that does not answer is `unreachable`: nothing is
decided then. Local jobs are processes (the submitit controller's pid); debug jobs live in the driver.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALIVE, ENDED, CANCELLED, UNKNOWN, UNREACHABLE = "alive", "ended", "cancelled", "unknown", "unreachable"
ALIVE_SLURM = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "READY"}
UNKNOWN_SLURM = {"UNKNOWN", "MISSING"}  # MISSING: neither squeue nor sacct knows the job id
LOST_AFTER_S = 600.0      # a job unknown to SLURM this long is lost: resubmitted from its checkpoint
SLURM_CMD_TIMEOUT_S = 60  # squeue / sacct / scancel: longer means the controller does not answer


@dataclass
class JobState:
    kind: str                      # alive | ended | cancelled | unknown | unreachable
    raw: str                       # what the executor said: a SLURM state, MISSING, pid alive/gone, ...

    def label(self) -> str:
        """`alive`, `ended`, or the executor's word when it says more (`UNKNOWN`, `MISSING`, `CANCELLED by 0`)."""
        return self.kind if self.kind in (ALIVE, ENDED) else self.raw


def job_states(refs: list[dict[str, str]], handles: list[Any] | None = None) -> list[JobState]:
    """The state of each job (handles: the live submitit jobs where the driver has them), one squeue call and at
    most one sacct call for all SLURM jobs."""
    handles = handles or [None] * len(refs)
    slurm_ids = [r["job_id"] for r in refs if r.get("executor") == "slurm"]
    raw = slurm_states(slurm_ids) if slurm_ids else {}
    out = []
    for ref, job in zip(refs, handles):
        kind = ref.get("executor")
        if kind == "slurm":
            out.append(UNREACHABLE_STATE if raw is None else classify_slurm(raw[ref["job_id"]]))
        elif job is not None:  # local / debug with a live handle (debug jobs run inside done())
            out.append(JobState(ENDED, "done") if job.done() else JobState(ALIVE, "running"))
        elif kind == "local":
            alive = pid_alive(int(ref["job_id"]))
            out.append(JobState(ALIVE, "pid alive") if alive else JobState(ENDED, "pid gone"))
        else:
            out.append(JobState(ENDED, "debug job of another driver"))
    return out


UNREACHABLE_STATE = JobState(UNREACHABLE, "squeue does not answer")


def classify_slurm(state: str) -> JobState:
    """A SLURM state (`RUNNING`, `CANCELLED by 0`, `MISSING`, ...) -> its kind."""
    word = state.split(" ")[0].upper().rstrip("+")
    if word in ALIVE_SLURM:
        return JobState(ALIVE, state)
    if word == "CANCELLED":
        return JobState(CANCELLED, state)
    if word in UNKNOWN_SLURM:
        return JobState(UNKNOWN, state)
    return JobState(ENDED, state)


def slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """SLURM state of each job id (array task: JOBID_TASK): squeue, then sacct for the rest; MISSING when neither
    knows it; None when squeue does not answer (the controller is down: nothing can be decided)."""
    ids = sorted(set(job_ids))
    bases = ",".join(sorted({j.split("_")[0] for j in ids}))
    queued = _ask(["squeue", "--states=all", "-h", "-r", "-o", "%i|%T", "-j", bases], "Invalid job id")
    if queued is None:
        return None
    states = {i: queued[i] for i in ids if i in queued}
    rest = [i for i in ids if i not in states]
    if rest:  # accounting unavailable ({}): the controller no longer knows these jobs either way
        accounted = _ask(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(rest)], None) or {}
        states.update({i: accounted.get(i, "MISSING") for i in rest})
    return states


def _ask(cmd: list[str], unknown_ok: str | None) -> dict[str, str] | None:
    """Run squeue/sacct: `id|state` lines -> {id: state}; {} when it says `unknown_ok`; None when it fails."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=SLURM_CMD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return {} if unknown_ok and unknown_ok in p.stderr else None
    out = {}
    for line in p.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            out[job] = state.strip()
    return out


def cancel_job(ref: dict[str, str]) -> str | None:
    """Stop a job for good (SLURM: scancel; local: kill the controller and its tasks); the error, or None."""
    kind = ref.get("executor")
    if kind == "slurm":
        try:
            p = subprocess.run(["scancel", ref["job_id"]], capture_output=True, text=True,
                               timeout=SLURM_CMD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"scancel {ref['job_id']}: {e}"
        return None if p.returncode == 0 else (p.stderr.strip() or f"scancel exited {p.returncode}")
    if kind == "local":
        kill_tree(int(ref["job_id"]))
        return None
    return f"a {kind} job cannot be cancelled from outside its driver"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (a local job: submitit's controller and its task processes; SIGTERM
    and SIGINT are bypassed or ignored there)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def descendants(pid: int) -> list[int]:
    """Every live descendant of a process (from /proc/<pid>/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not: PID 1 may not reap here)."""
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(ref: dict[str, str], timeout_s: float, poll_s: float = 0.5) -> JobState:
    """Wait (at most timeout_s) until a job is no longer alive; its last state."""
    deadline = time.monotonic() + timeout_s
    while True:
        (state,) = job_states([ref])
        if state.kind not in (ALIVE, UNREACHABLE) or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def find_submitted(folder_pattern: str, number: int, token: str, since: float) -> list[str]:
    """Job ids whose submitit pickle holds this trial's submission `token` (a driver killed after sbatch answered
    and before trial.json had the job id): the submitit folders made since `since`, newest last."""
    from submitit.core.utils import DelayedSubmission

    root = Path(folder_pattern.replace("%j", "@")).parent if "%j" in folder_pattern else Path(folder_pattern)
    found = []
    for pkl in sorted(root.glob("*/*_submitted.pkl"), key=lambda p: p.stat().st_mtime):
        if pkl.stat().st_mtime < since - 1:
            continue
        try:
            fn = DelayedSubmission.load(pkl).function
        except Exception:  # noqa: BLE001 - a pickle of another kind or being written
            continue
        if getattr(fn, "number", None) == number and getattr(fn, "submit_token", None) == token:
            found.append(pkl.name[: -len("_submitted.pkl")])
    return found
