"""Dispatch via submitit: executor parameters (site profile + per-study overrides), sbatch previews, job liveness.

Spec option names are submitit's: the shared ones (timeout_min, mem_gb, gpus_per_node, tasks_per_node,
cpus_per_task, nodes) as they are, SLURM-only ones (partition, account, qos, array_parallelism, setup,
constraint, ...) with or without the `slurm_` prefix, `additional` for extra sbatch flags. submitit
checks the names (unknown ones are errors). `warm` (local only, default true) is mgbench's own: local jobs are
forked from a process with torch and MLflow imported (mgbench.study.warm); `warm: false` starts a fresh Python
per job (submitit's LocalExecutor).
"""
from __future__ import annotations

import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from mgbench.config import ConfigError
from mgbench.study.guards import time_limit_problem
from mgbench.study.jobstate import ALIVE, job_states
from mgbench.study.spec import StudySpec
from mgbench.study.spec_checks import DEFAULT_EVAL_HOOK
from mgbench.study.versions import check_unchanged
from mgbench.study.warm import PRELOAD, WarmAutoExecutor

GENERIC = ("name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node",
           "stderr_to_stdout")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60    # local/debug: submitit's default (2 min) would kill real trials
SLURM_TIMEOUT_MIN = 60             # slurm: when neither profile nor spec sets timeout_min
# Values submitit passes on unchecked (it checks names and types only): name -> (least value, what it is).
MIN_VALUES = {"timeout_min": (1, "minutes"), "mem_gb": (1e-9, "GB"), "nodes": (1, "nodes"),
              "tasks_per_node": (1, "tasks per node"), "cpus_per_task": (1, "CPUs per task"),
              "gpus_per_node": (0, "GPUs per node"), "slurm_nodes": (1, "nodes"),
              "slurm_ntasks_per_node": (1, "tasks per node"), "slurm_cpus_per_task": (1, "CPUs per task"),
              "slurm_gpus_per_node": (0, "GPUs per node"), "slurm_gpus_per_task": (0, "GPUs per task"),
              "slurm_cpus_per_gpu": (1, "CPUs per GPU"), "slurm_array_parallelism": (1, "array tasks at once"),
              "slurm_signal_delay_s": (0, "seconds")}
SLURM_TIME = re.compile(r"\d+|\d+:\d{1,2}(:\d{1,2})?|\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?")  # sbatch --time formats
SLURM_MEM = re.compile(r"\d+[KMGT]?B?", re.IGNORECASE)  # sbatch --mem / --mem-per-gpu
WARM = "warm"  # executor option of local studies: jobs forked from a preloaded process (true, the default) or cold


@dataclass
class JobRef:
    executor: str                  # local | debug | slurm
    job_id: str                    # local: the controller's pid; slurm: JOBID or JOBID_TASK
    folder: str                    # the submitit folder

    def to_dict(self) -> dict[str, str]:
        return {"executor": self.executor, "job_id": self.job_id, "folder": self.folder}


def normalize(options: dict[str, Any]) -> dict[str, Any]:
    """Spec/profile option names -> AutoExecutor parameter names."""
    out = {}
    for key, value in options.items():
        if key == "additional":
            key = "additional_parameters"
        if key not in GENERIC and not key.startswith(("slurm_", "local_", "debug_")):
            key = f"slurm_{key}"
        out[key] = value
    return out


def executor_params(spec: StudySpec) -> dict[str, Any]:
    """The AutoExecutor parameters of the study: defaults < site profile < spec overrides."""
    ex = spec.executor
    params: dict[str, Any] = {"name": f"mg-{spec.name}"}
    params["timeout_min"] = SLURM_TIMEOUT_MIN if ex.type == "slurm" else LOCAL_TIMEOUT_MIN
    if ex.profile:
        params.update(normalize(_load_profile(ex.profile, spec.path)))
    if ex.type == "slurm":  # the study's parallelism throttles its job arrays (%N), whatever the profile says
        params["slurm_array_parallelism"] = spec.parallelism
    params.update(normalize({k: v for k, v in ex.options.items() if k != WARM}))
    return params


def _load_profile(name: str, src: str) -> dict[str, Any]:
    try:
        from mgbench.study.profiles import load_profile
    except ImportError as e:
        raise ConfigError(f"{src}:executor.profile: site profiles are not available ({e})") from None
    if name.endswith((".yaml", ".yml")) and not Path(name).is_absolute():
        name = str(Path(src).parent / name)  # a profile file next to the spec
    try:
        return dict(load_profile(name))
    except ConfigError as e:  # the profile's own `file:key: ...`, behind the spec field that named it
        raise ConfigError(f"{src}:executor.profile: {e}") from None
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise ConfigError(f"{src}:executor.profile: cannot load {name!r} ({e})") from None


def check_executor(spec: StudySpec) -> dict[str, Any]:
    """The gate of every command that may submit (validate, --dry-run, run, the driver): submitit checks every
    option (names and types), errors read `file:executor.<key>: ...`; a SLURM time limit must outlast the USR2
    delay, and the spec must be the one its study was first run with."""
    check_unchanged(spec)
    if WARM in spec.executor.options:
        value = spec.executor.options[WARM]
        if spec.executor.type != "local":
            raise ConfigError(f"{spec.path}:executor.{WARM}: only for type local (warm jobs are local processes), "
                              f"not {spec.executor.type}")
        if not isinstance(value, bool):
            raise ConfigError(f"{spec.path}:executor.{WARM}: expected true or false, got {value!r}")
    params = executor_params(spec)
    raw_keys = {normalize({k: None}).popitem()[0]: k for k in spec.executor.options}
    with tempfile.TemporaryDirectory() as tmp:
        ex = submitit.AutoExecutor(folder=tmp, cluster="debug")
        for key, value in params.items():
            try:
                ex.update_parameters(**{key: value})
            except (NameError, ValueError, AssertionError, TypeError) as e:
                field = raw_keys.get(key, key)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"{spec.path}:executor.{field}: {first}") from None
            problem = value_problem(key, value)
            if problem:
                raise ConfigError(f"{spec.path}:{_where(spec, key, raw_keys)}: {problem}")
        if spec.executor.type == "slurm":
            late = time_limit_problem(params)
            if late:
                raise ConfigError(f"{spec.path}:{_where(spec, late[0], raw_keys)}: {late[1]}")
            try:
                sbatch_script(spec, params, None, Path(tmp))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{spec.path}:executor: {str(e).splitlines()[0]}") from None
    return params


def _where(spec: StudySpec, key: str, raw_keys: dict[str, str]) -> str:
    """The field an executor parameter came from: the spec's option, the profile, or mgbench's default."""
    if key in raw_keys:
        return f"executor.{raw_keys[key]}"
    if spec.executor.profile:
        return f"executor.profile: {key} (from profile {spec.executor.profile!r})"
    return f"executor.{key} (default {SLURM_TIMEOUT_MIN})" if key == "timeout_min" else f"executor.{key}"


def value_problem(key: str, value: Any) -> str | None:
    """What is wrong with an executor value that submitit would pass on to sbatch unchecked, or None."""
    if value is None:
        return None
    if key in MIN_VALUES:
        least, what = MIN_VALUES[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
            bound = "> 0" if least < 1 and least > 0 else f">= {least}"
            return f"expected a number of {what} {bound}, got {value!r}"
    if key == "slurm_time" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1
                                    or isinstance(value, str) and SLURM_TIME.fullmatch(value)):
        return (f"{value!r} is not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS); "
                "or set timeout_min")
    if key in ("slurm_mem", "slurm_mem_per_gpu", "slurm_mem_per_cpu") and not SLURM_MEM.fullmatch(str(value)):
        return f"{value!r} is not a SLURM memory size (e.g. 16G, 16000M); or set mem_gb"
    return None


def submitit_folder(spec: StudySpec) -> Path:
    """Where submitit keeps pickles and logs (%j: one sub-folder per job)."""
    return Path(spec.out_dir) / "submitit" / "%j"


def make_executor(spec: StudySpec) -> submitit.AutoExecutor:
    """The study's submitit executor with its parameters applied (local: warm unless `warm: false`)."""
    folder = submitit_folder(spec)
    if spec.executor.type == "local" and spec.executor.options.get(WARM, True):
        ex = WarmAutoExecutor(folder, preload_modules(spec))
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster=spec.executor.type)
    params = executor_params(spec)
    if spec.executor.type != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    ex.update_parameters(**params)
    return ex


def preload_modules(spec: StudySpec) -> list[str]:
    """What a warm executor's zygote imports: torch, MLflow, Optuna, the trial job, the spec's trainer and hook
    (mgbench's hook: what it imports when called, torch-fidelity and all), MLflow's SQL store (for its URI)."""
    extra = [name.partition(":")[0] for name in (spec.entry, spec.eval_hook)]
    if spec.eval_hook == DEFAULT_EVAL_HOOK:
        extra.append("mgbench.evaluation.hook")
    if not spec.tracking_uri.startswith(("http:", "https:", "databricks")):
        extra.append("mlflow.store.tracking.sqlalchemy_store")
    return list(dict.fromkeys([*PRELOAD, *extra]))


def pause(executor: Any, seconds: float) -> None:
    """The driver's wait between polls: `seconds`, or less when a warm job ends (its zygote tells at once)."""
    if isinstance(executor, WarmAutoExecutor):
        executor.pause(seconds)
    else:
        time.sleep(seconds)


def release(executor: Any) -> None:
    """Let a warm executor's zygote go once the driver submits no more (jobs already forked run on)."""
    if isinstance(executor, WarmAutoExecutor):
        executor.close()


def slurm_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """AutoExecutor parameters -> the keyword arguments of submitit's sbatch renderer (as SlurmExecutor maps them)."""
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem

    eq = SlurmExecutor._equivalence_dict()
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in GENERIC and value is not None:
            out[eq.get(key, key)] = _convert_mem(value) if key == "mem_gb" else value
    for key, value in params.items():  # SLURM-specific names win over the shared ones
        if key.startswith("slurm_"):
            out[key[len("slurm_"):]] = value
    return out


def sbatch_script(spec: StudySpec, params: dict[str, Any], array_size: int | None, folder: Path | None = None) -> str:
    """The sbatch script submitit would submit for this study (array_size: a job array of that many tasks)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder or submitit_folder(spec))
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    kwargs = slurm_parameters(params)
    if array_size and array_size > 1:
        kwargs["map_count"] = array_size
    return _make_sbatch_string(command=command, folder=folder, **kwargs)


def job_ref(spec: StudySpec, job: Any) -> JobRef:
    """A job's persistent reference (written into trial.json)."""
    return JobRef(spec.executor.type, str(job.job_id), str(submitit_folder(spec)))


def job_alive(ref: dict[str, str], job: Any | None = None) -> bool:
    """Whether the job may still produce a result (an UNKNOWN or forgotten SLURM job does not: see jobstate)."""
    return job_states([ref], [job])[0].kind == ALIVE
