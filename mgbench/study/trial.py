"""One trial on disk and as a job: `trial.json` (identity, written before training), `result.json`, `TrialJob`.

The job is a submitit `Checkpointable`: a preempted or timed-out SLURM job resubmits itself, and the
rerun trains on in the same folder, where the trainer resumes from its latest checkpoint. A job that could
not write a checkpoint (full disk, file-size limit) ends "resumable": the driver resubmits it like a dead
job, from its latest checkpoint, counted against max_retries.
"""
from __future__ import annotations

import importlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import submitit

from mgbench.config import train_config_from_dict
from mgbench.redact import redact
from mgbench.study.spec import StudySpec
from mgbench.study.spec_checks import DEFAULT_ENTRY, DEFAULT_EVAL_HOOK
from mgbench.tracking import TAG_SLURM_JOB, TAG_STATUS, MlflowTracker

TRIAL_FILE = "trial.json"     # identity: study, number, Optuna trial id, MLflow run id, folder, params, config, jobs
RESULT_FILE = "result.json"   # outcome of the latest job: status, value, metrics, step, error
PROGRESS_FILE = "progress.json"  # the trainer's latest report: step, total, rate, ETA, loss, last evaluation
RESUMABLE = "resumable"       # result.json status of a job stopped by its environment (a checkpoint it could not write)


def trial_dir(spec: StudySpec, number: int) -> Path:
    """The trial's folder: identity, result and the trainer's checkpoints."""
    return Path(spec.out_dir) / "trials" / f"{number:04d}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (write a sibling, then rename), so readers never see half a file; URI passwords
    (storage, tracking URI, an error that quotes one) are masked: the job reads its URIs from the spec."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(redact(data), indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON file, or None when it is not there."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_trial(folder: Path) -> dict[str, Any]:
    """The identity record of the trial in `folder`."""
    rec = read_json(folder / TRIAL_FILE)
    if rec is None:
        raise FileNotFoundError(f"{folder / TRIAL_FILE}: no trial record")
    return rec


def list_trials(spec: StudySpec) -> dict[int, dict[str, Any]]:
    """Every trial record of the study, by trial number."""
    root = Path(spec.out_dir) / "trials"
    out = {}
    for f in sorted(root.glob(f"*/{TRIAL_FILE}")):
        rec = read_json(f)
        if rec is not None:
            out[int(rec["number"])] = rec
    return out


def slurm_job_tag() -> str | None:
    """The SLURM job id of this process (array tasks: JOBID_TASK), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def load_entry(entry: str) -> Callable[..., Any]:
    """The function a spec's `entry` or `eval_hook` names: mgbench's own trainer and evaluation hook are imported
    directly (the link is visible to readers and tools); any other `module:function` is imported by name."""
    if entry == DEFAULT_ENTRY:
        from mgbench.trainer.loop import train

        return train
    if entry == DEFAULT_EVAL_HOOK:
        from mgbench.evaluation import make_eval_hook

        return make_eval_hook
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)


class PruningHook:
    """Wraps the evaluation hook: reports the objective metric to Optuna and raises TrialPruned when told."""

    def __init__(self, inner: Callable[[Any], dict[str, float]] | None, spec: StudySpec, trial_id: int) -> None:
        self.inner = inner
        self.spec = spec
        self.trial_id = trial_id
        self._trial = None

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            from mgbench.study.optuna_io import open_study

            self._trial = optuna.trial.Trial(open_study(self.spec, create=False), self.trial_id)
        return self._trial

    def __call__(self, ctx: Any) -> dict[str, float]:
        from mgbench.trainer.distributed import on_rank0

        metrics = self.inner(ctx) if self.inner is not None else {}
        # Rank 0 decides; the decision (TrialPruned, or a storage error) is raised on every rank at once.
        on_rank0(lambda: self._report(ctx, metrics), getattr(ctx, "rank", 0), getattr(ctx, "world_size", 1))
        return metrics

    def _report(self, ctx: Any, metrics: dict[str, float]) -> None:
        """Rank 0: report the objective metric to Optuna; raise TrialPruned when the pruner says so."""
        value = metrics.get(self.spec.optimize.metric)
        if value is None:
            return
        trial = self._optuna_trial()
        trial.report(float(value), int(ctx.step))
        final = int(ctx.step) >= int(ctx.cfg.train.steps)
        if not final and self.spec.pruning.type != "none" and trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"pruned at step {ctx.step}: {self.spec.optimize.metric}={value:.4g}")


def make_inner_hook(spec: StudySpec, cfg: Any) -> Callable[[Any], dict[str, float]]:
    """The evaluation hook the spec names (a factory `cfg -> hook`)."""
    try:
        factory = load_entry(spec.eval_hook)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"eval_hook {spec.eval_hook!r} cannot be imported ({e})") from None
    return factory(cfg)


def _export_distributed() -> int:
    """Multi-task jobs: export torch.distributed's env (MASTER_ADDR, RANK, ...); returns the global rank."""
    try:
        env = submitit.JobEnvironment()
        ntasks = env.num_tasks
    except Exception:
        return int(os.environ.get("RANK", 0))
    if ntasks > 1:
        return submitit.helpers.TorchDistributedEnvironment().export().rank
    return 0


def local_threads(spec: StudySpec, cpus: int | None = None, env: dict[str, str] | None = None) -> int | None:
    """Torch threads for a trial on the local executor: the machine's cores shared by the trials in flight
    (2 cores, parallelism 2 -> 1 thread each, not 2 x 2 fighting for 2 cores). None: leave torch alone
    (another executor, or the user set OMP_NUM_THREADS)."""
    env = os.environ if env is None else env
    if spec.executor.type != "local" or env.get("OMP_NUM_THREADS"):
        return None
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, spec.parallelism))


def slurm_threads(env: dict[str, str] | None = None) -> int | None:
    """Torch threads for a task of a SLURM job: its CPUs (SLURM_CPUS_PER_TASK, from cpus_per_task), else the
    job's CPUs on the node shared by its tasks there; with task/none nothing else stops a task from using every
    core of the node. None: outside SLURM, or the user set OMP_NUM_THREADS."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID") or env.get("OMP_NUM_THREADS"):
        return None
    per_task = _leading_int(env.get("SLURM_CPUS_PER_TASK"))
    if per_task:
        return per_task
    on_node = _leading_int(env.get("SLURM_JOB_CPUS_PER_NODE"))  # "8", "8(x2)" or "8,4": this node comes first
    tasks = _leading_int(env.get("SLURM_NTASKS_PER_NODE")) or _leading_int(env.get("SLURM_TASKS_PER_NODE")) or 1
    return max(1, on_node // tasks) if on_node else None


def trial_threads(spec: StudySpec, env: dict[str, str] | None = None) -> int | None:
    """Torch threads for the trial in this process (local: a share of the machine; SLURM: the job's CPUs)."""
    if spec.executor.type == "slurm":
        return slurm_threads(env)
    return local_threads(spec, env=env)


def _leading_int(text: str | None) -> int | None:
    digits = ""
    for ch in text or "":
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


class TrialProgress:
    """The trainer's progress callback in a trial: a plain line in the job's log and `progress.json` beside
    `trial.json` (what `study run` and `study status` show for a running trial)."""

    def __init__(self, folder: Path) -> None:
        from mgbench.trainer.progress import ConsoleProgress

        self.path = folder / PROGRESS_FILE
        self.lines = ConsoleProgress(bar=False)   # a job log is a file: plain lines, never a bar
        self.loss: float | None = None
        self.eval: dict[str, Any] = {}
        self.started_at = time.time()

    def __call__(self, p: Any) -> None:
        from mgbench.trainer.progress import shown_values

        self.lines(p)
        if p.kind == "eval":
            self.eval = {"step": p.done, "metrics": shown_values(p.values)}
        elif "loss" in p.values:
            self.loss = float(p.values["loss"])
        write_json(self.path, {"step": p.done, "total": p.total, "steps_per_s": p.rate, "eta_s": p.eta_s,
                               "loss": self.loss, "eval": self.eval, "job_started_at": self.started_at,
                               "updated_at": time.time(), "pid": os.getpid()})


def _accepts_progress(train: Callable[..., Any]) -> bool:
    """Whether a trainer entry takes `progress=` (stand-ins such as sleep_train need not)."""
    import inspect

    try:
        params = inspect.signature(train).parameters
    except (TypeError, ValueError):
        return False
    return "progress" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


class TrialJob(submitit.helpers.Checkpointable):
    """Trains one trial from its `trial.json`; rerunning it resumes the same trial, run and folder."""

    def __init__(self, spec: StudySpec, number: int, submit_token: str | None = None) -> None:
        self.spec = spec
        self.number = number
        self.submit_token = submit_token  # trial.json's `submitting.token`: a rerun driver finds this job by it

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Preempted or timed out: requeue the same trial (the trainer resumes from its checkpoint)."""
        return submitit.helpers.DelayedSubmission(TrialJob(self.spec, self.number, getattr(self, "submit_token", None)))

    def __call__(self) -> dict[str, Any]:
        folder = trial_dir(self.spec, self.number)
        rec = read_trial(folder)
        rank = _export_distributed()
        threads = trial_threads(self.spec)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        started = time.time()
        tracker = MlflowTracker(rec["run_id"], self.spec.tracking_uri) if rank == 0 else None
        if tracker is not None:
            tracker.store.log_tags(tracker.run_id, {TAG_STATUS: "running", TAG_SLURM_JOB: slurm_job_tag()})
        try:
            result = self._train(rec, tracker)
        except Exception as e:  # noqa: BLE001 - every failure is recorded, never lost
            result = _failure(e)
        if rank == 0:
            result.update(started_at=started, finished_at=time.time(), pid=os.getpid())
            write_json(folder / RESULT_FILE, result)
            if tracker is not None:
                _close_run(tracker, result)
        return result

    def _train(self, rec: dict[str, Any], tracker: MlflowTracker | None) -> dict[str, Any]:
        import optuna

        from mgbench.trainer.checkpoint import CheckpointWriteError

        cfg = train_config_from_dict(rec["config"], f"{rec['out_dir']}/{TRIAL_FILE}")
        hook = PruningHook(make_inner_hook(self.spec, cfg), self.spec, rec["trial_id"])
        train = load_entry(self.spec.entry)
        extra = {"progress": TrialProgress(trial_dir(self.spec, self.number))} if _accepts_progress(train) else {}
        try:
            res = train(cfg, tracker=tracker, eval_hook=hook, **extra)
        except optuna.TrialPruned as e:
            return {"status": "pruned", "value": None, "metrics": {}, "step": None, "error": str(e)}
        except CheckpointWriteError as e:  # the environment, not the trial: resubmitted from its latest checkpoint
            return {"status": RESUMABLE, "value": None, "metrics": {}, "step": None, "error": str(e)}
        metrics = {k: float(v) for k, v in (res.metrics or {}).items()}
        value = metrics.get(self.spec.optimize.metric)
        status = res.status
        error = None
        if status == "finished" and value is None:
            status, error = "failed", f"objective metric {self.spec.optimize.metric!r} not in {sorted(metrics)}"
        return {"status": status, "value": value, "metrics": metrics, "step": res.step, "error": error}


def _failure(e: BaseException) -> dict[str, Any]:
    return {"status": "failed", "value": None, "metrics": {}, "step": None,
            "error": "".join(traceback.format_exception_only(type(e), e)).strip(),
            "traceback": traceback.format_exc()}


def _close_run(tracker: MlflowTracker, result: dict[str, Any]) -> None:
    """Flush metrics; a finished, failed or pruned trial ends its MLflow run (paused or resumable keeps it running)."""
    tracker.flush()
    status = result["status"]
    if status in ("paused", RESUMABLE):
        return
    error = (result.get("error") or "failed") if status == "failed" else None
    tracker.store.set_status(tracker.run_id, status, error, result.get("traceback"))
